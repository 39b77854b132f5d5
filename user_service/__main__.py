"""`python -m user_service --checkpoint DIR [...]`: flags (with env-var fallbacks) -> config -> serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.errors import CheckpointError
from shared.server.bootstrap import DEFAULT_MAX_MESSAGE_BYTES, ServerOptions
from shared.server.logs import configure_logging
from shared.tls import add_server_tls_flags, server_tls_from_args
from user_service.config import DEVICES, DTYPES, UserServiceConfig
from user_service.server import serve

logger = logging.getLogger("user_service")


def _env(name: str, default: str | None = None) -> str | None:
    """Env-var fallback of a flag; argparse applies the flag's `type` to string defaults, so a bad
    value in the environment gets the same clear usage error as a bad flag."""
    return os.environ.get(name, default)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    e = _env
    p = argparse.ArgumentParser(prog="python -m user_service", description=__doc__)
    p.add_argument(
        "--checkpoint",
        default=e("TWOTOWER_CHECKPOINT"),
        help="checkpoint directory (env TWOTOWER_CHECKPOINT)",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default=e("USER_SERVICE_DEVICE", "auto"),
        help="auto = cuda when present, else cpu (env USER_SERVICE_DEVICE)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=e("USER_SERVICE_DTYPE", "fp32"),
        help="weights and returned embeddings: fp32 -> DTYPE_FLOAT32, bf16 -> DTYPE_BFLOAT16",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=e("USER_SERVICE_MAX_BATCH_SIZE", "64"),
        help="users per forward pass; 1 turns batching off",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=e("USER_SERVICE_MAX_WAIT_MS", "0"),
        help="how long a batch waits for more users after its first (0: batches still form from "
        "the users that queue while the previous batch computes)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=e("USER_SERVICE_MAX_QUEUE", "1024"),
        help="users waiting for compute; beyond it calls get RESOURCE_EXHAUSTED",
    )
    p.add_argument("--max-users-per-call", type=int, default=e("USER_SERVICE_MAX_USERS_PER_CALL", "256"))
    p.add_argument(
        "--max-history-events",
        type=int,
        default=e("USER_SERVICE_MAX_HISTORY_EVENTS", "1024"),
        help="events accepted per user (only the last S reach the model); more is rejected",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=e("USER_SERVICE_TORCH_THREADS"),
        help="torch intra-op threads (default: torch's choice)",
    )
    p.add_argument("--host", default=e("USER_SERVICE_HOST", "127.0.0.1"))
    p.add_argument(
        "--port",
        type=int,
        default=e("USER_SERVICE_PORT", "50052"),
        help="0 = any free port (see --port-file)",
    )
    p.add_argument("--port-file", type=Path, default=None, help="write the bound port here once listening")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=e("USER_SERVICE_METRICS_PORT"),
        help="Prometheus HTTP port (off when not given)",
    )
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    p.add_argument("--grace-seconds", type=float, default=5.0)
    p.add_argument("--log-level", default=e("USER_SERVICE_LOG_LEVEL", "INFO"))
    add_server_tls_flags(p, "USER_SERVICE")
    args = p.parse_args(argv)
    if not args.checkpoint:
        p.error("--checkpoint (or TWOTOWER_CHECKPOINT) is required")
    return args


def config_from_args(args: argparse.Namespace) -> UserServiceConfig:
    return UserServiceConfig(
        checkpoint=Path(args.checkpoint),
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_users_per_call=args.max_users_per_call,
        max_history_events=args.max_history_events,
        torch_threads=args.torch_threads,
        port_file=args.port_file,
        server=ServerOptions(
            host=args.host,
            port=args.port,
            max_message_bytes=args.max_message_bytes,
            grace_seconds=args.grace_seconds,
            metrics_port=args.metrics_port,
            tls=server_tls_from_args(args),
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"user_service: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except (CheckpointError, OSError) as exc:
        logger.error("user_service cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
