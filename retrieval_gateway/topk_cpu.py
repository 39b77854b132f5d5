"""exact_topk's scan on CPU for large corpora: scores in a reused row-major buffer, and a gather of
the few cells that can still enter each query's top-k. No grpc import."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from retrieval_gateway.topk_chunks import ChunkMasks, chunk_topk, lex_top

_LOWEST = torch.finfo(torch.float32).min
_BLOCK = 64  # rows per block of the CPU scan's gather filter
# The CPU scan's buffer columns: up to _NARROW queries as they are, more padded to a multiple of
# _WIDTH (torch's amax over rows is vectorised for 32 columns, ~15x slower for 16 or 24).
_NARROW, _WIDTH = 8, 32
# The gathering CPU scan pays from about 4M score cells (1M x 1, 250k x 32 rows x queries); below,
# its extra chunks and ops cost more than they save (docs/decisions.md, "CPU scan").
_SCAN_MIN_CELLS = 1 << 22


def scan_pays(batch: int, n: int) -> bool:
    return n * max(batch, 4) >= _SCAN_MIN_CELLS


def cpu_scan(
    queries: torch.Tensor,
    matrix: torch.Tensor,
    k: int,
    masked_rows: torch.Tensor | None,
    exclude: tuple[torch.Tensor, torch.Tensor] | None,
    tie_ids: torch.Tensor | None,
    max_score_elements: int,
    upcast_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """exact_topk on CPU: each chunk's scores land in one reused row-major buffer (rows @ qᵀ), and
    only the blocks of 64 rows whose best score reaches a query's current k-th best are gathered.

    Why (docs/decisions.md, "CPU scan"): MKL runs rows @ qᵀ up to 2x faster than q @ rowsᵀ, and a
    reused buffer spares the page faults of a fresh chunk per call. A full top-k per chunk would need
    the scores query-major (a transposing copy as dear as the product) and is only needed until each
    query has k candidates; after the small first chunk, a max over each block and a gather of the
    few blocks that pass cost a fraction of it. Exact, ties included: a cell of the final top-k scores
    at least the final k-th best, hence at least every earlier one, so its block passes and the cell
    is gathered; the merge orders by (score desc, tie asc). Where too many blocks pass (the first
    chunk, scores that rise with the row), the chunk takes the full top-k path instead."""
    batch, n = queries.shape[0], matrix.shape[0]
    kk = min(k, n)
    best_s = torch.full((batch, kk), float("-inf"))
    best_r = torch.full((batch, kk), -1, dtype=torch.long)
    if n == 0 or batch == 0:
        return best_s, best_r
    # B = 1 is padded with a zero query (MKL's gemv on 64-128-wide rows is far slower than a GEMM);
    # qᵀ stays a view of the row-major q (MKL is up to 2x slower with a copied, row-major qᵀ).
    qt = F.pad(queries.float(), (0, 0, 0, 1 if batch == 1 else 0)).contiguous().T  # [D, B']
    width = qt.shape[1] if qt.shape[1] <= _NARROW else _round_up(qt.shape[1], _WIDTH)
    chunk = _round_up(max(kk, max_score_elements // width), _BLOCK)
    starts = _growing_starts(n, min(chunk, _round_up(max(kk * 64, 4096), _BLOCK)), chunk)
    buf = torch.empty(min(chunk, _round_up(n, _BLOCK)), width)
    buf[:, qt.shape[1] :] = float("-inf")
    ties = tie_ids if tie_ids is not None else torch.arange(n)
    deleted = ChunkMasks.of_rows(masked_rows, n, starts, matrix.device)
    excluded = ChunkMasks.of_pairs(exclude, n, starts, matrix.device)
    for i, (start, end) in enumerate(itertools.pairwise([*starts, n])):
        rows = end - start
        _rows_times(matrix[start:end], qt, buf[:rows, : qt.shape[1]], upcast_rows)
        blocks = buf[: _round_up(rows, _BLOCK)]
        blocks[rows:].fill_(float("-inf"))  # the last block's rows past the end
        scores = buf[:rows, :batch].T  # [B, c] view
        deleted.fill(scores, i, start)
        excluded.fill(scores, i, start)
        cs, cr = _candidates(blocks, batch, best_s[:, -1], kk, ties[start:end])
        if cs.shape[1]:
            cand_r = torch.cat([best_r, torch.where(cr >= 0, cr + start, cr)], 1)
            best_s, best_r = lex_top(torch.cat([best_s, cs], 1), cand_r, ties[cand_r.clamp(min=0)], kk)
    best_r = best_r.masked_fill(best_s == float("-inf"), -1)
    return best_s, best_r


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _growing_starts(n: int, first: int, chunk: int) -> list[int]:
    """Chunk starts for n rows: a first chunk whose full top-k sets each query's floor, then chunks
    4x larger each time up to `chunk`, so that few cells of each pass the floor of all before."""
    starts, start, size = [], 0, first
    while start < n:
        starts.append(start)
        start, size = start + size, min(chunk, size * 4)
    return starts


def _rows_times(block: torch.Tensor, qt: torch.Tensor, out: torch.Tensor, upcast_rows: int) -> None:
    """out [c, B] (rows may be strided) = block [c, D] @ qt [D, B] in fp32; reduced-precision rows
    are widened a cache-sized slice at a time (the scores keep fp32 resolution)."""
    if block.dtype == torch.float32:
        torch.mm(block, qt, out=out)
        return
    wide = torch.empty(min(upcast_rows, block.shape[0]), block.shape[1])
    for a in range(0, block.shape[0], upcast_rows):
        part = block[a : a + upcast_rows]
        torch.mm(wide[: part.shape[0]].copy_(part), qt, out=out[a : a + part.shape[0]])


def _candidates(
    blocks: torch.Tensor, batch: int, floor: torch.Tensor, kk: int, ties: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells of a chunk that may enter the top-kk of queries whose k-th best so far is floor [B]:
    (scores [B, m], chunk-local rows [B, m]) padded with -inf / -1. blocks [c', W]: the chunk's
    scores, query b in column b, c' rows a multiple of _BLOCK (-inf past the chunk's end).

    The cheapest way that keeps the gather small: the blocks whose best cell passes, else the
    cells that pass, else (the first chunk, rising scores) the chunk's own top-kk."""
    cap = max(4 * kk * batch, blocks.shape[0] * batch // 16)  # cells gathered at most
    if not bool(torch.isinf(floor).any()):  # else fewer than kk eligible so far: every cell passes
        cells = _passing_blocks(blocks, batch, floor, cap)
        if cells is None:
            cells = _passing_cells(blocks[: ties.shape[0], :batch].T, floor, cap)
        if cells is not None:
            return _by_query(*cells, batch)
    return _full_topk(blocks, batch, kk, ties)


Cells = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (query [P], row [P], score [P])


def _passing_blocks(blocks: torch.Tensor, batch: int, floor: torch.Tensor, cap: int) -> Cells | None:
    """The passing cells of the blocks of _BLOCK rows whose best cell passes; None past cap."""
    best = blocks.view(-1, _BLOCK, blocks.shape[1]).amax(1)[:, :batch]  # [c' / _BLOCK, B]
    block, query = (best >= floor).nonzero(as_tuple=True)
    if block.numel() * _BLOCK > cap:
        return None
    rows = (block * _BLOCK)[:, None] + torch.arange(_BLOCK)  # [P, _BLOCK]
    values = blocks[rows, query[:, None]]
    keep = values >= floor[query][:, None]  # -inf cells (deleted, excluded, padding) never pass
    return query[:, None].expand_as(rows)[keep], rows[keep], values[keep]


def _passing_cells(scores: torch.Tensor, floor: torch.Tensor, cap: int) -> Cells | None:
    """The cells of scores [B, c] (a view) at or above their query's floor; None past cap."""
    passed = scores >= floor[:, None]
    if int(torch.count_nonzero(passed)) > cap:
        return None
    query, rows = passed.nonzero(as_tuple=True)
    return query, rows, scores[query, rows]


def _full_topk(
    blocks: torch.Tensor, batch: int, kk: int, ties: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = blocks[: ties.shape[0], :batch].T.contiguous()  # [B, c]
    values, rows, _ = chunk_topk(scores, min(kk, scores.shape[1]), ties)
    return values, rows


def _by_query(
    query: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells as (query [P], row [P], score [P]) -> (scores [B, m], rows [B, m]) padded -inf / -1."""
    order = torch.argsort(query, stable=True)
    query, rows, values = query[order], rows[order], values[order]
    counts = torch.bincount(query, minlength=batch)
    slot = torch.arange(query.numel()) - (counts.cumsum(0) - counts)[query]
    width = int(counts.max()) if query.numel() else 0
    out_s = torch.full((batch, width), float("-inf"))
    out_r = torch.full((batch, width), -1, dtype=torch.long)
    out_s[query, slot] = values
    out_r[query, slot] = rows
    return out_s, out_r
