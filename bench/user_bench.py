"""Benchmark: user_service encode throughput with dynamic batching on vs off.

One run measures concurrency 1, 8 and 64 (closed-loop async clients, one call = one user with a
128-event history) against two real servers started as subprocesses on loopback, both loading the same
random-init checkpoint of the default TowerConfig: batching on (--max-batch-size 64) and batching off
(--max-batch-size 1). Prints a table and writes JSON (default results/user_bench.json).

    .venv/bin/python bench/user_bench.py            # full: 10 s per cell
    .venv/bin/python bench/user_bench.py --quick    # ~30 s in all

Target: at concurrency 64, batching on gives >= 4x the throughput of batching off.
Clients send pre-serialised request bytes and do not parse replies, so the client process spends as
little CPU as possible (on a small machine it shares the cores with the server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from bench.common import free_port  # noqa: E402
from shared.health import wait_serving  # noqa: E402
from shared.model.checkpoint import random_model, save_checkpoint  # noqa: E402
from shared.model.config import TowerConfig  # noqa: E402
from shared.progress import print_above, progress_over  # noqa: E402
from twotower.v1 import common_pb2, user_tower_pb2  # noqa: E402
from user_service.config import CPU_TOWERS  # noqa: E402

METHOD = "/twotower.v1.UserTower/EncodeUsers"
MODES = {"on": 64, "off": 1}  # mode -> --max-batch-size


def make_requests(count: int, history: int, seed: int = 0) -> list[bytes]:
    """Distinct users with `history` events each (ids, 1-2 actions, surface, timestamps), serialised."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        user = common_pb2.UserContext(user_id=int(rng.integers(1, 1 << 40)))
        ts = 1_700_000_000_000 + np.sort(rng.integers(0, 10**9, history))
        for j in range(history):
            user.history.add(
                post_id=int(rng.integers(1, 1 << 50)),
                author_id=int(rng.integers(0, 1 << 30)),
                action_ids=rng.choice(19, size=int(rng.integers(1, 3)), replace=False).tolist(),
                product_surface=int(rng.integers(0, 16)),
                timestamp_ms=int(ts[j]),
            )
        out.append(user_tower_pb2.EncodeUsersRequest(users=[user]).SerializeToString())
        del i
    return out


class Server:
    def __init__(self, checkpoint: Path, batch: int, work: Path, args: argparse.Namespace) -> None:
        self.metrics_port = free_port()
        port_file = work / f"user_{batch}.port"
        self.log = open(work / f"user_{batch}.log", "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "user_service", "--checkpoint", str(checkpoint), "--port", "0",
               "--port-file", str(port_file), "--metrics-port", str(self.metrics_port),
               "--max-batch-size", str(batch), "--max-wait-ms", str(args.max_wait_ms),
               "--device", args.device, "--dtype", args.dtype, "--log-level", "WARNING",
               "--cpu-tower", args.cpu_tower, "--tower-cache-dir", str(work / "tower-cache")]  # fmt: skip
        if args.torch_threads:
            cmd += ["--torch-threads", str(args.torch_threads)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"user_service did not start; see {self.log.name}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"

    def batch_stats(self) -> tuple[float, float]:
        """(sum, count) of the server's batch-size histogram."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as page:
            text = page.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith(("twotower_user_batch_size_sum", "twotower_user_batch_size_count")):
                name, value = line.split()
                values[name] = float(value)
        return values.get("twotower_user_batch_size_sum", 0.0), values.get(
            "twotower_user_batch_size_count", 0.0
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


async def wait_ready(address: str, timeout: float = 120) -> None:
    if not await wait_serving(address, timeout):
        raise TimeoutError(f"{address} not SERVING within {timeout}s")


async def run_cell(address: str, requests: list[bytes], concurrency: int, seconds: float) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: no client-side proto work
        for r in requests[:8]:  # warm the connection
            await call(r, timeout=30)
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await call(requests[i % len(requests)], timeout=30)
                latencies.append(time.perf_counter() - t0)
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"calls": len(latencies), "seconds": elapsed, "throughput": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2.5 s per cell (sanity run)")
    p.add_argument("--seconds", type=float, default=None, help="measurement time per cell")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--history", type=int, default=128, help="events per request")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="user_service batching wait in both modes (0 = the service default)")  # fmt: skip
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--cpu-tower", default="onnx", choices=CPU_TOWERS, help="user tower runtime on cpu")
    p.add_argument("--out", type=Path, default=REPO / "results" / "user_bench.json")
    args = p.parse_args(argv)
    seconds = args.seconds or (2.5 if args.quick else 10.0)
    requests = make_requests(256, args.history)

    rows = []
    with tempfile.TemporaryDirectory(prefix="user_bench_") as tmp:
        work = Path(tmp)
        config = TowerConfig()
        fingerprint = save_checkpoint(random_model(config, seed=0), work / "ckpt")
        for mode, batch in MODES.items():  # one server at a time: they would compete for the cores
            server = Server(work / "ckpt", batch, work, args)
            try:
                asyncio.run(wait_ready(server.address))
                for c in progress_over(args.concurrency, f"batching {mode}", unit="level"):
                    before = server.batch_stats()
                    result = asyncio.run(run_cell(server.address, requests, c, seconds))
                    after = server.batch_stats()
                    batches = after[1] - before[1]
                    result["mean_batch"] = (after[0] - before[0]) / batches if batches else 0.0
                    rows.append({"batching": mode, "max_batch_size": batch, "concurrency": c, **result})
                    print_above(f"  batching {mode:3} c={c:3}: {result['throughput']:8.1f} calls/s")
            finally:
                server.stop()

    by = {(r["batching"], r["concurrency"]): r for r in rows}
    print(f"\nuser_service EncodeUsers, 1 user/call, history {args.history}, default TowerConfig "
          f"(D={config.emb_dim}, S={config.history_len}), {args.device}/{args.dtype}, "
          f"cpu tower {args.cpu_tower}, {seconds:.1f} s per cell")  # fmt: skip
    print(f"{'conc':>5} | {'on calls/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'batch':>6} | "
          f"{'off calls/s':>11} {'p50 ms':>7} {'p99 ms':>7} | {'on/off':>6}")  # fmt: skip
    ratios = {}
    for c in args.concurrency:
        on, off = by[("on", c)], by[("off", c)]
        ratios[c] = on["throughput"] / off["throughput"]
        print(f"{c:>5} | {on['throughput']:>10.1f} {on['p50_ms']:>7.2f} {on['p99_ms']:>7.2f} "
              f"{on['mean_batch']:>6.1f} | {off['throughput']:>11.1f} {off['p50_ms']:>7.2f} "
              f"{off['p99_ms']:>7.2f} | {ratios[c]:>5.2f}x")  # fmt: skip
    target = ratios.get(64)
    if target is not None:
        print(
            f"target at concurrency 64: on/off >= 4x -> {target:.2f}x {'MET' if target >= 4 else 'NOT MET'}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "user_service EncodeUsers", "history": args.history, "seconds_per_cell": seconds,
        "device": args.device, "dtype": args.dtype, "max_wait_ms": args.max_wait_ms,
        "torch_threads": args.torch_threads, "cpu_tower": args.cpu_tower, "fingerprint": fingerprint,
        "config": config.to_dict(),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                 "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "rows": rows, "on_off_ratio": {str(k): v for k, v in ratios.items()},
    }, indent=2))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
