"""What gRPC alone costs on this machine: the floor under every latency figure of the stack.

Trivial grpc.aio servers run as separate processes on loopback, answering bytes with the same bytes
(no proto, no compute): `echo`, and `relay`, which forwards each call to echo before it answers,
optionally through a thread-pool hand-off as the services make for their compute. A client in this
process calls them one at a time (c=1) and reports p50 latency and the servers' CPU per call.

    .venv/bin/python bench/grpc_floor.py            # 2,000 calls per case
    .venv/bin/python bench/grpc_floor.py --calls 500

A Retrieve is the relay shape: client -> gateway -> user_service, then the gateway's own compute, so
the relay's p50 is the least any Retrieve can take here before a single model op runs. Writes
results/grpc_floor.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from bench.common import RESULTS, cpu_seconds, free_port, machine_info, write_json  # noqa: E402

METHOD = "/floor.Echo/Call"
PAYLOAD = b"x" * 2048  # about a Retrieve request with a 100-event history


def _wait_listening(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no server listening on port {port} after {timeout_s} s") from None
            time.sleep(0.05)


def _serve(port: int, forward_to: int | None, hand_off: bool) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{forward_to}") if forward_to else None
        forward = channel.unary_unary(METHOD) if channel else None

        async def call(request: bytes, context) -> bytes:
            if forward is not None:
                request = await forward(request, timeout=10)
            if hand_off:  # what a service's batcher does: the work runs on a worker thread
                request = await loop.run_in_executor(None, bytes, request)
            return request

        handler = grpc.unary_unary_rpc_method_handler(call)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("floor.Echo", {"Call": handler}),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


async def _measure(port: int, calls: int, pids: list[int]) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD)
        for _ in range(100):  # connect and warm up
            await call(PAYLOAD, timeout=10)
        cpu0 = [cpu_seconds(p) or 0.0 for p in pids]
        latencies = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await call(PAYLOAD, timeout=10)
            latencies.append(time.perf_counter() - t0)
        cpu1 = [cpu_seconds(p) or 0.0 for p in pids]
    return {
        "p50_ms": round(statistics.median(latencies) * 1e3, 3),
        "p90_ms": round(statistics.quantiles(latencies, n=10)[-1] * 1e3, 3),
        "server_cpu_ms_per_call": round((sum(cpu1) - sum(cpu0)) * 1e3 / calls, 3),
    }


def run_case(name: str, calls: int, relay: bool, hand_off: bool) -> dict:
    echo_port = free_port()
    ctx = mp.get_context("spawn")  # no fork of a process that has used gRPC
    procs = [ctx.Process(target=_serve, args=(echo_port, None, False), daemon=True)]
    ports = [echo_port]
    if relay:
        ports.append(free_port())
        procs.append(ctx.Process(target=_serve, args=(ports[1], echo_port, hand_off), daemon=True))
    port = ports[-1]  # the one the client calls
    for p in procs:
        p.start()
    try:
        for server_port in ports:
            _wait_listening(server_port)
        result = asyncio.run(_measure(port, calls, [p.pid for p in procs if p.pid is not None]))
    finally:
        for p in procs:
            p.terminate()
            p.join(5)
    print(f"  {name:34s} p50 {result['p50_ms']:6.3f} ms  p90 {result['p90_ms']:6.3f} ms  "
          f"server CPU {result['server_cpu_ms_per_call']:.3f} ms/call", flush=True)  # fmt: skip
    return {"case": name, **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000, help="calls per case")
    p.add_argument("--out", type=Path, default=RESULTS / "grpc_floor.json")
    args = p.parse_args(argv)
    print(f"gRPC floor on loopback, c=1, {len(PAYLOAD)}-byte messages, grpcio {grpc.__version__}")
    cases = [
        run_case("client -> echo", args.calls, relay=False, hand_off=False),
        run_case("client -> relay -> echo", args.calls, relay=True, hand_off=False),
        run_case("client -> relay (+ thread hand-off) -> echo", args.calls, relay=True, hand_off=True),
    ]
    write_json(args.out, {"machine": machine_info(), "calls": args.calls, "cases": cases})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
