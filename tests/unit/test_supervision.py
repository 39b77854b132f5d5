"""Supervised background tasks: a crash is logged, counted, visible, and the task restarted."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from shared.supervision import Supervisor


def _failures(task: str) -> float:
    return REGISTRY.get_sample_value("twotower_background_task_failures_total", {"task": task}) or 0.0


def test_a_crashing_task_is_counted_reported_and_restarted():
    runs: list[int] = []
    hooks: list[BaseException | None] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) <= 2:
            raise MemoryError(f"crash {len(runs)}")
        await asyncio.Event().wait()  # then runs for ever

    async def main():
        sup = Supervisor(backoff_initial_s=0.001, backoff_max_s=0.01)
        before = _failures("flaky-test")
        sup.spawn("flaky-test", flaky, hooks.append)
        for _ in range(500):  # bounded: at most ~5 s
            if len(runs) == 3:
                break
            await asyncio.sleep(0.01)
        state = sup.states["flaky-test"]
        assert len(runs) == 3 and state.running and state.failures == 2
        assert state.last_error == "MemoryError: crash 2"
        assert [type(h) for h in hooks] == [MemoryError, MemoryError]
        assert _failures("flaky-test") == before + 2
        await sup.stop()
        assert not state.running

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_task_that_returns_is_restarted_too():
    runs: list[int] = []

    async def returns_once() -> None:
        runs.append(1)
        if len(runs) > 1:
            await asyncio.Event().wait()

    async def main():
        sup = Supervisor(backoff_initial_s=0.001, backoff_max_s=0.01)
        sup.spawn("returns-test", returns_once)
        for _ in range(500):
            if len(runs) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(runs) == 2 and sup.states["returns-test"].last_error == "returned unexpectedly"
        await sup.stop()

    asyncio.run(asyncio.wait_for(main(), 10))
