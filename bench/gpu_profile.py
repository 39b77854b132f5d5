"""Where the time goes on cuda (issue 14): a breakdown sized for a GPU machine's few minutes.

gpu_check.sh says whether the targets are met; this says why not. It times the pieces of the index's
search (the fp32-output GEMM, torch.topk, the tie-ordered merge, the result columns) against
alternatives for the top-k (block-max prefilters), profiles `exact_topk` and `CorpusIndex.search`
with torch.profiler (kernel and host time per op), times the user tower's request path at batch 1
(proto conversion, features, CUDA-graph replay), and runs bench/grpc_floor.py for the gRPC floor.

    python3 bench/gpu_profile.py --out results/gpu_profile            # on the GPU machine
    .venv/bin/python bench/gpu_profile.py --device cpu --n 200000 --quick   # rehearsal here

Writes gpu_profile.json (timings) and profile_*.txt (torch.profiler tables) to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from bench import e2e_corpus  # noqa: E402
from bench.index_bench import timed  # noqa: E402
from retrieval_gateway import topk_triton  # noqa: E402
from retrieval_gateway.index import CorpusIndex, Query  # noqa: E402
from retrieval_gateway.topk import (  # noqa: E402
    DEVICE_MAX_SCORE_ELEMENTS,
    _split_product,
    accelerator_topk,
    exact_topk,
)
from retrieval_gateway.topk_chunks import block_maxima, lex_top, split_query  # noqa: E402
from retrieval_gateway.topk_device import PREFILTER_BLOCK, PREFILTER_MIN_BATCH  # noqa: E402
from shared.convert import user_context_from_proto  # noqa: E402
from shared.model.features import featurize_users, validate_user  # noqa: E402
from user_service.encoder import load_encoder  # noqa: E402

FP = "profile"


def stats(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    return {
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.median(ms)),
        "min_ms": float(ms.min()),
        "calls": len(ms),
    }


def prefilter_topk(scores: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototype: the top-k of scores [B, N] among the k blocks (of `block` columns) whose maxima are
    largest. Exact up to ties at the blocks' cut: a block left out has a max no larger than the k-th
    largest block max, which is at most the k-th best score (k blocks each hold a score at least
    that large)."""
    b, n = scores.shape
    maxima = block_maxima(scores, block)
    kb = min(k, maxima.shape[1])
    top_blocks = torch.topk(maxima, kb, dim=1, sorted=False).indices  # [B, kb]
    cols = (top_blocks[:, :, None] * block + torch.arange(block, device=scores.device)).view(b, -1)
    cols = cols.clamp_(max=n - 1)  # the tail block's overhang repeats the last column (dropped below)
    cand = scores.gather(1, cols)
    values, at = torch.topk(cand, min(k, cand.shape[1]), dim=1)
    return values, cols.gather(1, at)


def topk_pieces(device: torch.device, n: int, dim: int, k: int, batches: list[int], seconds: float) -> dict:
    """Each piece of the search on an n x dim bf16 matrix, and prefilter alternatives, per batch size."""
    gen = torch.Generator(device=device).manual_seed(0)
    matrix = torch.nn.functional.normalize(torch.randn(n, dim, device=device, generator=gen), dim=1)
    matrix = matrix.to(torch.bfloat16)
    index = CorpusIndex(device, "bf16")
    index.load_snapshot(1, FP, np.arange(1, n + 1, dtype=np.int64), np.zeros(n, np.int64), matrix, [{}] * n)
    out: dict[str, dict] = {}
    for b in batches:
        q = torch.nn.functional.normalize(torch.randn(b, dim, device=device, generator=gen), dim=1)
        split = split_query(q, torch.bfloat16)
        scores = _split_product(split, matrix, b)
        exact_s, exact_r = (t.to(device) for t in exact_topk(q, matrix, k))  # (host results)
        queries = [Query(v, FP, k) for v in q.cpu()]
        ties = torch.arange(n, device=device)
        cand_s = torch.cat([exact_s, exact_s], dim=1)
        cand_r = torch.cat([exact_r, exact_r], dim=1)
        pieces: dict[str, Callable[[], object]] = {
            "exact_topk": lambda q=q: exact_topk(q, matrix, k),
            "index.search": lambda queries=queries: index.search(queries),
            "gemm 2-term (fp32 scores)": lambda split=split, b=b: _split_product(split, matrix, b),
            "gemm 1-term (fp32 scores)": lambda split=split, b=b: _split_product(split[:b], matrix, b),
            "torch.topk k+1 of scores": lambda scores=scores: torch.topk(scores, k + 1, dim=1),
            "torch.topk k+1 unsorted": lambda scores=scores: torch.topk(scores, k + 1, dim=1, sorted=False),
            "lex_top of 2k candidates": lambda s=cand_s, r=cand_r, t=ties: lex_top(s, r, t[r], k),
            "scores.cpu() [B, k] + rows": lambda s=exact_s, r=exact_r: (s.cpu(), r.cpu()),
        }
        for block in (256, 1024, 4096):
            pieces[f"prefilter block {block} (from scores)"] = lambda s=scores, blk=block: prefilter_topk(
                s, k, blk
            )
        row = {}
        for name, fn in pieces.items():
            row[name] = stats(timed(fn, device, 5, seconds))
        for block in (256, 1024, 4096):  # same rows as the exact search? (random data: no ties)
            _, rows = prefilter_topk(scores, k, block)
            pairs = zip(rows.cpu().tolist(), exact_r.cpu().tolist(), strict=True)
            same = all(set(a) == set(e) for a, e in pairs)
            row[f"prefilter block {block} (from scores)"]["same_rows_as_exact"] = same
        out[f"B={b}"] = row
        print(f"\n{n:,} x {dim} bf16, k={k}, B={b} on {device}", flush=True)
        for name, r in row.items():
            ms = f"mean {r['mean_ms']:8.3f}  p50 {r['p50_ms']:8.3f}  min {r['min_ms']:8.3f} ms"
            print(f"  {name:40s} {ms}", flush=True)
    return {"matrix": matrix, "index": index, "results": out}


def prefilter_sweep(device: torch.device, matrix: torch.Tensor, k: int, seconds: float) -> dict:
    """accelerator_topk with the prefilter forced on / off per batch size, and its block size at B=32:
    where PREFILTER_MIN_BATCH and PREFILTER_BLOCK come from."""
    elements = DEVICE_MAX_SCORE_ELEMENTS.get(device.type, 1 << 22)
    out: dict[str, dict] = {}

    def run(q: torch.Tensor, min_batch: int, block: int = PREFILTER_BLOCK) -> object:
        return accelerator_topk(q, matrix, k, None, None, None, elements, None, gemm=True,
                                prefilter_min_batch=min_batch, prefilter_block=block)  # fmt: skip

    print(f"\nprefilter sweep, {matrix.shape[0]:,} rows, k={k} (ms p50: off / on)", flush=True)
    for b in (1, 2, 4, 8, 16, 32, 64):
        q = torch.nn.functional.normalize(torch.randn(b, matrix.shape[1], device=device), dim=1)
        off = stats(timed(lambda q=q: run(q, 1 << 30), device, 5, seconds))
        on = stats(timed(lambda q=q: run(q, 1), device, 5, seconds))
        same = torch.equal(run(q, 1 << 30)[1], run(q, 1)[1])
        out[f"B={b}"] = {"off": off, "on": on, "same_rows": same}
        print(f"  B={b:3d}  {off['p50_ms']:8.3f} / {on['p50_ms']:8.3f}  same rows {same}", flush=True)
        if b == 32:
            for block in (64, 256, 512):
                r = stats(timed(lambda q=q, block=block: run(q, 1, block), device, 5, seconds))
                out[f"B={b} block {block}"] = r
                print(f"  B={b:3d}  block {block}: {r['p50_ms']:8.3f}", flush=True)
    return out


def fused_sweep(device: torch.device, matrix: torch.Tensor, k: int, seconds: float) -> dict:
    """accelerator_topk with the split query scored by cuBLAS (GEMM, add, block maxima) or by
    topk_triton's fused kernel, per batch size; the kernel alone against what it replaces; the same
    rows with deleted rows and exclusions. Where FUSED_MIN_BATCH and the kernel's tiling come from."""
    elements = DEVICE_MAX_SCORE_ELEMENTS.get(device.type, 1 << 22)
    n, dim = matrix.shape
    gen = torch.Generator().manual_seed(3)
    masked = torch.randperm(n, generator=gen)[:1000]
    out: dict[str, object] = {"fused_scores_ok": topk_triton.fused_scores_ok(device, matrix.dtype, 128, dim)}

    def run(q: torch.Tensor, fused: bool, min_batch: int = PREFILTER_MIN_BATCH, exclude=None) -> object:
        return accelerator_topk(q, matrix, k, masked, exclude, None, elements, None, gemm=True,
                                prefilter_min_batch=min_batch, fused=fused)  # fmt: skip

    print(f"\nfused sweep, {n:,} rows, k={k}, 1000 deleted (ms p50: cuBLAS / fused)", flush=True)
    for b in (1, 2, 8, 32, 64):
        q = torch.nn.functional.normalize(torch.randn(b, dim, device=device), dim=1)
        row: dict[str, object] = {
            "cublas": stats(timed(lambda q=q: run(q, False), device, 5, seconds)),
            "fused": stats(timed(lambda q=q: run(q, True), device, 5, seconds)),
        }
        if b == 1:
            row["fused, prefilter"] = stats(timed(lambda q=q: run(q, True, 1), device, 5, seconds))
        exclude = (torch.arange(b).repeat_interleave(100), torch.randint(0, n, (b * 100,), generator=gen))
        plain, fused = run(q, False, exclude=exclude), run(q, True, exclude=exclude)
        row["same_rows"] = torch.equal(plain[1], fused[1])
        row["max_score_diff"] = float((plain[0] - fused[0]).abs().max())
        out[f"B={b}"] = row
        extra = f"  prefilter {row['fused, prefilter']['p50_ms']:.3f}" if b == 1 else ""
        print(f"  B={b:3d}  {row['cublas']['p50_ms']:8.3f} / {row['fused']['p50_ms']:8.3f}{extra}  "
              f"same rows {row['same_rows']}  max diff {row['max_score_diff']:.2e}", flush=True)  # fmt: skip
    for b in (1, 32):
        q = torch.nn.functional.normalize(torch.randn(b, dim, device=device), dim=1)
        hi, lo = split_query(q, matrix.dtype).split(b)
        split = torch.cat([hi, lo])
        pieces = {
            "gemm + add + block maxima": lambda split=split, b=b: block_maxima(
                _split_product(split, matrix, b), 128
            ),
            "fused kernel": lambda hi=hi, lo=lo: topk_triton.split_scores(hi, lo, matrix, 128),
        }
        for warps in (2, 8):

            def with_warps(hi=hi, lo=lo, warps=warps):
                topk_triton.NUM_WARPS, was = warps, topk_triton.NUM_WARPS
                try:
                    return topk_triton.split_scores(hi, lo, matrix, 128)
                finally:
                    topk_triton.NUM_WARPS = was

            pieces[f"fused kernel, {warps} warps"] = with_warps
        for name, fn in pieces.items():
            r = stats(timed(fn, device, 5, seconds))
            out[f"B={b} {name}"] = r
            print(f"  B={b:3d}  {name:32s} {r['p50_ms']:8.3f}", flush=True)
    return out


def profile_tables(
    device: torch.device, label: str, fn: Callable[[], object], out_dir: Path, reps: int = 5
) -> None:
    """torch.profiler over `reps` calls: the ops by self device time and by self host time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    avg = prof.key_averages()
    text = [f"# {label}: {reps} calls\n"]
    if device.type == "cuda":
        text.append(avg.table(sort_by="self_cuda_time_total", row_limit=25))
    text.append(avg.table(sort_by="self_cpu_time_total", row_limit=25))
    (out_dir / f"profile_{label}.txt").write_text("\n".join(text))


def user_tower(device: torch.device, out_dir: Path, seconds: float) -> dict:
    """The user_service request path at batch 1 (64-event history), piece by piece."""
    work = Path(tempfile.mkdtemp(prefix="gpu_profile_"))
    corpus = e2e_corpus.synthetic(work, 1000, 100)
    enc = load_encoder(str(corpus.checkpoint), str(device), "fp32", 128, 64 if device.type == "cuda" else 0)
    enc.warm_up([1, 8])
    cfg, limit = enc.config, enc.max_history_events
    req = corpus.requests[0]

    def convert():
        ctx = user_context_from_proto(req.user, cfg.num_actions, limit)
        validate_user(ctx, cfg, limit)
        return ctx

    ctx = convert()
    feats = featurize_users([ctx], cfg, limit)
    res = {
        "cuda_graphs": enc.cuda_graphs,
        "convert+validate": stats(timed(convert, device, 20, seconds)),
        "featurize": stats(timed(lambda: featurize_users([ctx], cfg, limit), device, 20, seconds)),
        "features to device": stats(timed(lambda: feats.to(device), device, 20, seconds)),
        "encode (features, forward, .cpu())": stats(timed(lambda: enc.encode([ctx]), device, 20, seconds)),
    }
    with torch.inference_mode():
        dev_feats = feats.to(device)
        res["eager forward"] = stats(timed(lambda: enc._model.encode_users(dev_feats), device, 20, seconds))
        if enc._graphed is not None and enc.cuda_graphs:
            res["graph replay"] = stats(
                timed(lambda: enc._graphed.encode_users(dev_feats), device, 20, seconds)
            )
    profile_tables(device, "user_encode_b1", lambda: enc.encode([ctx]), out_dir)
    print("\nuser tower, B=1, 64 events:", flush=True)
    for name, r in res.items():
        print(f"  {name:40s} {r}", flush=True)
    return res


def big_corpus(device: torch.device, args: argparse.Namespace, seconds: float, report: dict) -> None:
    """The n-row corpus: pieces at B=1 and 32, the prefilter sweep, profiler tables."""
    big = topk_pieces(device, args.n, args.dim, args.k, [1, 32], seconds)
    report["topk_pieces"] = big["results"]
    matrix, index = big["matrix"], big["index"]
    report["prefilter_sweep"] = prefilter_sweep(device, matrix, args.k, seconds / 2)
    for b in (1, 32):
        q = torch.nn.functional.normalize(torch.randn(b, args.dim, device=device), dim=1)
        queries = [Query(v, FP, args.k) for v in q.cpu()]
        profile_tables(device, f"exact_topk_b{b}", lambda q=q: exact_topk(q, matrix, args.k), args.out)
        profile_tables(device, f"index_search_b{b}", lambda queries=queries: index.search(queries), args.out)


def small_corpus(device: torch.device, args: argparse.Namespace, seconds: float, report: dict) -> None:
    """The e2e bench's corpus size at k=100, B=1."""
    small = topk_pieces(device, args.small_n, args.dim, 100, [1], seconds)
    report["topk_pieces_small"] = small["results"]
    q1 = [Query(torch.nn.functional.normalize(torch.randn(args.dim), dim=0), FP, 100)]
    profile_tables(device, "index_search_small_b1", lambda: small["index"].search(q1), args.out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--small-n", type=int, default=1_000_000, help="the e2e corpus size (k=100, B=1)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="short timings (rehearsal)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "gpu_profile")
    p.add_argument("--sweep-only", action="store_true", help="only the prefilter sweep")
    p.add_argument("--fused-only", action="store_true", help="only the fused kernel's sweep (bf16)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    seconds = 0.3 if args.quick else 1.0
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report: dict[str, object] = {
        "device": name,
        "torch": torch.__version__,
        "n": args.n,
        "dim": args.dim,
        "k": args.k,
    }
    t0 = time.perf_counter()
    if args.fused_only:
        m = torch.nn.functional.normalize(torch.randn(args.n, args.dim, device=device), dim=1)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # (Triton's interpreter: fp16)
        report["fused_sweep"] = fused_sweep(device, m.to(dtype), args.k, seconds / 2)
        (args.out / "gpu_profile.json").write_text(json.dumps(report, indent=1))
        return 0
    if args.sweep_only:
        m = torch.nn.functional.normalize(torch.randn(args.n, args.dim, device=device), dim=1).bfloat16()
        report["prefilter_sweep"] = prefilter_sweep(device, m, args.k, seconds / 2)
        (args.out / "gpu_profile.json").write_text(json.dumps(report, indent=1))
        return 0
    big_corpus(device, args, seconds, report)
    small_corpus(device, args, seconds, report)
    report["user_tower"] = user_tower(device, args.out, seconds)
    floor = subprocess.run(
        [sys.executable, str(REPO / "bench" / "grpc_floor.py"), "--calls", "300" if args.quick else "1000",
         "--out", str(args.out / "grpc_floor.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(floor.stdout[-3000:], floor.stderr[-2000:], flush=True)
    report["seconds"] = time.perf_counter() - t0
    (args.out / "gpu_profile.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}/gpu_profile.json ({report['seconds']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
