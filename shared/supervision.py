"""Supervised background tasks: a crash is logged, counted, visible in status, and the task restarted.

A background loop (the gateway's corpus follower, its readiness tracker, ...) that dies silently leaves
a server that looks healthy while it serves stale data. `Supervisor.spawn(name, factory)` runs
`factory()` in a task; when the coroutine raises (anything but cancellation) or returns, the failure is
logged with its traceback, counted in `twotower_background_task_failures_total{task=...}`, recorded in
the task's `TaskState` (shown by the service's status RPC), and the coroutine is started again after a
capped exponential backoff. No grpc import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter

logger = logging.getLogger(__name__)

TASK_FAILURES = Counter(
    "twotower_background_task_failures_total",
    "Background tasks that crashed (or returned) and were restarted",
    ["task"],
)


@dataclass
class TaskState:
    name: str
    running: bool = False
    failures: int = 0
    last_error: str = ""


class Supervisor:
    def __init__(self, *, backoff_initial_s: float = 0.1, backoff_max_s: float = 5.0) -> None:
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._tasks: dict[str, asyncio.Task] = {}
        self.states: dict[str, TaskState] = {}

    def spawn(
        self,
        name: str,
        factory: Callable[[], Awaitable[None]],
        on_failure: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        """Run `factory()` on the running loop for ever (until `stop`), restarting it when it ends.
        `on_failure` runs after each crash (e.g. to mark a connection as lost)."""
        if name in self._tasks:
            raise ValueError(f"task {name!r} is already supervised")
        state = self.states[name] = TaskState(name)
        self._tasks[name] = asyncio.get_running_loop().create_task(
            self._keep_running(state, factory, on_failure), name=name
        )

    async def _keep_running(
        self,
        state: TaskState,
        factory: Callable[[], Awaitable[None]],
        on_failure: Callable[[BaseException | None], None] | None,
    ) -> None:
        initial, cap = self._backoff
        consecutive = 0
        loop = asyncio.get_running_loop()
        while True:
            state.running = True
            started = loop.time()
            error: BaseException | None = None
            try:
                await factory()
                state.last_error = "returned unexpectedly"
            except asyncio.CancelledError:
                state.running = False
                raise
            except Exception as exc:  # MemoryError included; SystemExit / KeyboardInterrupt propagate
                error = exc
                state.last_error = f"{type(exc).__name__}: {exc}"[:500]
                logger.error("background task %r crashed; restarting it", state.name, exc_info=exc)
            else:
                logger.error("background task %r returned; restarting it", state.name)
            state.running = False
            state.failures += 1
            # a run that lasted longer than the longest backoff was healthy: start the backoff over
            consecutive = 1 if loop.time() - started > cap else consecutive + 1
            TASK_FAILURES.labels(state.name).inc()
            if on_failure is not None:
                try:
                    on_failure(error)
                except Exception:
                    logger.exception("on_failure hook of %r failed", state.name)
            await asyncio.sleep(min(cap, initial * 2 ** min(consecutive - 1, 20)))

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = {}
        for state in self.states.values():
            state.running = False
