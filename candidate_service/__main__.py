"""`python -m candidate_service --checkpoint DIR --cache-dir DIR [--items FILE] [...]`:
flags (with env-var fallbacks) -> config -> serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from candidate_service.config import DEFAULT_ENCODE_BATCH_SIZE, DEFAULT_MAX_BATCH_ITEMS, CandidateConfig
from candidate_service.encoder import EncodingStopped
from candidate_service.item_store import ItemStoreError
from candidate_service.items_file import ItemsFileError
from candidate_service.server import serve
from shared.errors import CheckpointError
from shared.server.flags import add_server_flags, run_service, server_options_from_args

logger = logging.getLogger("candidate_service")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    e = os.environ.get  # argparse applies `type` to string defaults: a bad env value is a usage error
    p = argparse.ArgumentParser(prog="python -m candidate_service", description=__doc__)
    p.add_argument(
        "--checkpoint", default=e("TWOTOWER_CHECKPOINT"), help="checkpoint dir (env TWOTOWER_CHECKPOINT)"
    )
    p.add_argument(
        "--cache-dir", default=e("CANDIDATE_CACHE_DIR"),
        help="embeddings cache, a file per model (env CANDIDATE_CACHE_DIR); holds the item store by default",
    )  # fmt: skip
    p.add_argument(
        "--items", default=e("CANDIDATE_ITEMS"),
        help="items file, JSONL or .parquet, imported into a new item store (env CANDIDATE_ITEMS)",
    )  # fmt: skip
    p.add_argument(
        "--item-store", default=e("CANDIDATE_ITEM_STORE"),
        help="SQLite file of the corpus of record (env CANDIDATE_ITEM_STORE; CACHE_DIR/items.sqlite3)",
    )  # fmt: skip
    p.add_argument(
        "--import-items", action="store_true",
        help="upsert the items file's new and changed items into an existing item store at start (once)",
    )  # fmt: skip
    batch = str(DEFAULT_ENCODE_BATCH_SIZE)
    p.add_argument("--encode-batch-size", type=int, default=e("CANDIDATE_ENCODE_BATCH_SIZE", batch),
                   help="items per forward pass when encoding the corpus")  # fmt: skip
    p.add_argument(
        "--max-batch-items", type=int, default=e("CANDIDATE_MAX_BATCH_ITEMS", str(DEFAULT_MAX_BATCH_ITEMS)),
        help="items (or ids) per EncodeItems/UpsertItems/DeleteItems call; more is INVALID_ARGUMENT",
    )  # fmt: skip
    p.add_argument("--delta-ring-size", type=int, default=e("CANDIDATE_DELTA_RING_SIZE", "1024"),
                   help="recent deltas kept for watchers that resume")  # fmt: skip
    p.add_argument("--watcher-queue-size", type=int, default=e("CANDIDATE_WATCHER_QUEUE_SIZE", "256"),
                   help="deltas queued per watcher before it gets a fresh snapshot instead")  # fmt: skip
    p.add_argument("--max-watchers", type=int, default=e("CANDIDATE_MAX_WATCHERS", "64"),
                   help="open WatchCorpus streams; one more is RESOURCE_EXHAUSTED")  # fmt: skip
    p.add_argument("--cache-refresh-after-changes", type=int,
                   default=e("CANDIDATE_CACHE_REFRESH_AFTER_CHANGES", "10000"),
                   help="rewrite the embeddings cache once this many changes are not in it")  # fmt: skip
    p.add_argument("--torch-threads", type=int, default=e("CANDIDATE_TORCH_THREADS"))
    add_server_flags(p, "CANDIDATE", default_port=50053)
    args = p.parse_args(argv)
    for flag, env in (("checkpoint", "TWOTOWER_CHECKPOINT"), ("cache_dir", "CANDIDATE_CACHE_DIR")):
        if not getattr(args, flag):
            p.error(f"--{flag.replace('_', '-')} (or {env}) is required")
    return args


def config_from_args(args: argparse.Namespace) -> CandidateConfig:
    return CandidateConfig(
        checkpoint=Path(args.checkpoint),
        cache_dir=Path(args.cache_dir),
        items=Path(args.items) if args.items else None,
        item_store=Path(args.item_store) if args.item_store else None,
        import_items=args.import_items,
        encode_batch_size=args.encode_batch_size,
        max_batch_items=args.max_batch_items,
        delta_ring_size=args.delta_ring_size,
        watcher_queue_size=args.watcher_queue_size,
        max_watchers=args.max_watchers,
        cache_refresh_after_changes=args.cache_refresh_after_changes,
        torch_threads=args.torch_threads,
        port_file=args.port_file,
        server=server_options_from_args(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        startup_errors = (CheckpointError, ItemsFileError, ItemStoreError)
        return run_service("candidate_service", parse_args(argv), config_from_args, serve, startup_errors)
    except EncodingStopped:
        logger.info("stopped while encoding the corpus")
        return 0


if __name__ == "__main__":
    sys.exit(main())
