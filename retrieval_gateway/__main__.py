"""`python -m retrieval_gateway --user-service TARGET --candidate-service TARGET [...]`:
flags (with env-var fallbacks) -> config -> serve."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from retrieval_gateway.config import GatewayConfig
from retrieval_gateway.server import serve
from shared.errors import DeviceUnavailable
from shared.server.flags import add_server_flags, run_service, server_options_from_args
from shared.server.settings import add_settings, parse_flags, settings_from_args
from shared.tls import add_client_tls_flags, client_tls_from_args

ENV_PREFIX = "GATEWAY"


def build_parser() -> argparse.ArgumentParser:
    """The flags, declared by GatewayConfig's fields, the flags every service shares and upstream TLS."""
    p = argparse.ArgumentParser(prog="python -m retrieval_gateway", description=__doc__)
    add_settings(p, GatewayConfig, ENV_PREFIX)
    add_server_flags(p, ENV_PREFIX, default_port=50051)
    add_client_tls_flags(p, "upstream-", ENV_PREFIX, "user_service and candidate_service")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = parse_flags(p, argv)
    if args.role != "router" and not args.candidate_service:
        p.error(f"--candidate-service (or {ENV_PREFIX}_CANDIDATE_SERVICE) is required")
    return args


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        **settings_from_args(GatewayConfig, args),
        port_file=args.port_file,
        upstream_tls=client_tls_from_args(args, "upstream-"),
        server=server_options_from_args(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(
        "retrieval_gateway", parse_args(argv), config_from_args, serve, (ValueError, DeviceUnavailable)
    )


if __name__ == "__main__":
    sys.exit(main())
