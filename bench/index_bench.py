"""Benchmark: the gateway index's exact top-k against FAISS IndexFlatIP, same corpus, same queries.

N random unit vectors of width D (post ids = row + 1, all rows live), k nearest by inner product for
batches of B queries. Rows per method, dtype and batch size: median ms per batch, queries/s, and
recall@k against the exact fp32 result of the same queries.

- `topk fp32` / `topk bf16`: retrieval_gateway.topk.exact_topk with a deleted-rows mask and post-id
  tie order, exactly as CorpusIndex.search calls it (bf16 storage is widened to fp32 slice by slice).
- `topk fp32 fused` / `topk bf16 fused` (CPU, B=1): the same with fused_gemv=True (a
  torch.compile'd kernel that reads each row once, widening bf16 in registers; its one-time compile
  is reported separately as compile_s).
- `index.search fp32` / `index.search bf16`: the whole CorpusIndex.search path (locking,
  exclusions, the hits' columns), for each of --index-dtypes (default: the --dtypes).
- `index.search fp32 wrapper` (investigation only): the same with the top-k answered from a memo of
  its own results: what the path costs around the top-k.
- `bf16 native mm` (investigation only): torch.mm in bf16 with bf16 scores; shown for speed and
  recall, not used by the index (bf16 scores keep ~3 significant digits).
- `bf16 gemm bf16 query` (investigation only, cuda): torch.mm(out_dtype=fp32) on the bf16-rounded
  query, fp32 scores; what the index's split query (hi + lo, 2B rows) costs against it.
- `topk bf16 1-term query` (investigation only, cuda): exact_topk's own path with the bf16-rounded
  query alone (no lo term): the price and the recall of the second term inside the index's loop.
- `faiss flat fp32`: faiss.IndexFlatIP (benchmark-only dependency `faiss-cpu`), CPU only; skipped
  with a note when faiss is not installed.

On cuda every timed call ends with the result on the host (the serving path's copy back), and the
timer synchronises the device before and after each call.

    .venv/bin/python bench/index_bench.py            # full: 1M x 64, k=100, B in {1, 32}, cpu
    .venv/bin/python bench/index_bench.py --quick    # 200k x 64, well under a minute
    python3 bench/index_bench.py --device cuda --n 10000000 --k 1000 --dtypes fp32 bf16 --index-dtypes bf16

Targets (CPU): fp32 no slower than FAISS at both batch sizes; bf16 recall@k >= 0.99 and >= 1.8x
faster than fp32 at batch 1. Writes results/index_bench.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from retrieval_gateway.index import CorpusIndex, Query  # noqa: E402
from retrieval_gateway.topk import DEVICE_MAX_SCORE_ELEMENTS, accelerator_topk, exact_topk  # noqa: E402
from shared.threads import INTRA_OP  # noqa: E402

FP = "bench"


def timed(fn, device: torch.device, reps: int, min_seconds: float) -> list[float]:
    """Per-call seconds: one warm-up, then at least `reps` calls and `min_seconds` of calls."""
    fn()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < reps or time.perf_counter() - began < min_seconds:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50 * reps:
            break
    return times


def _wrapper_only(search):
    """`search` (an index.search call) with the top-k answered from a memo of its own earlier results
    for the same queries: what CorpusIndex.search costs around the top-k (batching the queries, the
    masks, the hits' ids and attributes; on cuda plus one copy of the queries to key the memo)."""
    import retrieval_gateway.index as index_module

    real = index_module.exact_topk
    memo: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def remembered(queries, *args, **kwargs):
        key = queries.cpu().numpy().tobytes()
        if key not in memo:
            memo[key] = real(queries, *args, **kwargs)
        return tuple(t.clone() for t in memo[key])

    def run(q):
        index_module.exact_topk = remembered
        try:
            return search(q)
        finally:
            index_module.exact_topk = real

    return run


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |got ∩ exact| / k."""
    k = exact.shape[1]
    return float(
        np.mean([len(set(g[:k].tolist()) & set(e.tolist())) / k for g, e in zip(got, exact, strict=True)])
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=10, help="timed calls per row (at least)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds per row (at least)")
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: torch's)")
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--index-dtypes", nargs="*", choices=["fp32", "bf16"], default=None,
                   help="dtypes of the index.search rows (default: --dtypes; none: no such row)")  # fmt: skip
    p.add_argument("--no-fused", action="store_true", help="skip the torch.compile'd bf16 kernel row")
    p.add_argument("--no-investigation", action="store_true", help="skip the bf16 native-mm row")
    p.add_argument("--quick", action="store_true", help="200k rows, 3 reps")
    p.add_argument("--out", default=str(REPO / "results" / "index_bench.json"))
    args = p.parse_args()
    if args.quick:
        args.n, args.reps, args.min_seconds = min(args.n, 200_000), 3, 0.2
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    INTRA_OP.configure(threads)  # index.search sizes its threads per batch, up to the same limit
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(1)
    queries = torch.nn.functional.normalize(torch.randn(max(args.batches), args.dim, generator=gen), dim=1)
    # The corpus is drawn where it will live: 10M x 64 normals take ~20 s on a CPU, ms on a GPU.
    dgen = torch.Generator(device).manual_seed(0)
    corpus = torch.randn(args.n, args.dim, generator=dgen, device=device)
    corpus = torch.nn.functional.normalize(corpus, dim=1)  # [N, D] fp32 on the device
    post_ids = torch.arange(1, args.n + 1)

    faiss_index = None
    faiss = _faiss() if not args.no_faiss and device.type == "cpu" else None
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
        faiss_index = faiss.IndexFlatIP(args.dim)
        faiss_index.add(corpus.numpy())

    n_queries = queries.shape[0]
    ties, ties_host = post_ids.to(device), post_ids
    masked = torch.tensor([args.n - 1])  # one deleted row, on the host as exact_topk prefers
    reference = corpus.to(device)
    # The exact fp32 answer for every query: the recall reference of every row.
    exact = ties_host[exact_topk(queries.to(device), reference, args.k, tie_ids=ties)[1].cpu()].numpy()
    del reference
    rows: list[dict] = []

    def measure(name: str, batch: int, search) -> dict:
        """Time `search` on the first `batch` queries; recall over all queries, `batch` at a time."""
        t0 = time.perf_counter()
        search(queries[:batch])  # first call: compiles the fused kernel when there is one
        first_s = time.perf_counter() - t0
        times = timed(lambda: search(queries[:batch]), device, args.reps, args.min_seconds)
        got = np.concatenate([search(queries[i : i + batch]) for i in range(0, n_queries, batch)])
        rows.append(_row(name, batch, times, recall(got, exact)))
        if "fused" in name:
            rows[-1]["compile_s"] = first_s
        return rows[-1]

    for dtype_name in args.dtypes:
        matrix = corpus.to(device, torch.float32 if dtype_name == "fp32" else torch.bfloat16)
        variants = [(f"topk {dtype_name}", False)]
        if device.type == "cpu" and not args.no_fused:
            variants.append((f"topk {dtype_name} fused", True))
        for name, fused in variants:
            for b in args.batches:
                if fused and b != 1:
                    continue  # the fused kernel serves single queries only

                def search(q, matrix=matrix, fused=fused):
                    top = exact_topk(
                        q.to(device), matrix, args.k, masked_rows=masked, tie_ids=ties, fused_gemv=fused
                    )
                    return ties_host[top[1].clamp(min=0)].numpy()  # rows on the host from any device

                measure(name, b, search)
        del matrix

    for dtype_name in args.dtypes if args.index_dtypes is None else args.index_dtypes:  # serving path
        index = CorpusIndex(device, dtype_name)
        # Embeddings arrive on the host, as the follower decodes them from the stream.
        host = corpus.cpu()
        index.load_snapshot(1, FP, post_ids.numpy(), np.zeros(args.n, np.int64), host, [{}] * args.n)
        del host
        for b in args.batches:

            def search(q, index=index):
                results = index.search([Query(v, FP, args.k) for v in q])
                return np.stack([r.post_ids for r in results])

            measure(f"index.search {dtype_name}", b, search)
            if not args.no_investigation:
                measure(f"index.search {dtype_name} wrapper", b, _wrapper_only(search))
        del index

    if faiss_index is not None:
        for b in args.batches:
            measure("faiss flat fp32", b, lambda q: faiss_index.search(q.numpy(), args.k)[1] + 1)

    if not args.no_investigation and "bf16" in args.dtypes:
        cb = corpus.to(device, torch.bfloat16)
        for b in args.batches:

            def native(q, cb=cb):
                return (
                    torch.topk((q.to(device, torch.bfloat16) @ cb.T).float(), args.k, dim=1)[1].cpu().numpy()
                    + 1
                )

            measure("bf16 native mm (bf16 scores)", b, native)
            if device.type == "cuda":  # no CPU kernel for mm(out_dtype)

                def gemm(q, cb=cb):
                    scores = torch.mm(q.to(device, torch.bfloat16), cb.T, out_dtype=torch.float32)
                    return torch.topk(scores, args.k, dim=1)[1].cpu().numpy() + 1

                measure("bf16 gemm bf16 query (fp32 scores)", b, gemm)

                def one_term(q, cb=cb):
                    chunk_elements = DEVICE_MAX_SCORE_ELEMENTS["cuda"]
                    top = accelerator_topk(
                        q.to(device), cb, args.k, masked, None, ties, chunk_elements, None,
                        gemm=True, query_terms=1,
                    )  # fmt: skip
                    return ties_host[top[1].clamp(min=0)].numpy()

                measure("topk bf16 1-term query", b, one_term)
        del cb

    _print(rows, args, threads, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    report = {
        "config": {"n": args.n, "dim": args.dim, "k": args.k, "device": str(device), "threads": threads,
                   "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu,
                   "machine": platform.processor() or platform.machine(), "quick": args.quick},
        "rows": rows,
        "ratios": _ratios(rows),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return 0


def _faiss():
    """faiss, or None with a note when it is not installed (benchmark-only: pip install faiss-cpu)."""
    try:
        import faiss
    except ImportError:
        print("faiss not installed: no FAISS rows (pip install faiss-cpu for them)", file=sys.stderr)
        return None
    return faiss


def _row(method: str, batch: int, times: list[float], rec: float | None) -> dict:
    med = statistics.median(times)
    return {"method": method, "batch": batch, "ms_median": med * 1e3, "ms_min": min(times) * 1e3,
            "qps": batch / med, "recall": rec, "calls": len(times)}  # fmt: skip


def _ratios(rows: list[dict]) -> dict[str, float]:
    """The target ratios: faiss/topk-fp32 time (>= 1 means fp32 no slower), fp32/bf16 time at B=1."""
    ms = {(r["method"], r["batch"]): r["ms_median"] for r in rows}
    out = {}
    for (method, b), t in ms.items():
        if method in ("topk fp32", "topk fp32 fused") and ("faiss flat fp32", b) in ms:
            out[f"faiss_over_{method.replace(' ', '_')}_b{b}"] = ms[("faiss flat fp32", b)] / t
        if method == "topk bf16" and ("topk fp32", b) in ms:
            out[f"fp32_over_bf16_b{b}"] = ms[("topk fp32", b)] / t
        if method == "topk bf16 fused" and ("topk fp32", b) in ms:
            out[f"fp32_over_bf16_fused_b{b}"] = ms[("topk fp32", b)] / t
        if method == "topk bf16 fused" and ("topk fp32 fused", b) in ms:
            out[f"fp32_fused_over_bf16_fused_b{b}"] = ms[("topk fp32 fused", b)] / t
    return out


def _print(rows: list[dict], args, threads: int, device: torch.device) -> None:
    print(f"\nexact top-{args.k} over {args.n:,} x {args.dim} unit vectors on {device} ({threads} threads)\n")
    print(f"{'method':<30} {'B':>4} {'ms/batch':>10} {'ms min':>9} {'queries/s':>11} {'recall@k':>9}")
    for r in rows:
        rec = "-" if r["recall"] is None else f"{r['recall']:.4f}"
        cols = f"{r['ms_median']:>10.2f} {r['ms_min']:>9.2f} {r['qps']:>11.1f} {rec:>9}"
        print(f"{r['method']:<30} {r['batch']:>4} {cols}")
    for name, value in _ratios(rows).items():
        print(f"{name}: {value:.2f}x")
    for r in rows:
        if "compile_s" in r:
            print(f"{r['method']}: one-time compile {r['compile_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
