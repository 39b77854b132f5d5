"""`python -m retrieval_gateway --user-service HOST:PORT --candidate-service HOST:PORT [...]`:
flags (with env-var fallbacks) -> config -> serve."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from retrieval_gateway.config import (
    DEFAULT_MAX_EXCLUSIONS,
    DEFAULT_MAX_HISTORY_EVENTS,
    DEFAULT_MAX_K,
    GatewayConfig,
)
from retrieval_gateway.server import serve
from shared.server.flags import add_server_flags, run_service, server_options_from_args
from shared.tls import add_client_tls_flags, client_tls_from_args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    # Env-var fallbacks go through argparse's `type`, so a bad value gets the same usage error.
    e = os.environ.get
    p = argparse.ArgumentParser(prog="python -m retrieval_gateway", description=__doc__)
    p.add_argument(
        "--user-service", default=e("GATEWAY_USER_SERVICE"), help="HOST:PORT (env GATEWAY_USER_SERVICE)"
    )
    p.add_argument(
        "--candidate-service",
        default=e("GATEWAY_CANDIDATE_SERVICE"),
        help="HOST:PORT (env GATEWAY_CANDIDATE_SERVICE)",
    )
    p.add_argument(
        "--device",
        default=e("GATEWAY_DEVICE", "auto"),
        help="auto | cpu | cuda[:N]; auto = cuda when present",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=e("GATEWAY_DTYPE", "fp32"),
                   help="corpus matrix storage (scores are computed in fp32 either way)")  # fmt: skip
    p.add_argument(
        "--fused-gemv",
        action="store_true",
        default=e("GATEWAY_FUSED_GEMV", "") == "1",
        help="CPU: compile a fused kernel for single queries (needs a C++ compiler)",
    )
    p.add_argument(
        "--max-k", type=int, default=e("GATEWAY_MAX_K", str(DEFAULT_MAX_K)), help="largest k accepted"
    )
    p.add_argument(
        "--max-exclusions",
        type=int,
        default=e("GATEWAY_MAX_EXCLUSIONS", str(DEFAULT_MAX_EXCLUSIONS)),
        help="ids per exclusion list (posts, authors)",
    )
    p.add_argument(
        "--max-batch-size", type=int, default=e("GATEWAY_MAX_BATCH_SIZE", "32"), help="queries per matmul"
    )
    p.add_argument("--max-wait-ms", type=float, default=e("GATEWAY_MAX_WAIT_MS", "0"),
                   help="how long a batch waits for more queries after its first (0: batches form "
                        "from what queues while the previous batch runs)")  # fmt: skip
    p.add_argument("--max-linger-ms", type=float, default=e("GATEWAY_MAX_LINGER_MS", "100"),
                   help="longest a scoring batch stays open for requests on their way to it, at "
                        "most half the last batch's compute; 0 = never "
                        "(env GATEWAY_MAX_LINGER_MS)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=e("GATEWAY_MAX_QUEUE", "1024"),
                   help="queries waiting for scoring; beyond it calls get RESOURCE_EXHAUSTED")  # fmt: skip
    p.add_argument("--max-user-calls-in-flight", type=int, default=e("GATEWAY_MAX_USER_CALLS_IN_FLIGHT", "4"),
                   help="EncodeUsers calls to user_service in flight at once, each carrying up to "
                        "--max-batch-size users (env GATEWAY_MAX_USER_CALLS_IN_FLIGHT)")  # fmt: skip
    p.add_argument("--max-history-events", type=int,
                   default=e("GATEWAY_MAX_HISTORY_EVENTS", str(DEFAULT_MAX_HISTORY_EVENTS)),
                   help="history events per Retrieve; more is INVALID_ARGUMENT "
                        "(env GATEWAY_MAX_HISTORY_EVENTS)")  # fmt: skip
    p.add_argument("--user-timeout-s", type=float, default=e("GATEWAY_USER_TIMEOUT_S", "5"),
                   help="user_service call timeout when the caller sets no deadline")  # fmt: skip
    p.add_argument("--max-corpus-items", type=int, default=e("GATEWAY_MAX_CORPUS_ITEMS", "100000000"))
    p.add_argument("--reconnect-max-s", type=float, default=e("GATEWAY_RECONNECT_MAX_S", "5"),
                   help="longest wait between WatchCorpus reconnects")  # fmt: skip
    add_server_flags(p, "GATEWAY", default_port=50051)
    add_client_tls_flags(p, "upstream-", "GATEWAY", "user_service and candidate_service")
    args = p.parse_args(argv)
    for flag in ("user_service", "candidate_service"):
        if not getattr(args, flag):
            p.error(f"--{flag.replace('_', '-')} (or GATEWAY_{flag.upper()}) is required")
    return args


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        user_service=args.user_service,
        candidate_service=args.candidate_service,
        device=args.device,
        dtype=args.dtype,
        fused_gemv=args.fused_gemv,
        max_k=args.max_k,
        max_exclusions=args.max_exclusions,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_linger_ms=args.max_linger_ms,
        max_queue=args.max_queue,
        max_user_calls_in_flight=args.max_user_calls_in_flight,
        max_history_events=args.max_history_events,
        user_timeout_s=args.user_timeout_s,
        max_corpus_items=args.max_corpus_items,
        reconnect_max_s=args.reconnect_max_s,
        port_file=args.port_file,
        upstream_tls=client_tls_from_args(args, "upstream-"),
        server=server_options_from_args(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("retrieval_gateway", parse_args(argv), config_from_args, serve, (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
