"""Rollout benchmark: how long `twotower rollout` takes on the 1M-item synthetic corpus, step by step,
and what it costs the requests served meanwhile.

The real stack (candidate_service, user_service with --state-file, retrieval_gateway) serves the
synthetic corpus of bench/e2e_corpus.py with model A; a closed loop of `--concurrency` clients sends
Retrieve calls the whole time, and a writer upserts `--writes-per-s` items. After `--before-s`
seconds the rollout to model B (same config, another seed) runs from this process (the library
behind `twotower rollout`); the load goes on `--after-s` seconds after it. Every request is timed and
put in its phase (before / during / after the rollout); the services' RSS is sampled throughout (the
gateway holds two corpora for a moment while it switches, candidate_service while it encodes).

The item store and user_service's state file persist in the work directory (apart from
e2e_bench.py's), and both record the rolled-out model: a second run rolls back (B -> A). The
target's embeddings cache is deleted first (unless --keep-target-cache), so the encode is that of a
new model.

    .venv/bin/python bench/rollout_bench.py --quick               # 1M items, 10 s before, 5 s after
    .venv/bin/python bench/rollout_bench.py --items 200000

Writes results/rollout_bench.json and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import grpc  # noqa: E402

from bench import e2e_corpus  # noqa: E402
from bench.common import (  # noqa: E402
    RESULTS,
    RssSampler,
    ServiceProcess,
    machine_info,
    wait_serving,
    write_json,
)
from bench.loadgen import percentile  # noqa: E402
from candidate_service.embedding_cache import cache_file  # noqa: E402
from shared.client.rollout import RolloutTargets, run_rollout  # noqa: E402
from twotower.v1 import (  # noqa: E402
    candidate_tower_pb2,
    candidate_tower_pb2_grpc,
    common_pb2,
    retrieval_gateway_pb2,
)

RETRIEVE = "/twotower.v1.RetrievalGateway/Retrieve"
CALL_TIMEOUT_S = 30.0
WRITE_BASE = 10**12  # post ids of the bench's upserts, far from the corpus's


@dataclass
class Call:
    start: float
    end: float
    ok: bool
    fingerprint: str = ""


def model_b(corpus: e2e_corpus.Corpus, seed: int) -> Path:
    """Checkpoint B beside A: the same config, other weights (written once)."""
    from shared.model.checkpoint import load_checkpoint, random_model, save_checkpoint

    path = corpus.checkpoint.parent / "checkpoint_b"
    if not (path / "config.json").exists():
        save_checkpoint(random_model(load_checkpoint(corpus.checkpoint).config, seed=seed), path)
    return path


async def retrieve_loop(address: str, payloads: list[bytes], concurrency: int, calls: list[Call],
                        stop: asyncio.Event) -> None:  # fmt: skip
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(RETRIEVE)

        async def client(i: int) -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    raw = await call(payloads[i % len(payloads)], timeout=CALL_TIMEOUT_S)
                    fp = retrieval_gateway_pb2.RetrieveResponse.FromString(raw).model_fingerprint
                    calls.append(Call(t0, time.monotonic(), True, fp))
                except grpc.aio.AioRpcError:
                    calls.append(Call(t0, time.monotonic(), False))
                i += concurrency

        await asyncio.gather(*(client(i) for i in range(concurrency)))


async def write_loop(address: str, per_s: float, calls: list[Call], stop: asyncio.Event) -> None:
    """Upserts of 10 new items, `per_s` calls a second (open loop: a held write path shows as latency)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = candidate_tower_pb2_grpc.CandidateTowerStub(channel)
        n, pending = 0, set()

        async def one(first: int) -> None:
            items = [common_pb2.Item(post_id=first + j, author_id=j) for j in range(10)]
            t0 = time.monotonic()
            try:
                await stub.UpsertItems(
                    candidate_tower_pb2.UpsertItemsRequest(items=items), timeout=CALL_TIMEOUT_S
                )
                calls.append(Call(t0, time.monotonic(), True))
            except grpc.aio.AioRpcError:
                calls.append(Call(t0, time.monotonic(), False))

        while not stop.is_set() and per_s > 0:
            task = asyncio.ensure_future(one(WRITE_BASE + int(time.time() * 1000) * 100 + n * 10))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
            await asyncio.sleep(1.0 / per_s)
        await asyncio.gather(*pending)


def phase_stats(calls: list[Call], lo: float, hi: float) -> dict[str, object]:
    inside = [c for c in calls if lo <= c.start < hi]
    lat = [(c.end - c.start) for c in inside if c.ok]
    fps: dict[str, int] = {}
    for c in inside:
        if c.ok and c.fingerprint:
            fps[c.fingerprint] = fps.get(c.fingerprint, 0) + 1
    return {
        "requests": len(inside), "errors": sum(not c.ok for c in inside),
        "qps": round(len(lat) / (hi - lo), 1) if hi > lo else 0.0,
        "p50_ms": round(percentile(lat, 50) * 1e3, 2), "p99_ms": round(percentile(lat, 99) * 1e3, 2),
        "max_ms": round(max(lat) * 1e3, 2) if lat else None, "fingerprints": fps,
    }  # fmt: skip


def hwm_mib(pid: int) -> float | None:
    """Peak RSS of the process so far (VmHWM): catches a peak shorter than the sampling interval."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def rss_stats(samples: list[dict], name: str, phase: str) -> float | None:
    values = [s[name] for s in samples if s["phase"] == phase and s.get(name)]
    return round(max(values) / 2**20, 1) if values else None


def run(args: argparse.Namespace) -> dict:
    workdir = args.workdir
    corpus = e2e_corpus.synthetic(workdir, args.items, args.k)
    ckpt_b = model_b(corpus, seed=1)
    payloads = [r.SerializeToString() for r in corpus.requests]
    # Its own item store and caches: they record the rolled-out model, and e2e_bench.py, which serves
    # the same corpus with model A and no user_service state file, must not find B there.
    cache = workdir / "cache" / f"rollout_{corpus.items.parent.name}"
    logs = workdir / "logs" / "rollout"
    candidate = ServiceProcess("candidate_service", ["--checkpoint", str(corpus.checkpoint), "--items",
                               str(corpus.items), "--cache-dir", str(cache)], logs)  # fmt: skip
    user = ServiceProcess("user_service", ["--checkpoint", str(corpus.checkpoint), "--device", args.device,
                          "--state-file", str(cache / "user_service_state.json")], logs)  # fmt: skip
    procs = [candidate, user]
    t_start = time.monotonic()
    try:
        candidate.start()
        user.start()
        asyncio.run(wait_serving(candidate))
        asyncio.run(wait_serving(user))
        gateway = ServiceProcess("retrieval_gateway", ["--user-service", user.address, "--candidate-service",
                                 candidate.address, "--device", args.device], logs)  # fmt: skip
        procs.append(gateway)
        gateway.start()
        asyncio.run(wait_serving(gateway))
        print(f"stack SERVING after {time.monotonic() - t_start:.1f}s; logs in {logs}", flush=True)
        with grpc.insecure_channel(candidate.address) as ch:
            stub = candidate_tower_pb2_grpc.CandidateTowerStub(ch)
            info = stub.GetCorpusInfo(candidate_tower_pb2.GetCorpusInfoRequest(), timeout=10)
        from shared.model.checkpoint import load_checkpoint

        fp_a, fp_b = load_checkpoint(corpus.checkpoint).fingerprint, load_checkpoint(ckpt_b).fingerprint
        source, target = (fp_a, ckpt_b) if info.fingerprint == fp_a else (fp_b, corpus.checkpoint)
        target_fp = fp_b if target == ckpt_b else fp_a
        if not args.keep_target_cache:
            cache_file(cache, target_fp).unlink(missing_ok=True)
        print(
            f"corpus: {info.num_items:,} items served by {source}; rolling out {target_fp} ({target})",
            flush=True,
        )

        calls: list[Call] = []
        writes: list[Call] = []
        report: list[tuple[float, str]] = []
        marks: dict[str, float] = {}
        peaks: dict[str, dict[str, float | None]] = {}

        def said(line: str) -> None:
            report.append((time.monotonic(), line))
            print(f"  {line}", flush=True)

        def rollout() -> None:
            targets = RolloutTargets([user.address], candidate.address, [gateway.address])
            marks["start"] = time.monotonic()
            run_rollout(str(target), targets, poll_s=0.2, report=said)
            marks["end"] = time.monotonic()

        async def drive() -> None:
            stop = asyncio.Event()
            load = asyncio.ensure_future(
                retrieve_loop(gateway.address, payloads, args.concurrency, calls, stop)
            )
            writer = asyncio.ensure_future(write_loop(candidate.address, args.writes_per_s, writes, stop))
            await asyncio.sleep(args.warmup_s)
            marks["before"] = time.monotonic()
            rss.phase = "before"
            await asyncio.sleep(args.before_s)
            peaks["before"] = {name: hwm_mib(pid) for name, pid in pids.items()}
            rss.phase = "during"
            await asyncio.to_thread(rollout)
            peaks["during"] = {name: hwm_mib(pid) for name, pid in pids.items()}
            rss.phase = "after"
            await asyncio.sleep(args.after_s)
            marks["after_end"] = time.monotonic()
            stop.set()
            await asyncio.gather(load, writer)

        pids = {
            "gateway": gateway.proc.pid,
            "candidate_service": candidate.proc.pid,
            "user_service": user.proc.pid,
        }
        with RssSampler(pids, interval_s=0.1) as rss:
            rss.phase = "warmup"
            asyncio.run(drive())
        with grpc.insecure_channel(candidate.address) as ch:
            status = candidate_tower_pb2_grpc.CandidateTowerStub(ch).GetRolloutStatus(
                candidate_tower_pb2.GetRolloutStatusRequest(), timeout=10
            )
    finally:
        for proc in reversed(procs):
            proc.stop()

    steps = driver_steps(report, marks)
    phases = {
        "before": (marks["before"], marks["start"]),
        "during": (marks["start"], marks["end"]),
        "after": (marks["end"], marks["after_end"]),
    }
    return {
        "bench": "rollout_bench",
        "machine": machine_info(),
        "corpus": corpus.description,
        "items": info.num_items,
        "from": source,
        "to": target_fp,
        "concurrency": args.concurrency,
        "device": args.device,
        "rollout_s": round(marks["end"] - marks["start"], 2),
        "driver_steps_s": steps,
        "candidate_steps_s": {k: round(v, 3) for k, v in status.step_seconds.items()},
        "retrieve": {name: phase_stats(calls, lo, hi) for name, (lo, hi) in phases.items()},
        "upsert": {name: phase_stats(writes, lo, hi) for name, (lo, hi) in phases.items()},
        "rss_max_mib": {
            name: {phase: rss_stats(rss.samples, name, phase) for phase in phases} for name in pids
        },
        "peak_rss_mib": peaks,  # VmHWM at the end of each phase (the process's peak so far)
        "args": {k: str(v) for k, v in vars(args).items()},
    }


def driver_steps(report: list[tuple[float, str]], marks: dict[str, float]) -> dict[str, float]:
    """Seconds of each step of the driver, from the time of its report lines."""

    def first(prefix: str, contains: str) -> float:
        return next(t for t, line in report if line.startswith(prefix) and contains in line)

    loaded = first("user_service", "holds")
    switched = first("candidate_service", "live from version")
    gateways = first("gateway", "serving")
    return {
        "user_service: load B beside A": round(loaded - marks["start"], 2),
        "candidate_service: encode + switch": round(switched - loaded, 2),
        "gateways: B's snapshot streamed, built aside, swapped in": round(gateways - switched, 2),
        "user_service: B default, A unloaded": round(marks["end"] - gateways, 2),
    }


def table(result: dict) -> str:
    lines = [f"rollout of {result['items']:,} items, {result['from']} -> {result['to']}: "
             f"{result['rollout_s']:.1f} s in all", "",
             "| step | seconds |", "|---|---|"]  # fmt: skip
    for step, s in result["driver_steps_s"].items():
        lines.append(f"| {step} | {s:.2f} |")
    names = {
        "load": "load the checkpoint",
        "encode": "encode the corpus",
        "catch_up": "replay writes made meanwhile",
        "switch": "switch (writes held)",
    }
    for step, s in sorted(result["candidate_steps_s"].items(), key=lambda kv: list(names).index(kv[0])):
        lines.append(f"| &nbsp;&nbsp;candidate_service: {names.get(step, step)} | {s:.2f} |")
    header = ["phase", "Retrieve calls", "errors", "QPS", "p50 ms", "p99 ms", "max ms", "upserts",
              "upsert p50 ms", "upsert max ms", "gateway RSS max MiB"]  # fmt: skip
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for phase, r in result["retrieve"].items():
        w = result["upsert"][phase]
        lines.append(
            f"| {phase} | {r['requests']} | {r['errors']} | {r['qps']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['max_ms']} | {w['requests']} | {w['p50_ms']} | {w['max_ms']} | "
            f"{result['rss_max_mib']['gateway'][phase]} |"
        )
    peak = result["peak_rss_mib"]
    lines += ["", "| process | peak RSS MiB before the rollout | peak RSS MiB by its end |", "|---|---|---|"]
    for name in peak["before"]:
        lines.append(f"| {name} | {peak['before'][name]} | {peak['during'][name]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument(
        "--writes-per-s", type=float, default=5.0, help="UpsertItems calls (10 items each) a second"
    )
    p.add_argument("--warmup-s", type=float, default=10.0, help="load before measuring (first snapshot)")
    p.add_argument("--before-s", type=float, default=20.0)
    p.add_argument("--after-s", type=float, default=10.0)
    p.add_argument("--quick", action="store_true", help="--before-s 10 --after-s 5")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--keep-target-cache", action="store_true", help="reuse the target's embeddings cache")
    p.add_argument("--workdir", type=Path, default=RESULTS / "e2e_work", help="corpora, caches, service logs")
    p.add_argument("--out", type=Path, default=RESULTS / "rollout_bench.json")
    args = p.parse_args(argv)
    if args.quick:
        args.before_s, args.after_s = 10.0, 5.0
    result = run(args)
    write_json(args.out, result)
    print()
    print(table(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
