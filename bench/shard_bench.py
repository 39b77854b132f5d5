"""Benchmark (issue 15): what sharding costs. One corpus, one candidate_service and one user_service;
an unsharded gateway beside a router with S gateway shards, all on loopback, driven in alternating
turns (--rounds of them, the order reversed every other round) with the same requests at c=1 and
c=8; plus the router's merge alone (S lists of k=1000 -> the top 1000).

The fan-out adds a hop (router -> shards) and a merge; on one machine the shards also share the CPUs
with everything else, so the figure is an upper bound of what separate machines would pay. Each
level also prints the CPU time per request of every process (user_service and the load generator
included): where the CPUs are saturated (c=8 on two cores), that is what sets the p50.

    .venv/bin/python bench/shard_bench.py --quick          # 100k items, S=2, ~2.5 minutes
    .venv/bin/python bench/shard_bench.py                  # 1M items, S=2

Target: p50 of the router at most 2 ms above the unsharded gateway's at c=1 and c=8. Writes
results/shard_bench.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import e2e_corpus
from bench.common import ServiceProcess, machine_info, mean_ms, metric_delta, wait_serving, write_json
from bench.e2e_bench import WARM_UP_REQUESTS, drive
from bench.loadgen import LoadResult
from retrieval_gateway.sharding import ShardHits, merge_hits
from shared.progress import print_above, progress_over
from shared.threads import usable_cpus


class _ThisProcess:
    """The load generator (this process) where the CPU accounting expects a ServiceProcess."""

    @staticmethod
    def cpu() -> float:
        return time.process_time()


_LOADGEN = _ThisProcess()


def _roles(processes: int) -> list[str]:
    """Names of a turn's gateway processes: one gateway, or a router and its shards."""
    return ["gateway"] if processes == 1 else ["router", *(f"shard{i}" for i in range(processes - 1))]


def merge_timing(shards: int, k: int, reps: int = 200) -> dict[str, float]:
    """The router's merge alone: `shards` sorted lists of k hits (random scores) -> the top k."""
    rng = np.random.default_rng(0)
    parts = []
    for s in range(shards):
        scores = np.sort(rng.random(k, dtype=np.float32))[::-1].copy()
        parts.append(ShardHits(np.arange(s * k, (s + 1) * k, dtype=np.int64), np.zeros(k, np.int64), scores,
                               [{}] * k))  # fmt: skip
    merge_hits(parts, k)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        merge_hits(parts, k)
        times.append(time.perf_counter() - t0)
    return {
        "shards": shards,
        "k": k,
        "p50_ms": float(np.median(times) * 1e3),
        "min_ms": float(min(times) * 1e3),
    }


def stages(scrapes: list[tuple[dict[str, float], dict[str, float]]]) -> dict[str, float | None]:
    """Where a request's time went, from the services' own histograms (before, after one level): the
    gateway's (or router's) stages and its mean queries per scoring batch, then, for a router, each
    shard's ScoreShard handling (decode, scan, encode). A router's "batch" (its fan-out) minus a
    shard's "ScoreShard" is the hop: gRPC both ways. "scoring" is "batch" plus the wait for a batch to
    form."""
    lat = "twotower_gateway_latency_seconds"
    (gb, ga), shards = scrapes[0], scrapes[1:]
    out = {
        "total": mean_ms(ga, gb, lat, '{stage="total"}'),
        "user_encode": mean_ms(ga, gb, lat, '{stage="user_encode"}'),
        "scoring": mean_ms(ga, gb, lat, '{stage="scoring"}'),
        "batch": mean_ms(ga, gb, "twotower_gateway_batch_compute_seconds"),  # a router's: the fan-out
    }
    batches = metric_delta(ga, gb, "twotower_gateway_batch_size_count")
    out["queries_per_batch"] = (
        metric_delta(ga, gb, "twotower_gateway_batch_size_sum") / batches if batches else None
    )
    method = '{method="/twotower.v1.ShardScorer/ScoreShard"}'
    for i, (sb, sa) in enumerate(shards):
        out[f"shard{i}_ScoreShard"] = mean_ms(sa, sb, "twotower_rpc_seconds", method)
    return {k: None if v is None else round(v, 3) for k, v in out.items()}


def measure_level(
    c: int, gateways: dict[str, tuple[ServiceProcess, list[ServiceProcess]]], payloads: list[bytes],
    shared: dict[str, ServiceProcess], args: argparse.Namespace,
) -> dict[str, object]:  # fmt: skip
    """One concurrency level: `args.rounds` rounds of one turn per gateway, the order reversed every
    other round (A B, B A, ...), so that a drift of the shared machine's load (other jobs, a slow
    minute) falls on both alike. The added p50 is the median over rounds of router minus unsharded in
    the same round; each gateway's row pools its turns. CPU per request (median over its turns) counts
    each process of a turn's stack, user_service and the load generator (this process) included: at
    c=8 the two CPUs are the bottleneck, so what the fan-out adds to a request's CPU is what it adds
    to the latency (the machine serves c / p50 requests a second)."""
    turns: dict[str, list[LoadResult]] = {name: [] for name in gateways}
    cpu: dict[str, list[dict[str, float]]] = {name: [] for name in gateways}
    before = {name: [g.metrics() for g in watched] for name, (_, watched) in gateways.items()}
    names = list(gateways)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            watched = gateways[name][1]
            processes = {**dict(zip(_roles(len(watched)), watched, strict=True)), **shared}
            cpu_before = {role: p.cpu() for role, p in processes.items()}
            result = asyncio.run(drive(gateways[name][0].address, payloads, c, args))
            answered = result.ok + result.error_count() + WARM_UP_REQUESTS
            cpu[name].append({
                role: 1e3 * (p.cpu() - cpu_before[role]) / answered for role, p in processes.items()
            })  # fmt: skip
            turns[name].append(result)
    row: dict[str, object] = {"concurrency": c, "rounds": args.rounds}
    for name, (_, watched) in gateways.items():
        after = [g.metrics() for g in watched]  # a gateway's metrics move only in its own turns
        summary = LoadResult.combine(turns[name]).summary()
        summary["turn_p50_ms"] = [round(t.percentile_ms(50), 3) for t in turns[name]]
        summary["stages_ms"] = stages(list(zip(before[name], after, strict=True)))
        summary["cpu_ms_per_request"] = {
            role: round(float(np.median([t[role] for t in cpu[name]])), 3) for role in cpu[name][0]
        }
        row[name] = summary
        print_above(
            f"  c={c:3d} {name:>12}: {summary['qps']:7.1f} QPS  p50 {summary['p50_ms']:7.2f}  "
            f"p99 {summary['p99_ms']:7.2f} ms  errors {summary['errors'] or 'none'}  "
            f"(turns' p50: {', '.join(f'{t:.1f}' for t in summary['turn_p50_ms'])})"
        )
        print_above("                 mean ms: " + "  ".join(
            f"{k} {v:.2f}" for k, v in summary["stages_ms"].items() if v is not None
        ))  # fmt: skip
        per_request = summary["cpu_ms_per_request"]
        print_above(
            f"                 CPU ms per request: total {sum(per_request.values()):.2f}  "
            + "  ".join(f"{k} {v:.2f}" for k, v in per_request.items())
        )
    unsharded, routed = (turns[name] for name in names)
    added = [b.percentile_ms(50) - a.percentile_ms(50) for a, b in zip(unsharded, routed, strict=True)]
    row["p50_added_ms"] = round(float(np.median(added)), 3)
    row["p50_added_per_round_ms"] = [round(x, 3) for x in added]
    print_above(
        f"  c={c:3d} router p50 - unsharded p50 = {row['p50_added_ms']:+.2f} ms, median of "
        f"{args.rounds} rounds ({', '.join(f'{x:+.1f}' for x in added)}) (target <= 2)"
    )
    # Where the CPUs are the bottleneck, QPS ~ cores / CPU per request and p50 ~ c / QPS: the fan-out's
    # extra CPU per request, times c / cores, is the p50 it adds (an estimate, printed beside the
    # measurement; at c=1 the CPUs are not saturated and it does not apply).
    single_cpu, routed_cpu = (sum(row[name]["cpu_ms_per_request"].values()) for name in names)
    extra, cpus = routed_cpu - single_cpu, usable_cpus()
    row["cpu_added_ms_per_request"] = round(extra, 3)
    row["p50_added_if_cpu_bound_ms"] = round(c * extra / cpus, 3)
    print_above(
        f"  c={c:3d} the fan-out's CPU per request: {extra:+.2f} ms; if the {cpus} CPUs are the bottleneck, "
        f"that adds c x {extra:.2f} / {cpus} = {row['p50_added_if_cpu_bound_ms']:+.2f} ms of p50"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100k items, shorter levels")
    p.add_argument("--items", type=int, default=None, help="corpus size (default 1M, quick 100k)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--k", type=int, default=100)
    p.add_argument(
        "--attributes", action="store_true", help="items with two attributes each (a title, a kind)"
    )
    p.add_argument(
        "--shard-torch-threads", type=int, default=None,
        help="each shard's --torch-threads (default: the gateways' own default, the usable CPUs)",
    )  # fmt: skip
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seconds", type=float, default=None, help="per turn (default 10, quick 3)")
    p.add_argument("--rounds", type=int, default=3, help="alternating turns per gateway and level")
    p.add_argument("--max-requests", type=int, default=20_000)
    p.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    p.add_argument("--out", type=Path, default=Path("results/shard_bench.json"))
    args = p.parse_args(argv)
    n = args.items or (100_000 if args.quick else 1_000_000)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")

    corpus = e2e_corpus.synthetic(args.workdir, n, args.k, attributes=args.attributes)
    payloads = [r.SerializeToString() for r in corpus.requests]
    logs = args.workdir / "logs" / "shard_bench"
    # One item store per corpus (its folder names size, seed and attributes): the store is the corpus of
    # record, and candidate_service rightly refuses to apply another corpus's items file over it.
    cache = args.workdir / "cache" / f"shard_bench_{corpus.items.parent.name}"
    ck = ["--checkpoint", str(corpus.checkpoint)]
    candidate = ServiceProcess(
        "candidate_service", [*ck, "--items", str(corpus.items), "--cache-dir", str(cache)], logs
    )
    user = ServiceProcess("user_service", [*ck, "--device", "cpu"], logs)
    started = [candidate, user]
    levels: list[dict] = []
    try:
        for s in (candidate, user):
            s.start()
        for s in (candidate, user):
            asyncio.run(wait_serving(s))
        upstream = ["--user-service", user.address, "--device", "cpu"]
        single = ServiceProcess(
            "retrieval_gateway", [*upstream, "--candidate-service", candidate.address], logs
        )
        role = ["--candidate-service", candidate.address, "--role", "shard", "--num-shards", str(args.shards)]
        if args.shard_torch_threads is not None:
            role += ["--torch-threads", str(args.shard_torch_threads)]
        shards = [
            ServiceProcess(
                "retrieval_gateway", [*upstream, *role, "--shard-index", str(i)], logs / f"shard{i}"
            )
            for i in range(args.shards)
        ]
        for g in (single, *shards):
            started.append(g.start())
        for g in (single, *shards):
            asyncio.run(wait_serving(g))
        router = ServiceProcess(
            "retrieval_gateway",
            [*upstream, "--role", "router", "--shard-addresses", *(g.address for g in shards)],
            logs / "router",
        )
        started.append(router.start())
        asyncio.run(wait_serving(router))
        gateways = {"unsharded": (single, [single]), f"router S={args.shards}": (router, [router, *shards])}
        for c in progress_over(args.concurrency, "shard_bench levels", unit="level"):
            shared = {"user_service": user, "loadgen": _LOADGEN}
            levels.append(measure_level(c, gateways, payloads, shared, args))
    finally:
        for s in reversed(started):
            s.stop()
    merges = [merge_timing(s, 1000) for s in (2, 4, 8)]
    for m in merges:
        print(f"  merge of {m['shards']} x top-{m['k']}: p50 {m['p50_ms']:.3f} ms (min {m['min_ms']:.3f})")
    setup = {"items": n, "attributes": args.attributes, "shards": args.shards, "k": args.k}
    out = write_json(args.out, {"machine": machine_info(), **setup, "levels": levels, "merge": merges})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
