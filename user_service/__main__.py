"""`python -m user_service --checkpoint DIR [...]`: flags (with env-var fallbacks) -> config -> serve."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.errors import CheckpointError
from shared.server.flags import add_server_flags, run_service, server_options_from_args
from user_service.config import DEVICES, DTYPES, UserServiceConfig
from user_service.server import serve


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
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=e("USER_SERVICE_CUDA_GRAPHS", "1") not in ("0", "false", "no", "off"),
        help="cuda: replay the user tower from CUDA graphs captured per batch size (1, 2, 4, ... "
        "max batch) instead of launching every op (env USER_SERVICE_CUDA_GRAPHS=0 turns it off)",
    )
    p.add_argument(
        "--state-file",
        default=e("USER_SERVICE_STATE_FILE"),
        help="JSON record of the models held and the default one (model control / rollouts need it; a "
        "restart comes back on the recorded models) (env USER_SERVICE_STATE_FILE)",
    )
    p.add_argument(
        "--max-models",
        type=int,
        default=e("USER_SERVICE_MAX_MODELS", "2"),
        help="models held at once, two during a rollout (env USER_SERVICE_MAX_MODELS)",
    )
    add_server_flags(p, "USER_SERVICE", default_port=50052)
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
        cuda_graphs=args.cuda_graphs,
        port_file=args.port_file,
        state_file=Path(args.state_file) if args.state_file else None,
        max_models=args.max_models,
        server=server_options_from_args(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("user_service", parse_args(argv), config_from_args, serve, (CheckpointError,))


if __name__ == "__main__":
    sys.exit(main())
