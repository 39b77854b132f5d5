"""Command-line flags every service shares, so the three `__main__` modules declare only their own.

`add_server_flags` adds --host --port --port-file --metrics-port --max-message-bytes --grace-seconds
--log-level and the server TLS flags, each with an `<ENV_PREFIX>_<FLAG>` environment fallback;
`server_options_from_args` turns them into `ServerOptions`; `run_service` is the shared `main` body.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from shared.server.bootstrap import DEFAULT_MAX_MESSAGE_BYTES, ServerOptions
from shared.server.logs import LOG_FORMATS, configure_logging
from shared.tls import add_server_tls_flags, server_tls_from_args

logger = logging.getLogger(__name__)


def add_server_flags(parser: argparse.ArgumentParser, env_prefix: str, default_port: int) -> None:
    # Env-var fallbacks go through argparse's `type`, so a bad value gets the same usage error.
    e = os.environ.get
    parser.add_argument("--host", default=e(f"{env_prefix}_HOST", "127.0.0.1"), help="address to bind")
    parser.add_argument("--port", type=int, default=e(f"{env_prefix}_PORT", str(default_port)),
                        help="0 = any free port (see --port-file)")  # fmt: skip
    parser.add_argument(
        "--port-file", type=Path, default=None, help="write the bound port here once listening"
    )
    parser.add_argument("--metrics-port", type=int, default=e(f"{env_prefix}_METRICS_PORT"),
                        help="Prometheus HTTP port (off when not given)")  # fmt: skip
    parser.add_argument("--max-message-bytes", type=int,
                        default=e(f"{env_prefix}_MAX_MESSAGE_BYTES", str(DEFAULT_MAX_MESSAGE_BYTES)),
                        help="largest gRPC message, both directions")  # fmt: skip
    parser.add_argument("--grace-seconds", type=float, default=e(f"{env_prefix}_GRACE_SECONDS", "5"),
                        help="on SIGTERM/SIGINT, in-flight RPCs may finish within this")  # fmt: skip
    parser.add_argument("--log-level", default=e(f"{env_prefix}_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", choices=LOG_FORMATS,
                        default=e(f"{env_prefix}_LOG_FORMAT", "plain"),
                        help=f"plain, or one JSON object a line (env {env_prefix}_LOG_FORMAT)")  # fmt: skip
    add_server_tls_flags(parser, env_prefix)


def server_options_from_args(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_bytes,
        grace_seconds=args.grace_seconds,
        metrics_port=args.metrics_port,
        tls=server_tls_from_args(args),
    )


def run_service(
    name: str,
    args: argparse.Namespace,
    config_from_args: Callable[[argparse.Namespace], Any],
    serve: Callable[[Any], Coroutine[Any, Any, None]],
    startup_errors: tuple[type[BaseException], ...],
) -> int:
    """Logging, config (exit 2 with one line when invalid), serve until signalled (exit 1 with one log
    line when it cannot start: `startup_errors` plus OSError, e.g. a port in use)."""
    configure_logging(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"{name}: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except (*startup_errors, OSError) as exc:
        logging.getLogger(name).error("%s cannot start: %s", name, exc)
        return 1
    return 0
