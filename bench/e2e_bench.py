"""End-to-end benchmark: the real three-service stack (gateway Retrieve) under closed-loop load,
against the in-process floor (same user tower + index calls, same batch sizes, no gRPC).

Per corpus (MovieLens artifacts, and a synthetic 1M-item corpus with a random-init model):
candidate_service, user_service and retrieval_gateway start as subprocesses on free loopback ports
with --metrics-port; the load generator (bench/loadgen.py) drives Retrieve at each concurrency
(default 1, 8, 32, 128) with pre-serialised requests (the client does no proto work), recording QPS,
p50/p90/p99 and errors by status code. The services' Prometheus metrics, scraped before and after
each level, give where a request's time goes; the RSS of the gateway and user_service is sampled
throughout. Then the gateway and user_service stop and the baseline runs in this process.

    .venv/bin/python bench/e2e_bench.py --quick                  # both corpora, 4 s per level
    .venv/bin/python bench/e2e_bench.py                          # 20 s per level
    .venv/bin/python bench/e2e_bench.py --corpus synthetic --device cuda

Targets (see the issue): c=1 p50 <= baseline p50 + 2 ms; c=32 QPS >= 3x c=1 QPS and p99 < 4x p50;
no errors; RSS flat. Writes results/e2e_<corpus>[_<device>].json; bench/report.py turns them into
results/report.md with plots.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import grpc  # noqa: E402

from bench import e2e_corpus  # noqa: E402
from bench.common import (  # noqa: E402
    RESULTS,
    RssSampler,
    ServiceProcess,
    cpu_seconds,
    machine_info,
    mean_ms,
    wait_serving,
    write_json,
)
from bench.loadgen import LoadResult, run_load  # noqa: E402
from shared.progress import print_above, progress_over  # noqa: E402
from twotower.v1 import retrieval_gateway_pb2  # noqa: E402
from user_service.config import CPU_TOWERS  # noqa: E402

RETRIEVE = "/twotower.v1.RetrievalGateway/Retrieve"
STATUS = "/twotower.v1.RetrievalGateway/GetStatus"
CALL_TIMEOUT_S = 30.0
WARM_UP_REQUESTS = 32  # per turn, before its measured load (warms the channel)
RSS_FLAT_PCT = 10.0  # growth over the measured levels beyond this is reported as not flat


def breakdown(gw: tuple[dict, dict], us: tuple[dict, dict], client_mean_ms: float) -> dict[str, float | None]:
    """Mean ms per request by stage, from the services' own histograms (deltas over one level)."""
    (gb, ga), (ub, ua) = gw, us
    lat = "twotower_gateway_latency_seconds"
    out = {
        "client_mean_ms": client_mean_ms,
        "gateway_total_ms": mean_ms(ga, gb, lat, '{stage="total"}'),
        "gateway_user_call_ms": mean_ms(ga, gb, lat, '{stage="user_encode"}'),
        "gateway_scoring_ms": mean_ms(ga, gb, lat, '{stage="scoring"}'),
        "scoring_compute_ms": mean_ms(ga, gb, "twotower_gateway_batch_compute_seconds"),
        "user_compute_ms": mean_ms(ua, ub, "twotower_user_compute_seconds"),
        "user_queue_wait_ms": mean_ms(ua, ub, "twotower_user_queue_wait_seconds"),
        "gateway_batch_mean": mean_ms(ga, gb, "twotower_gateway_batch_size"),
        "user_batch_mean": mean_ms(ua, ub, "twotower_user_batch_size"),
    }
    for key in ("gateway_batch_mean", "user_batch_mean"):  # mean_ms scaled them by 1e3
        out[key] = None if out[key] is None else out[key] / 1e3

    def minus(a: float | None, *bs: float | None) -> float | None:
        return None if a is None or any(b is None for b in bs) else max(0.0, a - sum(bs))  # type: ignore[arg-type]

    # The stages a request goes through, summing to the client's mean latency.
    o = out
    out["stages_ms"] = {
        "user encode (compute)": o["user_compute_ms"],
        "user_service queue + batching wait": o["user_queue_wait_ms"],
        "gateway->user_service gRPC": minus(
            o["gateway_user_call_ms"], o["user_compute_ms"], o["user_queue_wait_ms"]
        ),
        "scoring + top-k (compute)": o["scoring_compute_ms"],
        "scoring queue + batching wait": minus(o["gateway_scoring_ms"], o["scoring_compute_ms"]),
        "gateway request handling": minus(
            o["gateway_total_ms"], o["gateway_user_call_ms"], o["gateway_scoring_ms"]
        ),
        "client->gateway gRPC": minus(client_mean_ms, o["gateway_total_ms"]),
    }
    return out


async def drive(
    address: str, requests: list[bytes], concurrency: int, args: argparse.Namespace
) -> LoadResult:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(RETRIEVE)  # bytes in, bytes out: no client-side proto work

        async def one(i: int) -> object:
            return await call(requests[i % len(requests)], timeout=CALL_TIMEOUT_S)

        await run_load(
            one, concurrency=min(concurrency, 8), max_requests=WARM_UP_REQUESTS, max_seconds=10
        )  # warm the channel
        return await run_load(
            one, concurrency=concurrency, max_requests=args.max_requests, max_seconds=args.seconds
        )


async def gateway_device(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        raw = await channel.unary_unary(STATUS)(
            retrieval_gateway_pb2.GetStatusRequest().SerializeToString(), timeout=10
        )
    return retrieval_gateway_pb2.GatewayStatus.FromString(raw).device


def run_corpus(corpus: e2e_corpus.Corpus, args: argparse.Namespace, workdir: Path) -> dict:
    print(f"\n== {corpus.description}", flush=True)
    payloads = [r.SerializeToString() for r in corpus.requests]
    logs = workdir / "logs" / corpus.name
    # One store and cache per corpus (its items file's folder names it, size and seed included): the item
    # store is the corpus of record, so two corpora must never share one.
    cache = workdir / "cache" / corpus.items.parent.name
    candidate = ServiceProcess("candidate_service", ["--checkpoint", str(corpus.checkpoint), "--items",
                               str(corpus.items), "--cache-dir", str(cache)], logs)  # fmt: skip
    user = ServiceProcess(
        "user_service",
        [
            "--checkpoint",
            str(corpus.checkpoint),
            "--device",
            args.device,
            *_opt("--max-wait-ms", args.user_max_wait_ms),
            "--cpu-tower",
            args.cpu_tower,
            "--tower-cache-dir",
            str(workdir / "tower-cache"),
        ],
        logs,
    )
    levels: list[dict] = []
    t0 = time.monotonic()
    try:
        candidate.start()
        user.start()
        asyncio.run(wait_serving(candidate))
        asyncio.run(wait_serving(user))
        gateway = ServiceProcess("retrieval_gateway", ["--user-service", user.address, "--candidate-service",
                                 candidate.address, "--device", args.device,
                                 *_opt("--max-wait-ms", args.gateway_max_wait_ms)], logs)  # fmt: skip
        try:
            gateway.start()
            asyncio.run(wait_serving(gateway))
            startup_s = time.monotonic() - t0
            device = asyncio.run(gateway_device(gateway.address))
            print(f"stack SERVING after {startup_s:.1f}s (gateway on {device}); logs in {logs}", flush=True)
            procs = [gateway, user, candidate]
            with RssSampler({"gateway": gateway.proc.pid, "user_service": user.proc.pid,
                             "candidate_service": candidate.proc.pid}) as rss:  # fmt: skip
                rss.phase = "warmup"
                asyncio.run(drive(gateway.address, payloads, 8, _warm_args(args)))
                for c in progress_over(args.concurrency, f"{corpus.name}: stack levels", unit="level"):
                    rss.phase = f"c={c}"
                    before = gateway.metrics(), user.metrics()
                    cpu0 = [s.cpu() for s in procs] + [cpu_seconds(os.getpid())]
                    result = asyncio.run(drive(gateway.address, payloads, c, args))
                    cpu1 = [s.cpu() for s in procs] + [cpu_seconds(os.getpid())]
                    after = gateway.metrics(), user.metrics()
                    summary = result.summary()
                    summary["breakdown"] = breakdown(
                        (before[0], after[0]), (before[1], after[1]), summary["mean_ms"]
                    )
                    # CPU ms each process spent per successful request: on 2 cores their sum bounds QPS.
                    names = [s.module for s in procs] + ["load generator"]
                    summary["cpu_ms_per_request"] = {
                        n: round((b - a) * 1e3 / max(1, result.ok), 3)
                        for n, a, b in zip(names, cpu0, cpu1, strict=True)
                        if a is not None and b is not None
                    }
                    levels.append(summary)
                    _print_level(summary)
        finally:
            gateway.stop()
        user.stop()
        gc.collect()
        baseline = asyncio.run(_baseline(corpus, candidate.address, levels, args))
    finally:
        user.stop()
        candidate.stop()
    return {
        "corpus": corpus.name, "description": corpus.description, "device": device,
        "startup_s": round(startup_s, 1), "levels": levels, "baseline": baseline,
        "rss": rss.summary(), "rss_samples": rss.samples[:: max(1, len(rss.samples) // 400)],
    }  # fmt: skip


def _opt(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


def _warm_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "seconds": min(args.seconds, 2.0), "max_requests": 2000})


async def _baseline(
    corpus: e2e_corpus.Corpus, candidate: str, levels: list[dict], args: argparse.Namespace
) -> list[dict]:
    from bench.e2e_baseline import Baseline

    base = await Baseline.load(
        str(corpus.checkpoint), candidate, args.device, args.cpu_tower, args.workdir / "tower-cache"
    )
    rows = []
    for level in progress_over(levels, f"{corpus.name}: baseline levels", unit="level"):
        b = level["breakdown"]
        bu = round(b["user_batch_mean"] or 1)
        bg = round(b["gateway_batch_mean"] or 1)
        row = {
            "concurrency": level["concurrency"],
            **base.measure(corpus.requests, bu, bg, args.baseline_seconds),
        }
        rows.append(row)
        print_above(f"  baseline  c={row['concurrency']:>3} (Bu={bu}, Bg={bg}): p50 {row['p50_ms']:.2f} ms "
                    f"(user {row['user_p50_ms']:.2f} + index {row['index_p50_ms']:.2f}), "
                    f"ceiling {row['qps']:.0f}/s")  # fmt: skip
    return rows


def _print_level(s: dict) -> None:
    b = s["breakdown"]
    errors = ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "none"
    print_above(f"  stack     c={s['concurrency']:>3}: {s['qps']:8.1f} QPS  p50 {s['p50_ms']:7.2f}  "
                f"p90 {s['p90_ms']:7.2f}  "
                f"p99 {s['p99_ms']:7.2f} ms  batches user {b['user_batch_mean'] or 0:.1f} / gateway "
                f"{b['gateway_batch_mean'] or 0:.1f}  errors {errors}")  # fmt: skip
    cpu = "  ".join(f"{k} {v:.2f}" for k, v in s.get("cpu_ms_per_request", {}).items())
    print_above(f"              CPU ms/request: {cpu}")


def targets(run: dict) -> dict[str, dict]:
    """Each target of the issue: the measured value, the bound and whether it is met."""
    by = {lv["concurrency"]: lv for lv in run["levels"]}
    base = {row["concurrency"]: row for row in run["baseline"]}
    out: dict[str, dict] = {}
    if 1 in by and 1 in base:
        gap = by[1]["p50_ms"] - base[1]["p50_ms"]
        out["c1_p50_overhead_ms"] = {"value": round(gap, 3), "bound": "<= 2", "met": gap <= 2.0}
    if 1 in by and 32 in by:
        ratio = by[32]["qps"] / by[1]["qps"] if by[1]["qps"] else 0.0
        tail = by[32]["p99_ms"] / by[32]["p50_ms"] if by[32]["p50_ms"] else float("inf")
        out["c32_qps_over_c1"] = {"value": round(ratio, 2), "bound": ">= 3", "met": ratio >= 3.0}
        out["c32_p99_over_p50"] = {"value": round(tail, 2), "bound": "< 4", "met": tail < 4.0}
    errors = sum(sum(lv["errors"].values()) for lv in run["levels"])
    out["errors"] = {"value": errors, "bound": "== 0", "met": errors == 0}
    for name in ("gateway", "user_service"):
        if name in run["rss"]:
            growth = run["rss"][name]["growth_pct"]
            out[f"rss_{name}_growth_pct"] = {
                "value": growth,
                "bound": f"<= {RSS_FLAT_PCT}",
                "met": abs(growth) <= RSS_FLAT_PCT,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 s per level (sanity run)")
    p.add_argument(
        "--corpus", nargs="+", default=["movielens", "synthetic"], choices=["movielens", "synthetic"]
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument(
        "--seconds", type=float, default=None, help="measurement time per level (default 20, quick 4)"
    )
    p.add_argument("--max-requests", type=int, default=1_000_000, help="per level")
    p.add_argument("--baseline-seconds", type=float, default=None, help="per level (default 5, quick 1.5)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--synthetic-items", type=int, default=1_000_000)
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "movielens")
    p.add_argument(
        "--train-if-missing", action="store_true", help="run `python -m training` when artifacts are absent"
    )
    p.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda", "auto"], help="gateway and user_service"
    )
    p.add_argument("--user-max-wait-ms", type=float, help="user_service batching wait (default: its own)")
    p.add_argument("--cpu-tower", default="onnx", choices=CPU_TOWERS, help="user tower runtime on cpu")
    p.add_argument("--gateway-max-wait-ms", type=float, help="gateway batching wait (default: its own)")
    p.add_argument("--workdir", type=Path, default=RESULTS / "e2e_work", help="corpora, caches, service logs")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.seconds = args.seconds or (4.0 if args.quick else 20.0)
    args.baseline_seconds = args.baseline_seconds or (1.5 if args.quick else 5.0)
    machine = machine_info()
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    failed = False
    for name in args.corpus:
        try:
            if name == "movielens":
                corpus = e2e_corpus.movielens(args.artifacts, args.k, args.train_if_missing)
            else:
                corpus = e2e_corpus.synthetic(args.workdir, args.synthetic_items, args.k)
        except e2e_corpus.CorpusMissing as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            failed = True
            continue
        run = run_corpus(corpus, args, args.workdir)
        run["targets"] = targets(run)
        run.update(machine=machine, command=" ".join([Path(sys.executable).name, *sys.argv]),
                   settings={k: str(v) for k, v in vars(args).items()})  # fmt: skip
        for key, t in run["targets"].items():
            print(f"  target {key}: {t['value']} (want {t['bound']}) {'MET' if t['met'] else 'NOT MET'}")
        print(f"wrote {write_json(args.out_dir / f'e2e_{name}{suffix}.json', run)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
