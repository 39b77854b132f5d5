"""Closed-loop asyncio load generator, bounded in request count and wall time.

`run_load` drives any async callable (a gRPC stub call, an in-process function) with `concurrency`
workers; each worker issues its next request as soon as the previous one finishes, so the offered
load adapts to the server (closed loop: no coordinated-omission queue builds up on the client).
It imports grpc only to classify errors; it never opens a connection itself, so the caller decides
the target (benchmarks use loopback only).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

# Error key for exceptions that are not gRPC status errors (client-side bugs, timeouts in the caller).
CLIENT_ERROR = "CLIENT_ERROR"
# Hard caps so a typo in a benchmark cannot run forever or exhaust memory with latency samples.
MAX_CONCURRENCY = 4096
MAX_REQUESTS = 10_000_000
MAX_SECONDS = 3600.0


@dataclass
class LoadResult:
    """Outcome of one load level. Latencies are of successful calls only, in seconds."""

    concurrency: int
    sent: int
    ok: int
    errors: dict[str, int] = field(default_factory=dict)  # status-code name -> count
    latencies_s: list[float] = field(default_factory=list)
    duration_s: float = 0.0

    @classmethod
    def combine(cls, results: list[LoadResult]) -> LoadResult:
        """Several turns of one level as one result: samples pooled, counts and durations summed."""
        if not results:
            raise ValueError("nothing to combine")
        errors: dict[str, int] = {}
        for r in results:
            for code, n in r.errors.items():
                errors[code] = errors.get(code, 0) + n
        return cls(
            concurrency=results[0].concurrency,
            sent=sum(r.sent for r in results),
            ok=sum(r.ok for r in results),
            errors=errors,
            latencies_s=[t for r in results for t in r.latencies_s],
            duration_s=sum(r.duration_s for r in results),
        )

    def qps(self) -> float:
        """Successful calls per second of wall time (0 when nothing ran)."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def percentile_ms(self, p: float) -> float:
        """Latency percentile p in [0, 100] of successful calls, in ms (nan when none succeeded)."""
        return percentile(self.latencies_s, p) * 1e3

    def error_count(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict[str, object]:
        """JSON-ready summary (no raw samples)."""
        return {
            "concurrency": self.concurrency,
            "sent": self.sent,
            "ok": self.ok,
            "errors": dict(self.errors),
            "duration_s": round(self.duration_s, 4),
            "qps": round(self.qps(), 2),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p90_ms": round(self.percentile_ms(90), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "mean_ms": round(sum(self.latencies_s) / len(self.latencies_s) * 1e3, 3)
            if self.latencies_s
            else math.nan,
        }


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default method) without needing numpy; nan if empty."""
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


async def run_load(
    call: Callable[[int], Awaitable[object]],
    *,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
) -> LoadResult:
    """Run `call(i)` for i = 0, 1, ... with `concurrency` closed-loop workers.

    Stops issuing new requests at `max_requests` sent or `max_seconds` elapsed, whichever comes
    first; requests already in flight at the deadline are awaited (the caller's own RPC deadline
    bounds them) and counted. `grpc.aio.AioRpcError` is counted by `code().name`; any other
    exception as CLIENT_ERROR.
    """
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be in [1, {MAX_CONCURRENCY}], got {concurrency}")
    if not 1 <= max_requests <= MAX_REQUESTS:
        raise ValueError(f"max_requests must be in [1, {MAX_REQUESTS}], got {max_requests}")
    if not 0.0 < max_seconds <= MAX_SECONDS:
        raise ValueError(f"max_seconds must be in (0, {MAX_SECONDS}], got {max_seconds}")

    result = LoadResult(concurrency=concurrency, sent=0, ok=0)
    next_index = 0
    start = time.perf_counter()
    stop_at = start + max_seconds

    async def worker() -> None:
        nonlocal next_index
        # Single-threaded event loop: the check-and-increment below cannot interleave.
        while next_index < max_requests and time.perf_counter() < stop_at:
            i = next_index
            next_index += 1
            result.sent += 1
            t0 = time.perf_counter()
            try:
                await call(i)
            except grpc.aio.AioRpcError as e:
                name = e.code().name
                result.errors[name] = result.errors.get(name, 0) + 1
            except Exception:  # any client-side failure is a counted error, not a crash
                result.errors[CLIENT_ERROR] = result.errors.get(CLIENT_ERROR, 0) + 1
            else:
                result.latencies_s.append(time.perf_counter() - t0)
                result.ok += 1

    await asyncio.gather(*(worker() for _ in range(min(concurrency, max_requests))))
    result.duration_s = time.perf_counter() - start
    return result
