"""Exact maximum-inner-product top-k with masks and a deterministic tie order. No grpc import.

`exact_topk` is a pure function (training and evaluation reuse it): scores = queries @ matrixᵀ are
computed chunk by chunk and folded into a running top-k, so peak memory is bounded by
`max_score_elements` floats whatever B x N is. Ranking is by (score descending, tie id ascending) and
is exact, including which of several equal scores make the cut at the k-th place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

DEFAULT_MAX_SCORE_ELEMENTS = 1 << 24  # 64 MiB of fp32 scores per chunk
# Rows of a reduced-precision matrix widened to fp32 at once (CPU: stays in the last-level cache).
DEFAULT_UPCAST_ROWS = {"cpu": 32_768, "cuda": 1 << 20}


def exact_topk(
    queries: torch.Tensor,
    matrix: torch.Tensor,
    k: int,
    *,
    masked_rows: torch.Tensor | None = None,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    tie_ids: torch.Tensor | None = None,
    max_score_elements: int = DEFAULT_MAX_SCORE_ELEMENTS,
    upcast_rows: int | None = None,
    fused_gemv: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rows of `matrix` for each query by inner product.

    queries [B, D] (any float dtype; scored in fp32), matrix [N, D] fp32 / bf16 / fp16 (bf16 and fp16
    rows are widened to fp32 before the product: reduced-precision storage, fp32 arithmetic).
    masked_rows [M] int64: rows never returned (deleted). exclude: (query index [E], row [E]) pairs
    never returned for that query. tie_ids [N] int64: equal scores rank by ascending tie id (default:
    the row index). fused_gemv: for a single query on CPU, use a torch.compile'd kernel that reads
    each row once and accumulates in fp32 registers (see `fused_gemv_kernel`).
    Returns (scores [B, K] fp32 descending, rows [B, K] int64) with K = min(k, N); where fewer than K
    rows are eligible the tail is padded with score -inf and row -1.
    """
    if queries.dim() != 2 or matrix.dim() != 2 or queries.shape[1] != matrix.shape[1]:
        raise ValueError(f"shapes {tuple(queries.shape)} @ {tuple(matrix.shape)}ᵀ do not match")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
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
    upcast = upcast_rows or DEFAULT_UPCAST_ROWS.get(device.type, 1 << 20)
    fused = fused_gemv and batch == 1 and device.type == "cpu"
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        block = matrix[start:end]
        scores = fused_gemv_kernel()(q[0], block)[None] if fused else _scores(q, block, upcast)  # [B, c]
        if masked_rows is not None and masked_rows.numel():  # deletes are few: index, not a [B, c] mask
            inside = masked_rows[(masked_rows >= start) & (masked_rows < end)]
            scores.index_fill_(1, inside - start, float("-inf"))
        if exclude is not None:
            qi, rows = exclude
            inside = (rows >= start) & (rows < end)
            scores[qi[inside], rows[inside] - start] = float("-inf")
        cs, cr = _chunk_topk(scores, min(kk, end - start), ties[start:end])
        cand_s = torch.cat([best_s, cs], dim=1)
        cand_r = torch.cat([best_r, cr + start], dim=1)
        best_s, best_r = lex_top(cand_s, cand_r, ties[cand_r], kk)
    best_r = best_r.masked_fill(best_s == float("-inf"), -1)
    return best_s, best_r


_SHORT_BATCH = 4  # up to here, the product is computed as (rows @ qᵀ)ᵀ (see _product)


def _product(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q [B, D] fp32 @ rows [c, D]ᵀ -> [B, c] fp32 (contiguous).

    Why not always q @ rowsᵀ: on CPU, torch routes a short q (B = 1..4) against a tall matrix to
    slow paths (1M x 128: B=1 73 ms, B=3 204 ms), while rows @ qᵀ with B >= 2 runs as a proper GEMM
    (B=2 16 ms, B=3 21 ms). A zero row pads B=1 to 2 for the same reason. Past a few queries
    q @ rowsᵀ is the faster one again (and its output needs no transpose copy)."""
    b = q.shape[0]
    if b > _SHORT_BATCH:
        return q @ rows.T
    padded = torch.cat([q, torch.zeros_like(q)]) if b == 1 else q
    return (rows @ padded.T).T[:b].contiguous()


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


def _chunk_topk(scores: torch.Tensor, kc: int, ties: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-kc of each row of scores [B, c] by (score desc, tie asc); rows are chunk-local."""
    # One place more than needed: when the (kc+1)-th score equals the kc-th, the cut falls inside a
    # run of equal scores and torch.topk chose arbitrarily among them; redo that query with every
    # tied row so the smallest tie ids win. Rare with real data, and the check costs nothing.
    extra = min(kc + 1, scores.shape[1])
    values, rows = torch.topk(scores, extra, dim=1, sorted=True)
    kth = values[:, kc - 1 : kc]  # [B, 1]
    if extra > kc:
        ambiguous = (values[:, kc] == kth[:, 0]) & torch.isfinite(kth[:, 0])
        values, rows = values[:, :kc], rows[:, :kc]
    else:
        ambiguous = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    for b in ambiguous.nonzero().flatten().tolist():
        cand = (scores[b] >= kth[b]).nonzero().flatten()
        s, r = lex_top(scores[b, cand][None], cand[None], ties[cand][None], kc)
        values[b], rows[b] = s[0], r[0]
    return values, rows


def lex_top(
    scores: torch.Tensor, rows: torch.Tensor, ties: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of each row of [B, M] candidates ordered by (score desc, tie asc)."""
    by_tie = torch.argsort(ties, dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, by_tie), dim=1, descending=True, stable=True)
    order = by_tie.gather(1, by_score)[:, :k]
    return scores.gather(1, order), rows.gather(1, order)


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
