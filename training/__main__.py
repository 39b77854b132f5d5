"""`python -m training --out artifacts/movielens`: train on MovieLens-100K, evaluate, export.

The data comes from the RecBole wheel (fetched into --cache-dir when missing, digests verified);
--data-dir/--data-name read local atomic files instead (no digest check), e.g. the test fixture.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from shared.model.init_checkpoint import parse_overrides
from shared.server.logs import configure_logging
from training.data import WHEEL_FILENAME, DataError, fetch_wheel, load_from_dir, load_from_wheel
from training.pipeline import DEFAULT_SEEDS, MOVIELENS_TOWER, SASREC, run
from training.train import TrainConfig

DEFAULT_CACHE_DIR = ".cache/recbole"
DEFAULT_RUNS_CACHE = ".cache/runs"


def _parse_value(kind: type, raw: str):
    if kind is bool:  # bool("false") is True
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    return kind(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("--out", required=True, help="artifacts directory (replaced when the run ends)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help=f"where {WHEEL_FILENAME} is kept")
    parser.add_argument("--data-dir", help="read <name>.{inter,item,user} from here instead of the wheel")
    parser.add_argument("--data-name", default="ml-100k", help="file stem inside --data-dir")
    parser.add_argument("--epochs", type=int, default=TrainConfig.max_epochs, help="maximum epochs")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed, help="the served model's seed")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                        help="seeds behind the mean ± std (the served one, then seed+1, ...)")  # fmt: skip
    parser.add_argument("--runs-cache", default=DEFAULT_RUNS_CACHE,
                        help="cache of the extra seeds' and SASRec's metrics ('' = none)")  # fmt: skip
    parser.add_argument("--no-sasrec", action="store_true", help="leave the SASRec baseline out")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a TowerConfig field, e.g. --set emb_dim=32")  # fmt: skip
    parser.add_argument("--train-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a TrainConfig field, e.g. --train-set batch_size=256")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--if-missing", action="store_true",
                        help="do nothing when OUT/metrics.json (written last) already exists")  # fmt: skip
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if args.if_missing and (Path(args.out) / "metrics.json").is_file():
        print(f"{args.out} already holds trained artifacts; nothing to do")
        return 0
    try:
        tower = dataclasses.replace(MOVIELENS_TOWER, **parse_overrides(args.set))
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        overrides = {}
        for pair in args.train_set:
            key, sep, raw = pair.partition("=")
            if not sep or key not in train_fields:
                raise ValueError(f"--train-set expects FIELD=VALUE with FIELD one of {sorted(train_fields)}")
            overrides[key] = _parse_value(type(getattr(TrainConfig(), key)), raw)
        if args.seeds < 1:
            raise ValueError("--seeds must be >= 1")
        cfg = TrainConfig(**{**overrides, "max_epochs": args.epochs, "seed": args.seed})
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    try:
        if args.data_dir:
            data = load_from_dir(args.data_dir, args.data_name)
        else:
            data = load_from_wheel(fetch_wheel(args.cache_dir))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    run(
        data, args.out, tower, cfg, progress=not args.no_progress, seeds=args.seeds,
        cache_dir=args.runs_cache or None, sasrec=None if args.no_sasrec else SASREC,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
