"""Operator tools, apart from the library code the services import: the `twotower` client CLI (cli.py,
on shared.client's TwoTowerClient and rollout driver) and the `twotower-stack` supervisor (stack.py)."""
