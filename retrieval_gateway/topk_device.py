"""exact_topk's loop on an accelerator: no host read until the end, one copy back. No grpc import.

Each chunk's scores (from the caller's scorer) keep their best k+1 on the device: torch.topk, or for
a batch of queries a block-max prefilter first (`_prefilter`); the chunks' candidates merge by
torch.topk. Then one copy brings the [B, k+1] candidates to the host, where:
- a tie at the cut (the k-th and (k+1)-th scores equal and finite) means a selection may have kept
  the wrong one of several equal scores: `device_topk` returns None and the caller reruns the call
  with the resolving loop (rare with real data);
- otherwise the top k is exact as a set, and runs of equal scores inside it are put in tie-id order
  on the host (`order_runs`: only the cells inside runs are sorted).

Why the set is exact without a tie at the cut: a selection (torch.topk, or the prefilter, see there)
keeps every score above its own (k+1)-th; an item outside the merged top k+1 that scores at least the
k-th would leave k+1 kept scores at least as high, so the (k+1)-th merged score would equal the k-th.

Why (measured on an H200, 10M x 64 bf16, k=1000; docs/decisions.md "GPU top-k"): torch.topk of
k+1 over [32, 10M] fp32 scores took 3.8 ms, the prefilter 0.9 ms; and at batch 1 the old loop's
device-side tie ordering, tie flags and a second host read cost more than its one GEMM and top-k.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from retrieval_gateway.topk_chunks import ChunkMasks, block_maxima, order_runs

# Prefilter: the top-(k+1) blocks of PREFILTER_BLOCK columns by their max, then the top k+1 of their
# cells. It pays for two queries or more (torch.topk of one long row is already fast) when the blocks
# kept are a small part of the chunk. H200, 10M x 64 bf16, k=1000, ms without / with: B=1 0.94 / 0.89,
# B=2 1.20 / 0.99, B=8 2.77 / 2.06, B=32 7.96 / 5.17, B=64 14.9 / 10.4; at B=32, blocks of 64 / 128 /
# 256 / 512 columns: 5.68 / 5.17 / 5.33 / 5.38 (bench/gpu_profile.py --sweep-only).
PREFILTER_BLOCK = 128
PREFILTER_MIN_BATCH = 2
_PREFILTER_MIN_SHARE = 8  # the chunk has at least this many times the columns of the blocks kept

Scorer = Callable[[torch.Tensor], torch.Tensor]  # rows [c, D] -> scores [B, c] fp32, contiguous
# (rows [c, D], bias [c] fp32 or None) -> (scores + bias [B, c] fp32 contiguous, their block maxima
# [B, ceil(c / PREFILTER_BLOCK)]): topk_triton.split_scores
BlockScorer = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def device_topk(
    score: Scorer | None,
    matrix: torch.Tensor,
    batch: int,
    k: int,
    masked_rows: torch.Tensor | None,
    exclude: tuple[torch.Tensor, torch.Tensor] | None,
    tie_ids: torch.Tensor | None,
    chunk: int,
    *,
    prefilter_min_batch: int = PREFILTER_MIN_BATCH,
    block: int = PREFILTER_BLOCK,
    score_blocks: BlockScorer | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-k rows of `matrix` (n >= 1 rows, n >= k) per query, scored `chunk` rows at a time by
    `score`, or by `score_blocks` (blocks of `block` columns) when given instead, whose maxima spare
    the prefilter its pass over the scores and which sets deleted rows to -inf itself. Returns host
    tensors (scores [B, k] fp32 descending, rows [B, k] int64, -inf / -1 where too few rows are
    eligible), or None when a tie at the cut needs the resolving loop."""
    device, n = matrix.device, matrix.shape[0]
    keep = min(k + 1, n)  # one more than asked: the tie check at the cut
    starts = list(range(0, n, chunk))
    deleted = ChunkMasks.of_rows(masked_rows, n, starts, device)
    excluded = ChunkMasks.of_pairs(exclude, n, starts, device)
    best_s: torch.Tensor | None = None
    best_r: torch.Tensor | None = None
    for i, start in enumerate(starts):
        end = min(n, start + chunk)
        maxima = None
        if score_blocks is None:
            assert score is not None, "device_topk needs a scorer"
            scores = score(matrix[start:end])
            deleted.fill(scores, i, start)
        else:
            scores, maxima = score_blocks(matrix[start:end], deleted.row_bias(i, start, end - start, device))
        excluded.fill(scores, i, start)
        if batch >= prefilter_min_batch and scores.shape[1] >= _PREFILTER_MIN_SHARE * keep * block:
            if maxima is not None:
                excluded.refresh_maxima(scores, maxima, i, start, block)
            cs, cr = _prefilter(scores, min(keep, end - start), block, maxima)
        else:
            cs, cr = torch.topk(scores, min(keep, end - start), dim=1)
        cr = cr.add_(start)
        if best_s is not None and best_r is not None:
            cs, cr = torch.cat([best_s, cs], dim=1), torch.cat([best_r, cr], dim=1)
            cs, at = torch.topk(cs, min(keep, cs.shape[1]), dim=1)
            cr = cr.gather(1, at)
        best_s, best_r = cs, cr
    assert best_s is not None and best_r is not None
    scores_h, rows_h = _to_host(best_s, best_r)  # the one synchronisation
    return _finish(scores_h, rows_h, k, tie_ids)


def _prefilter(
    scores: torch.Tensor, keep: int, block: int, maxima: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `keep` of scores [B, c] (values descending, columns) among the cells of the `keep`
    blocks of `block` columns whose maxima are largest (the last block may be short). maxima: the
    blocks' maxima when the scorer gave them (block_maxima otherwise).

    It keeps every score above its own keep-th, like torch.topk: a cell left out lies in a block whose
    max is at most the keep-th largest block max, and the keep blocks kept each hold a cell at least
    that large."""
    b, c = scores.shape
    if maxima is None:
        maxima = block_maxima(scores, block)
    kept = torch.topk(maxima, min(keep, maxima.shape[1]), dim=1, sorted=False).indices  # [B, kb]
    cols = (kept[:, :, None] * block + torch.arange(block, device=scores.device)).view(b, -1)
    overhang = cols >= c  # the short last block's missing columns
    cand = scores.gather(1, cols.clamp(max=c - 1)).masked_fill_(overhang, float("-inf"))
    values, at = torch.topk(cand, keep, dim=1)
    return values, cols.gather(1, at)


def _to_host(scores: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both on the host in one copy."""
    if scores.device.type == "cpu":
        return scores, rows
    return _unpack(_pack(scores, rows).cpu(), scores.shape[1])


def _pack(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, w] fp32 and [B, w] int64 -> [B, 3w] int32 bits: the rows first, so that a single row's
    int64 bits start at an even offset (a view as int64 needs one)."""
    return torch.cat([rows.view(torch.int32), scores.view(torch.int32)], dim=1)


def _unpack(packed: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    # copies with plain strides (a one-row slice counts as contiguous and keeps its row stride of 3w,
    # which a view as int64 refuses)
    rows = torch.empty(packed.shape[0], 2 * width, dtype=torch.int32).copy_(packed[:, : 2 * width])
    scores = torch.empty(packed.shape[0], width, dtype=torch.int32).copy_(packed[:, 2 * width :])
    return scores.view(torch.float32), rows.view(torch.int64)


def _finish(
    scores: torch.Tensor, rows: torch.Tensor, k: int, tie_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """On the host: None if the cut falls inside a run of equal scores, else the top k with runs of
    equal scores in tie-id order and -1 for the rows of -inf scores."""
    if scores.shape[1] > k:
        kth, nxt = scores[:, k - 1].numpy(), scores[:, k].numpy()
        if ((kth == nxt) & np.isfinite(kth)).any():
            return None
        scores, rows = scores[:, :k], rows[:, :k]
    rows = order_runs(scores, rows, tie_ids)
    return scores, torch.from_numpy(np.where(np.isneginf(scores.numpy()), -1, rows.numpy()))
