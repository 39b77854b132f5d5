"""Exact maximum-inner-product top-k with masks and a deterministic tie order. No grpc import.

`exact_topk` is a pure function (training and evaluation reuse it): scores = queries @ matrixᵀ are
computed chunk by chunk and folded into a running top-k, so peak memory is bounded by
`max_score_elements` floats whatever B x N is. Ranking is by (score descending, tie id ascending) and
is exact, including which of several equal scores make the cut at the k-th place.

On an accelerator (cuda) `topk_device.device_topk` runs the chunk loop without reading anything on
the host until one copy of the candidates at the end; a tie at the cut (rare with real data) reruns
the call with the resolving loop here. bf16/fp16 storage is scored by a GEMM in that dtype with fp32
accumulation and fp32 output: no widened copy of the corpus is made per query.

On CPU, a large corpus (`topk_cpu.scan_pays`) is scanned by `topk_cpu.cpu_scan`, which computes the
same ranking with a cheaper gather; `topk_chunks` holds what the loops share.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch

from retrieval_gateway import topk_triton
from retrieval_gateway.topk_chunks import ChunkMasks, chunk_topk, lex_top, order_runs, split_query
from retrieval_gateway.topk_cpu import cpu_scan, gemv, scan_pays
from retrieval_gateway.topk_device import PREFILTER_BLOCK, PREFILTER_MIN_BATCH, Scorer, device_topk

DEFAULT_MAX_SCORE_ELEMENTS = 1 << 22  # 16 MiB of fp32 scores per chunk (the cpu default)
# Per device when none is given: on cuda a chunk loop of many small top-ks costs far more than the
# memory (B=32 over 10M rows: 20 chunks of 64 MiB took 13.6 ms on an H200, the whole product at once
# 4.7 ms); 1 GiB of scores is a small part of any data-centre GPU.
DEVICE_MAX_SCORE_ELEMENTS = {"cpu": DEFAULT_MAX_SCORE_ELEMENTS, "cuda": 1 << 28}
# Rows of a reduced-precision matrix widened to fp32 at once (CPU: stays in the last-level cache).
DEFAULT_UPCAST_ROWS = {"cpu": 32_768, "cuda": 1 << 20}
_REDUCED = (torch.bfloat16, torch.float16)
# torch >= 2.8: mm(a, b, out_dtype=float32) multiplies bf16/fp16 operands with fp32 accumulation and
# writes fp32 (cuBLAS; no CPU kernel). Older torch widens slices instead (DEFAULT_UPCAST_ROWS).
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()
# From this batch, a split query on cuda is scored by topk_triton's fused kernel (when it works).
FUSED_MIN_BATCH = 2


def exact_topk(
    queries: torch.Tensor,
    matrix: torch.Tensor,
    k: int,
    *,
    masked_rows: torch.Tensor | None = None,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    tie_ids: torch.Tensor | None = None,
    max_score_elements: int | None = None,
    upcast_rows: int | None = None,
    fused_gemv: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rows of `matrix` for each query by inner product.

    queries [B, D] (any float dtype; scored in fp32), matrix [N, D] fp32 / bf16 / fp16. Reduced-
    precision rows are scored against the fp32 query with fp32 accumulation and fp32 scores: on CPU
    by widening a cache-sized slice at a time, on cuda by a GEMM in the storage dtype against the
    query split into two terms (hi + lo, ~16 significant bits), so both devices agree to ~1e-6.
    max_score_elements: scores materialised at once (B x chunk rows; the cuda GEMM of a split query
    2B x chunk, and the fused kernel that replaces it takes chunks twice as long, see accelerator_topk);
    None = DEVICE_MAX_SCORE_ELEMENTS.
    masked_rows [M] int64: rows never returned (deleted). exclude: (query index [E], row [E]) pairs
    never returned for that query. Pass both on the host (CPU tensors) to spare the device a copy
    back: they are split by chunk on the host. tie_ids [N] int64: equal scores rank by ascending tie
    id (default: the row index). fused_gemv: for a single query on CPU, use a torch.compile'd kernel
    that reads each row once and accumulates in fp32 registers (see `fused_gemv_kernel`).
    Returns (scores [B, K] fp32 descending, rows [B, K] int64) with K = min(k, N); where fewer than K
    rows are eligible the tail is padded with score -inf and row -1. On an accelerator both are on the
    host (the search ends with one copy back there).
    """
    if queries.dim() != 2 or matrix.dim() != 2 or queries.shape[1] != matrix.shape[1]:
        raise ValueError(f"shapes {tuple(queries.shape)} @ {tuple(matrix.shape)}ᵀ do not match")
    queries, matrix = queries.detach(), matrix.detach()  # a ranking has no gradient; the host reads numpy
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_score_elements is None:
        max_score_elements = DEVICE_MAX_SCORE_ELEMENTS.get(matrix.device.type, DEFAULT_MAX_SCORE_ELEMENTS)
    if matrix.device.type != "cpu":
        return accelerator_topk(
            queries, matrix, k, masked_rows, exclude, tie_ids, max_score_elements, upcast_rows,
            gemm=matrix.dtype in _REDUCED and _MM_OUT_DTYPE,
        )  # fmt: skip
    if not (fused_gemv and queries.shape[0] == 1) and scan_pays(matrix.shape[0], queries.shape[0]):
        upcast = upcast_rows or DEFAULT_UPCAST_ROWS["cpu"]
        return cpu_scan(queries, matrix, k, masked_rows, exclude, tie_ids, max_score_elements, upcast)
    return _exact_topk(
        queries, matrix, k, masked_rows, exclude, tie_ids, max_score_elements, upcast_rows, fused_gemv,
        gemm=False,
    )  # fmt: skip


def accelerator_topk(
    queries: torch.Tensor,
    matrix: torch.Tensor,
    k: int,
    masked_rows: torch.Tensor | None,
    exclude: tuple[torch.Tensor, torch.Tensor] | None,
    tie_ids: torch.Tensor | None,
    max_score_elements: int,
    upcast_rows: int | None,
    *,
    gemm: bool,
    query_terms: int = 2,
    prefilter_min_batch: int = PREFILTER_MIN_BATCH,
    prefilter_block: int = PREFILTER_BLOCK,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """exact_topk's accelerator strategy, on any device (tests run it on CPU): `device_topk`, and the
    resolving loop when it finds a tie at the cut. Host results.

    gemm: score reduced-precision rows with `_split_product` (fp32-output GEMM) instead of widening.
    query_terms: with gemm, 2 = hi + lo query (see split_query), 1 = the bf16-rounded query alone
    (index_bench's investigation row: what the second term costs and what it buys in recall).
    prefilter_min_batch / prefilter_block: see topk_device. fused: score the split query with
    topk_triton's kernel (scores and block maxima in one pass) instead of the GEMM; None = on cuda
    from FUSED_MIN_BATCH queries when Triton is there and its one-time check passed."""
    batch, n = queries.shape[0], matrix.shape[0]
    kk = min(k, n)
    if n == 0 or batch == 0:
        return torch.empty(batch, 0), torch.empty(batch, 0, dtype=torch.long)
    matrix = matrix.detach()  # the host reads the candidates in numpy
    q = queries.detach().to(device=matrix.device, dtype=torch.float32)
    score: Scorer | None = None
    score_blocks = None
    elements = max_score_elements
    if gemm and query_terms == 2 and _use_fused(fused, matrix, batch, prefilter_block):
        hi, lo = split_query(q, matrix.dtype).split(batch)
        score_blocks = functools.partial(_fused_scores, hi, lo, prefilter_block)
        # chunks twice as long: the GEMM's [2B, c] output peaks at what the kernel's [B, 2c] holds.
        # One chunk fewer saves ~40 kernel launches (B=32 over 10M rows: one chunk instead of two)
        elements *= 2
    else:  # (not both: the GEMM scorer would split the query again for nothing)
        score = _scorer(q, matrix.dtype, upcast_rows, False, gemm, query_terms)
    chunk = max(kk + 1, min(n, elements // batch))
    found = device_topk(
        score, matrix, batch, kk, masked_rows, exclude, tie_ids, chunk,
        prefilter_min_batch=prefilter_min_batch, block=prefilter_block, score_blocks=score_blocks,
    )  # fmt: skip
    if found is not None:
        return found
    scores, rows = _exact_topk(
        queries, matrix, k, masked_rows, exclude, tie_ids, max_score_elements, upcast_rows, False,
        gemm=gemm, query_terms=query_terms,
    )  # fmt: skip
    return scores.cpu(), rows.cpu()


def _use_fused(fused: bool | None, matrix: torch.Tensor, batch: int, block: int) -> bool:
    if fused is not None:
        return fused and topk_triton.available(matrix)
    return (
        matrix.device.type == "cuda"
        and batch >= FUSED_MIN_BATCH
        and topk_triton.available(matrix)
        and topk_triton.fused_scores_ok(matrix.device, matrix.dtype, block, matrix.shape[1])
    )


def prepare(matrix: torch.Tensor) -> None:
    """Before serving a matrix: compile and check what its searches will use on its device (the fused
    kernel on cuda, see topk_triton), so that no request waits for it."""
    if _MM_OUT_DTYPE:
        _use_fused(None, matrix, FUSED_MIN_BATCH, PREFILTER_BLOCK)


def _fused_scores(
    hi: torch.Tensor, lo: torch.Tensor, block: int, rows: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return topk_triton.split_scores(hi, lo, rows, block, bias)


def _exact_topk(
    queries: torch.Tensor,
    matrix: torch.Tensor,
    k: int,
    masked_rows: torch.Tensor | None,
    exclude: tuple[torch.Tensor, torch.Tensor] | None,
    tie_ids: torch.Tensor | None,
    max_score_elements: int,
    upcast_rows: int | None,
    fused_gemv: bool,
    *,
    gemm: bool,
    query_terms: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The resolving chunk loop: each chunk's top-k with ties at its cut resolved at once (reads the
    device when one occurs), merged in (score desc, tie asc) order. The CPU path for small corpora,
    and an accelerator's when device_topk finds a tie at the cut. gemm, query_terms: see
    accelerator_topk."""
    device = matrix.device
    batch, n = queries.shape[0], matrix.shape[0]
    kk = min(k, n)
    best_s = torch.empty(batch, 0, device=device)
    best_r = torch.empty(batch, 0, dtype=torch.long, device=device)
    if n == 0 or batch == 0:
        return best_s[:, :kk], best_r[:, :kk]
    q = queries.to(device=device, dtype=torch.float32)
    ties = tie_ids if tie_ids is not None else torch.arange(n, device=device)
    chunk = max(kk, min(n, max_score_elements // batch))
    score = _scorer(q, matrix.dtype, upcast_rows, fused_gemv and batch == 1 and device.type == "cpu", gemm,
                    query_terms)  # fmt: skip
    starts = list(range(0, n, chunk))
    if len(starts) == 1:  # a small corpus: one product, masks set directly, no merge
        scores = score(matrix)
        ChunkMasks.fill_all(scores, masked_rows, exclude)
        best_s, best_r = chunk_topk(scores, kk, ties)
        if device.type == "cpu":  # topk orders by score only: equal scores must rank by tie id
            best_r = order_runs(best_s, best_r, ties)
        elif _has_ties(best_s):
            best_s, best_r = lex_top(best_s, best_r, ties[best_r], kk)
        return best_s, best_r.masked_fill(best_s == float("-inf"), -1)
    deleted = ChunkMasks.of_rows(masked_rows, n, starts, device)
    excluded = ChunkMasks.of_pairs(exclude, n, starts, device)
    for i, start in enumerate(starts):
        end = min(n, start + chunk)
        scores = score(matrix[start:end])
        deleted.fill(scores, i, start)
        excluded.fill(scores, i, start)
        cs, cr = chunk_topk(scores, min(kk, end - start), ties[start:end])
        if best_s.shape[1]:
            cand_s, cand_r = torch.cat([best_s, cs], dim=1), torch.cat([best_r, cr + start], dim=1)
        else:
            cand_s, cand_r = cs, cr + start
        best_s, best_r = lex_top(cand_s, cand_r, ties[cand_r], kk)
    best_r = best_r.masked_fill(best_s == float("-inf"), -1)
    return best_s, best_r


def _has_ties(scores: torch.Tensor) -> bool:
    """Whether any row of scores [B, K] (descending) holds two equal neighbours (reads the device)."""
    return scores.shape[1] > 1 and bool((scores[:, 1:] == scores[:, :-1]).any())


def _scorer(
    q: torch.Tensor, dtype: torch.dtype, upcast_rows: int | None, fused: bool, gemm: bool, query_terms: int
) -> Scorer:
    """rows [c, D] -> scores [B, c] fp32 (contiguous) for the fp32 queries q [B, D] on rows' device."""
    batch = q.shape[0]
    if fused:
        return lambda block: fused_gemv_kernel()(q[0], block)[None]
    if gemm and dtype in _REDUCED:
        split = split_query(q, dtype)
        if query_terms == 1:
            split = split[:batch]  # hi only
        return lambda block: _split_product(split, block, batch)
    upcast = upcast_rows or DEFAULT_UPCAST_ROWS.get(q.device.type, 1 << 20)
    if batch == 1 and q.device.type == "cpu":  # one query: numpy's BLAS gemv (topk_cpu.gemv)
        threads = torch.get_num_threads()
        return lambda block: _gemv_scores(q, block, upcast, threads)
    return lambda block: _scores(q, block, upcast)


def _gemv_scores(q: torch.Tensor, block: torch.Tensor, upcast_rows: int, threads: int) -> torch.Tensor:
    """q [1, D] fp32 @ block [c, D]ᵀ (fp32 or widened slice by slice) -> [1, c] fp32, on CPU.

    Why not torch: for one query torch's CPU matmul takes slow paths (q @ rowsᵀ 4.1 ms, the padded
    (rows @ qᵀ)ᵀ of _product 5.4 ms for 200k x 64 here), while OpenBLAS's gemv reads the rows at the
    memory's pace (3.7 ms on one thread, 2.5 on two); FAISS's IndexFlatIP took 4.5 ms."""
    out = torch.empty(1, block.shape[0])
    gemv(block.detach(), q[0].detach().numpy(), out[0].numpy(), upcast_rows, threads)
    return out


_SHORT_BATCH = 4  # up to here, the product of a tall matrix is computed as (rows @ qᵀ)ᵀ (see _product)
_TALL_ROWS = 32_768  # from here, a matrix is tall


def _product(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q [B, D] fp32 @ rows [c, D]ᵀ -> [B, c] fp32 (contiguous).

    Why not always q @ rowsᵀ: on CPU, torch routes a short q (B = 2..4) against a tall matrix to
    slow paths (1M x 128: B=3 204 ms), while rows @ qᵀ runs as a proper GEMM (B=2 16 ms, B=3 21 ms).
    Past a few queries, and below _TALL_ROWS rows, q @ rowsᵀ is the faster one again (its output
    needs no transpose copy; 20k x 64, B=2-4: 0.35-0.58 against 0.62-1.06 ms; 50k about even, 200k:
    10.5-13.7 against 6.7-9.7 ms). A single query on CPU never comes here (_gemv_scores). On cuda,
    cuBLAS handles short batches itself: q @ rowsᵀ always."""
    b = q.shape[0]
    if not 2 <= b <= _SHORT_BATCH or rows.device.type != "cpu" or rows.shape[0] < _TALL_ROWS:
        return q @ rows.T
    return (rows @ q.T).T.contiguous()


def _scores(q: torch.Tensor, block: torch.Tensor, upcast_rows: int) -> torch.Tensor:
    """[B, D] fp32 @ [c, D]ᵀ -> [B, c] fp32."""
    if block.dtype == torch.float32:
        return _product(q, block)
    # bf16/fp16 storage: widen a cache-sized slice at a time and multiply in fp32, so the scores keep
    # fp32 resolution (a bf16 product output has ~3 significant digits: near-ties would collapse).
    out = torch.empty(q.shape[0], block.shape[0], device=block.device)
    buf = torch.empty(min(upcast_rows, block.shape[0]), block.shape[1], device=block.device)
    for a in range(0, block.shape[0], upcast_rows):
        part = block[a : a + upcast_rows]
        wide = buf[: part.shape[0]]
        wide.copy_(part)
        out[:, a : a + part.shape[0]] = _product(q, wide)
    return out


def _split_product(split: torch.Tensor, block: torch.Tensor, b: int) -> torch.Tensor:
    """split [2B, D] (hi rows, then lo rows; or [B, D], hi only) @ block [c, D]ᵀ in block's dtype ->
    [B, c] fp32."""
    both = _mm_fp32(split, block.T)  # [2B, c] fp32
    if split.shape[0] == b:
        return both
    return both[:b].add_(both[b:])  # the first B rows of a row-major [2B, c]: contiguous


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N], both bf16 (or both fp16), fp32 accumulation and fp32 output.

    cuda: one cuBLAS GEMM reading b in its own dtype. CPU has no such kernel: widening both gives the
    same numbers (products of bf16 values are exact in fp32); only tests take this branch."""
    if a.device.type == "cpu":
        return a.float() @ b.float()
    return torch.mm(a, b, out_dtype=torch.float32)


_FUSED: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
_FUSED_LOCK = threading.Lock()


def _gemv(q: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """q [D] fp32, block [c, D] fp32/bf16 -> [c] fp32; written as a reduction so inductor fuses it."""
    return (block.float() * q).sum(-1)


def fused_gemv_kernel() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The single-query kernel, compiled on first use per dtype (C++ via inductor; needs a compiler).

    Why: at batch 1 the product is memory-bound. BLAS gemv with 64-wide rows runs well below memory
    speed, and for bf16 torch's eager CPU paths either round the scores to bf16 (native bf16 mm) or
    write the widened rows back to memory first (upcast + mm), which costs as much as fp32. The fused
    loop reads each row once. dynamic=True: one compilation for every corpus size.
    """
    global _FUSED
    with _FUSED_LOCK:
        if _FUSED is None:
            _FUSED = torch.compile(_gemv, dynamic=True)
        return _FUSED
