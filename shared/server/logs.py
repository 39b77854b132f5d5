"""Logging set-up, called only from the services' __main__ (never at import).

Two formats: `plain` (the default, one human-readable line) and `json` (one JSON object a line, for log
pipelines: time, level, logger, message, the exception when there is one, and request-scoped fields:
`rpc`, the gRPC method being handled, set by the error interceptor for the duration of each call).
"""

from __future__ import annotations

import contextvars
import logging

LOG_FORMATS = ("plain", "json")

# The gRPC method the current task is handling (contextvars follow asyncio tasks and to_thread).
CURRENT_RPC: contextvars.ContextVar[str | None] = contextvars.ContextVar("twotower_rpc", default=None)


class _RequestFields(logging.Filter):
    """Adds the request-scoped fields to every record (None outside a call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rpc = CURRENT_RPC.get()
        return True


def configure_logging(level: str = "INFO", fmt: str = "plain") -> None:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(_RequestFields())
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter  # only services asking for JSON need it

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(rpc)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
