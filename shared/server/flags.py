"""Command-line flags every service shares, so the three `__main__` modules declare only their own.

`add_server_flags` adds the `ServerOptions` settings (--host --port --max-message-bytes --grace-seconds
--metrics-port), the `ProcessOptions` ones (--port-file --log-level --log-format) and the server TLS
flags, each with an `<ENV_PREFIX>_<FLAG>` environment fallback (see shared/server/settings.py);
`server_options_from_args` turns them into `ServerOptions`; `run_service` is the shared `main` body.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.server.bootstrap import ServerOptions
from shared.server.logs import LOG_FORMATS, configure_logging
from shared.server.settings import add_settings, setting, settings_from_args
from shared.tls import add_server_tls_flags, server_tls_from_args

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessOptions:
    """Settings of the process around the server (read from the flags by `run_service` and `serve`)."""

    # No env var: a port file belongs to one start (tests, run-stack), not to an environment.
    port_file: Path | None = field(
        default=None, metadata=setting("write the bound port here once listening", env=None, metavar="FILE")
    )
    log_level: str = field(default="INFO", metadata=setting("DEBUG, INFO, WARNING or ERROR"))
    log_format: str = field(
        default="plain",
        metadata=setting(
            "plain, or one JSON object a line (time, level, logger, message, ...)", choices=LOG_FORMATS
        ),
    )


def add_server_flags(parser: argparse.ArgumentParser, env_prefix: str, default_port: int) -> None:
    group = parser.add_argument_group("server (every service)")
    add_settings(group, ServerOptions, env_prefix, defaults={"port": default_port})
    add_settings(group, ProcessOptions, env_prefix)
    add_server_tls_flags(parser, env_prefix)


def server_options_from_args(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(**settings_from_args(ServerOptions, args), tls=server_tls_from_args(args))


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
