"""The run loop every service's `serve()` shares: start, publish the port, optionally load in the
background (health stays NOT_SERVING meanwhile), wait for SIGTERM/SIGINT, stop gracefully."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol

from shared.server.bootstrap import ServerOptions, start_metrics_http, wait_for_signal
from shared.server.portfile import write_port_file

logger = logging.getLogger(__name__)


class App(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def run_until_signal(
    name: str,
    app: App,
    port: int,
    options: ServerOptions,
    port_file: str | Path | None,
    load: Coroutine[Any, Any, None] | None = None,
) -> None:
    """A failure of `load` (checkpoint, items file) is re-raised after the app has stopped."""
    await app.start()
    metrics_port = start_metrics_http(options.host, options.metrics_port)
    write_port_file(port_file, port)
    logger.info("%s listening on %s:%d (metrics port %s)", name, options.host, port, metrics_port)
    tasks = [asyncio.create_task(wait_for_signal(), name="wait-for-signal")]
    if load is not None:
        tasks.append(asyncio.create_task(load, name=f"{name}-load"))
    stop_signal = tasks[0]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks[1:]:
            if task.done():
                task.result()  # re-raises a load failure
        sig = await stop_signal
        logger.info("%s: signal %d, stopping (grace %.1fs)", name, sig, options.grace_seconds)
    finally:
        for task in tasks:
            task.cancel()
        await app.stop()
        logger.info("%s stopped", name)
