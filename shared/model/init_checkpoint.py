"""`twotower-init-checkpoint`: write a seeded, randomly initialised checkpoint for tests and demos."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from shared.model.checkpoint import random_model, save_checkpoint
from shared.model.config import TowerConfig


def parse_overrides(pairs: list[str]) -> dict:
    """`--set emb_dim=32 --set causal=true` -> typed TowerConfig fields (values parsed as JSON)."""
    known = {f.name for f in dataclasses.fields(TowerConfig)}
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--set expects FIELD=VALUE with FIELD one of {sorted(known)}, got {pair!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--set {key}: {raw!r} is not a number or true/false") from exc
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a TowerConfig field (repeatable), e.g. --set emb_dim=32")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        config = TowerConfig(**parse_overrides(args.set))
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    model = random_model(config, args.seed)
    fingerprint = save_checkpoint(model, args.out)
    print(f"wrote {args.out}: fingerprint {fingerprint}, {model.num_parameters():,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
