"""Overload: beyond capacity the stack sheds load with RESOURCE_EXHAUSTED (bounded queues) rather
than queueing without bound, and a soak of a fixed number of requests leaves memory flat."""

from __future__ import annotations

import asyncio

import pytest

from bench.loadgen import run_load
from tests.reliability.harness import Recorder, Stack, rss_kib, write_items

pytestmark = pytest.mark.reliability

# Small queues so that 64 concurrent callers are far beyond what they admit.
OVERLOAD_ARGS = {
    "user_args": ["--max-queue", "4", "--max-users-per-call", "4", "--max-batch-size", "4",
                  "--max-wait-ms", "5"],
    "gateway_args": ["--max-queue", "4", "--max-batch-size", "4"],
}  # fmt: skip
DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from shared.model.checkpoint import random_model, save_checkpoint
    from shared.model.config import TowerConfig
    from tests.conftest import TINY

    tmp = tmp_path_factory.mktemp("overload")
    save_checkpoint(random_model(TowerConfig(**TINY), seed=0), tmp / "ckpt")
    s = Stack(tmp, tmp / "ckpt", write_items(tmp / "items.jsonl", range(1, 2001)), **OVERLOAD_ARGS)
    s.start_all()
    yield s
    s.stop_all()


def _load(stack: Stack, concurrency: int, requests: int):
    async def main():
        rec = Recorder(stack.address("gateway"), deadline_s=DEADLINE_S)
        try:
            result = await run_load(rec.call, concurrency=concurrency, max_requests=requests, max_seconds=120)
        finally:
            await rec.close()
        return result, rec

    return asyncio.run(asyncio.wait_for(main(), 180))


def test_beyond_capacity_excess_is_shed_with_resource_exhausted(stack):
    result, _ = _load(stack, concurrency=64, requests=1500)
    print(f"\noverload x64: sent {result.sent}, ok {result.ok}, errors {result.errors}, "
          f"p50 {result.percentile_ms(50):.1f} ms, p99 {result.percentile_ms(99):.1f} ms")  # fmt: skip
    assert result.sent == 1500
    assert result.ok > 0 and result.errors.get("RESOURCE_EXHAUSTED", 0) > 0
    assert set(result.errors) <= {"RESOURCE_EXHAUSTED"}  # shed, never timed out in an unbounded queue
    # Within capacity nothing is shed.
    calm, _ = _load(stack, concurrency=2, requests=200)
    assert calm.errors == {} and calm.ok == 200


def _soak(stack: Stack, rounds: int, per_round: int, budget_kib: int) -> None:
    pids = {name: proc.pid for name, proc in stack.procs.items()}
    samples: list[dict[str, int]] = []
    for _ in range(rounds):
        result, _ = _load(stack, concurrency=64, requests=per_round)
        assert set(result.errors) <= {"RESOURCE_EXHAUSTED"}, result.errors
        samples.append({name: rss_kib(pid) for name, pid in pids.items()})
    print("\nsoak RSS (MiB) per round:", [{n: round(v / 1024, 1) for n, v in s.items()} for s in samples])
    for name in pids:
        # The first round warms up (allocator pools, lazily built kernels): growth is measured after it.
        growth = samples[-1][name] - samples[1][name]
        assert growth < budget_kib, f"{name} RSS grew {growth} KiB over {rounds - 2} rounds"


def test_soak_of_fixed_requests_keeps_memory_flat(stack):
    _soak(stack, rounds=4, per_round=1000, budget_kib=16 * 1024)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_long_soak_keeps_memory_flat(stack):
    _soak(stack, rounds=8, per_round=5000, budget_kib=24 * 1024)
