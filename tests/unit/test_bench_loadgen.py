from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from bench.loadgen import CLIENT_ERROR, LoadResult, percentile, run_load


def _run(coro, timeout: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


def test_stops_at_max_requests_and_calls_each_index_once():
    seen: list[int] = []

    async def call(i: int) -> None:
        seen.append(i)
        await asyncio.sleep(0)

    res = _run(run_load(call, concurrency=4, max_requests=50, max_seconds=10))
    assert sorted(seen) == list(range(50))
    assert res.sent == res.ok == 50
    assert res.errors == {}
    assert len(res.latencies_s) == 50
    assert res.concurrency == 4


def test_concurrency_is_the_number_in_flight():
    in_flight = 0
    peak = 0

    async def call(i: int) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1

    _run(run_load(call, concurrency=8, max_requests=64, max_seconds=10))
    assert peak == 8


def test_stops_at_max_seconds():
    async def call(i: int) -> None:
        await asyncio.sleep(0.01)

    res = _run(run_load(call, concurrency=2, max_requests=1_000_000, max_seconds=0.2))
    assert 0 < res.sent < 1000
    assert res.duration_s < 2.0
    assert res.ok == res.sent


def test_errors_counted_by_code_name_and_client_errors():
    async def call(i: int) -> None:
        if i % 3 == 0:
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE)
        if i % 3 == 1:
            raise RuntimeError("bug")

    res = _run(run_load(call, concurrency=3, max_requests=30, max_seconds=10))
    assert res.sent == 30
    assert res.ok == 10
    assert res.errors == {"UNAVAILABLE": 10, CLIENT_ERROR: 10}
    assert len(res.latencies_s) == 10
    assert res.error_count() == 20


def test_qps_and_percentiles():
    res = LoadResult(concurrency=1, sent=4, ok=4, latencies_s=[0.001, 0.002, 0.003, 0.004], duration_s=2.0)
    assert res.qps() == pytest.approx(2.0)
    assert res.percentile_ms(0) == pytest.approx(1.0)
    assert res.percentile_ms(100) == pytest.approx(4.0)
    assert res.percentile_ms(50) == pytest.approx(2.5)
    s = res.summary()
    assert s["p50_ms"] == pytest.approx(2.5) and s["qps"] == pytest.approx(2.0)


def test_turns_of_one_level_combine_into_one_result():
    a = LoadResult(8, sent=3, ok=2, errors={"UNAVAILABLE": 1}, latencies_s=[0.01, 0.03], duration_s=1.0)
    b = LoadResult(8, sent=2, ok=2, errors={}, latencies_s=[0.02, 0.04], duration_s=3.0)
    both = LoadResult.combine([a, b])
    assert (both.concurrency, both.sent, both.ok, both.errors) == (8, 5, 4, {"UNAVAILABLE": 1})
    assert sorted(both.latencies_s) == [0.01, 0.02, 0.03, 0.04] and both.duration_s == 4.0
    assert both.qps() == 1.0 and both.percentile_ms(50) == pytest.approx(25.0)
    with pytest.raises(ValueError):
        LoadResult.combine([])


def test_percentile_edge_cases():
    assert math.isnan(percentile([], 50))
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    assert LoadResult(concurrency=1, sent=0, ok=0).qps() == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(concurrency=0, max_requests=1, max_seconds=1),
        dict(concurrency=1, max_requests=0, max_seconds=1),
        dict(concurrency=1, max_requests=1, max_seconds=0),
    ],
)
def test_bad_bounds_rejected(kwargs):
    async def call(i: int) -> None:
        return None

    with pytest.raises(ValueError):
        _run(run_load(call, **kwargs))
