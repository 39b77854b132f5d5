"""The parts of exact_topk's chunk loops that more than one of them uses: masks cut by chunk on the
host, a chunk's own top-k, and the merge by (score desc, tie asc); the split query (topk's GEMM and
topk_triton's kernel score it). No grpc import."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ChunkMasks:
    """(query, row) cells to set to -inf, sorted by row and cut by chunk on the host, so that the
    chunk loop slices them with host integers (no device read, no data-dependent shapes).

    queries [P] (None: every query), rows [P], both on the matrix's device; bounds[i]:bounds[i+1]
    are the entries of chunk i."""

    queries: torch.Tensor | None
    rows: torch.Tensor | None
    bounds: list[int]

    @classmethod
    def of_rows(
        cls, rows: torch.Tensor | None, n: int, starts: list[int], device: torch.device
    ) -> ChunkMasks:
        if rows is None or rows.numel() == 0:
            return cls(None, None, [])
        sorted_rows = rows.cpu().flatten().sort().values
        return cls(None, _upload(sorted_rows, device), _bounds(sorted_rows, n, starts))

    @classmethod
    def of_pairs(
        cls, pairs: tuple[torch.Tensor, torch.Tensor] | None, n: int, starts: list[int], device: torch.device
    ) -> ChunkMasks:
        if pairs is None or pairs[1].numel() == 0:
            return cls(None, None, [])
        qi, rows = pairs[0].cpu().flatten(), pairs[1].cpu().flatten()
        sorted_rows, order = rows.sort()
        return cls(_upload(qi[order], device), _upload(sorted_rows, device), _bounds(sorted_rows, n, starts))

    @staticmethod
    def fill_all(
        scores: torch.Tensor,
        masked_rows: torch.Tensor | None,
        exclude: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """Without chunks (scores [B, n] of the whole matrix, contiguous): set the deleted rows'
        columns and the excluded (query, row) cells to -inf, without sorting or cutting anything.
        Rows outside [0, n) are ignored, as with chunks."""
        n = scores.shape[1]
        if scores.device.type == "cpu" and scores.is_contiguous():  # numpy: 0.03 ms, a dozen torch ops 0.13
            _fill_all_host(scores.numpy(), masked_rows, exclude)
            return
        if masked_rows is not None and masked_rows.numel():
            rows = masked_rows.to(scores.device).flatten()
            scores.index_fill_(1, rows[(rows >= 0) & (rows < n)], float("-inf"))
        if exclude is not None and exclude[1].numel():
            qi, rows = (t.to(scores.device).flatten() for t in exclude)
            inside = (rows >= 0) & (rows < n)
            scores.view(-1).index_fill_(0, qi[inside] * n + rows[inside], float("-inf"))

    def cells(self, chunk_index: int, start: int) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """This chunk's entries: (queries [P] or None for every query, chunk-local columns [P]), or
        None when it has none."""
        if self.rows is None:
            return None
        lo, hi = self.bounds[chunk_index], self.bounds[chunk_index + 1]
        if lo == hi:
            return None
        return (None if self.queries is None else self.queries[lo:hi]), self.rows[lo:hi] - start

    def fill(self, scores: torch.Tensor, chunk_index: int, start: int) -> None:
        """Set this chunk's cells of scores [B, c] (any strides, rows chunk-local) to -inf."""
        found = self.cells(chunk_index, start)
        if found is None:
            return
        queries, cols = found
        if queries is None:  # deleted rows: every query
            scores.index_fill_(1, cols, float("-inf"))
        elif scores.is_contiguous():  # the device loop: one flat index_fill_, nothing to copy to the device
            scores.view(-1).index_fill_(0, queries * scores.shape[1] + cols, float("-inf"))
        else:  # the CPU scan's [B, c] view of its row-major buffer
            scores[queries, cols] = float("-inf")

    def row_bias(self, chunk_index: int, start: int, c: int, device: torch.device) -> torch.Tensor | None:
        """For masks of every query (deleted rows): [c] fp32, -inf at this chunk's rows and 0 elsewhere
        (a scoring kernel adds it to each score); None when the chunk has none."""
        found = self.cells(chunk_index, start)
        if found is None:
            return None
        return torch.zeros(c, device=device).index_fill_(0, found[1], float("-inf"))

    def refresh_maxima(self, scores: torch.Tensor, maxima: torch.Tensor, chunk_index: int, start: int,
                       block: int) -> None:  # fmt: skip
        """After `fill` of (query, row) cells: recompute the maxima [B, ceil(c / block)] of the blocks
        of scores [B, c] that hold one of this chunk's cells (one gather of `block` scores per cell),
        since their max may now be -inf. Without this a block's stale max could keep it in the
        prefilter in place of a better one."""
        found = self.cells(chunk_index, start)
        if found is None:
            return
        queries, cols = found
        assert queries is not None, "masks of every query go in as row_bias"
        c = scores.shape[1]
        blocks = cols // block
        at = blocks[:, None] * block + torch.arange(block, device=scores.device)  # [P, block]
        cand = scores[queries[:, None], at.clamp(max=c - 1)].masked_fill_(at >= c, float("-inf"))
        maxima[queries, blocks] = cand.amax(-1)


def _fill_all_host(
    scores: np.ndarray, masked_rows: torch.Tensor | None, exclude: tuple[torch.Tensor, torch.Tensor] | None
) -> None:
    """ChunkMasks.fill_all on a host array [B, n] (writes through to the tensor it views)."""
    n = scores.shape[1]
    if masked_rows is not None and masked_rows.numel():
        rows = masked_rows.cpu().numpy().ravel()
        scores[:, rows[(rows >= 0) & (rows < n)]] = -np.inf
    if exclude is not None and exclude[1].numel():
        qi, rows = (t.cpu().numpy().ravel() for t in exclude)
        inside = (rows >= 0) & (rows < n)
        scores.reshape(-1)[qi[inside] * n + rows[inside]] = -np.inf


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: from pageable memory the copy is
    staged before the call returns, so `host` may be dropped at once."""
    return host.to(device, non_blocking=True)


def _bounds(sorted_rows: torch.Tensor, n: int, starts: list[int]) -> list[int]:
    """Index of the first entry of each chunk (from its start, ascending) in sorted_rows (host), then
    the end of the last chunk; rows outside [0, n) fall in no chunk and are ignored."""
    edges = torch.tensor([*starts, n], dtype=sorted_rows.dtype)
    return torch.searchsorted(sorted_rows, edges).tolist()


def chunk_topk(scores: torch.Tensor, kc: int, ties: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-kc of each row of scores [B, c] by (score desc, tie asc); rows are chunk-local.

    One place more than needed is selected: when the (kc+1)-th score equals the kc-th, the cut falls
    inside a run of equal scores and torch.topk chose arbitrarily among them, so such a query is redone
    with every tied row and the smallest tie ids win (this reads the flags on the host). Rare with real
    data, and the check costs nothing. Returns (scores [B, kc], rows [B, kc])."""
    extra = min(kc + 1, scores.shape[1])
    values, rows = torch.topk(scores, extra, dim=1, sorted=True)
    if extra == kc:  # the whole chunk was taken: no cut, no tie
        return values, rows
    kth = values[:, kc - 1 : kc]  # [B, 1]
    if values.device.type == "cpu":  # numpy: the few ops on [B] cost less than torch's dispatch
        at_cut = values[:, kc - 1 : kc + 1].detach().numpy()
        tied = np.flatnonzero((at_cut[:, 1] == at_cut[:, 0]) & np.isfinite(at_cut[:, 0])).tolist()
    else:
        tied = ((values[:, kc] == kth[:, 0]) & torch.isfinite(kth[:, 0])).nonzero().flatten().tolist()
    values, rows = values[:, :kc], rows[:, :kc]
    for b in tied:
        cand = (scores[b] >= kth[b]).nonzero().flatten()
        s, r = lex_top(scores[b, cand][None], cand[None], ties[cand][None], kc)
        values[b], rows[b] = s[0], r[0]
    return values, rows


def split_query(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [B, D] fp32 -> [2B, D] in `dtype`: the rounded query, then what rounding lost.

    Why: a GEMM in bf16 needs a bf16 query, and bf16 keeps 8 significant bits, so rounding the query
    would add an error as large as the corpus's own rounding (recall drops, and cuda and CPU scores
    would differ by ~1e-3). hi + lo carries ~16 bits; each product of bf16 values is exact in fp32,
    so the scores match the widened-fp32 CPU path to ~1e-6 for the price of 2B query rows."""
    hi = q.to(dtype)
    lo = (q - hi.float()).to(dtype)
    return torch.cat([hi, lo])


def block_maxima(scores: torch.Tensor, block: int) -> torch.Tensor:
    """The max of each block of `block` columns of scores [B, c]: [B, ceil(c / block)] (the last
    block may be short)."""
    b, c = scores.shape
    full = c // block * block
    maxima = scores[:, :full].view(b, full // block, block).amax(-1)
    if full < c:
        maxima = torch.cat([maxima, scores[:, full:].amax(-1, keepdim=True)], dim=1)
    return maxima


def order_runs(scores: torch.Tensor, rows: torch.Tensor, tie_ids: torch.Tensor | None) -> torch.Tensor:
    """rows [B, K] with each run of equal finite scores put in ascending tie order; scores [B, K]
    descending and rows on the host, tie_ids [N] on any device (None: the row index). The rest stays
    where it is; only the cells inside runs are looked up in tie_ids.

    Why not lex_top: two stable sorts of every candidate (host, [32, 1000]: 4-5 ms here) where only
    the few cells inside runs move; this sorts those cells alone, by (query, run, tie)."""
    s, r = scores.numpy(), rows.numpy()  # numpy: each op on a small host array costs less than torch's
    same = (s[:, 1:] == s[:, :-1]) & np.isfinite(s[:, 1:])
    if not same.any():
        return rows
    member = np.zeros(s.shape, bool)
    member[:, 1:] |= same
    member[:, :-1] |= same
    run = np.zeros(s.shape, np.int64)
    np.cumsum(~same, axis=1, out=run[:, 1:])  # ascending run number along each query's candidates
    qi, pos = np.nonzero(member)  # query by query, positions ascending
    cells = r[qi, pos]
    ties = cells if tie_ids is None else tie_ids[torch.from_numpy(cells).to(tie_ids.device)].cpu().numpy()
    out = r.copy()
    out[qi, pos] = cells[np.lexsort((ties, qi * s.shape[1] + run[qi, pos]))]
    return torch.from_numpy(out)


def lex_top(
    scores: torch.Tensor, rows: torch.Tensor, ties: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of each row of [B, M] candidates ordered by (score desc, tie asc)."""
    by_tie = torch.argsort(ties, dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, by_tie), dim=1, descending=True, stable=True)
    order = by_tie.gather(1, by_score)[:, :k]
    return scores.gather(1, order), rows.gather(1, order)
