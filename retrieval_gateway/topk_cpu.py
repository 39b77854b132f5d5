"""exact_topk's scan on CPU for large corpora: scores in a reused row-major buffer, and a gather of
the few cells that can still enter each query's top-k. No grpc import."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from retrieval_gateway.topk_chunks import ChunkMasks, chunk_topk, lex_top

# A single query's scores come from numpy's BLAS (see gemv). OpenBLAS's own thread pool, next to
# torch's OpenMP threads, made the scan 1.5-5x slower (both spin for the cores between calls): it
# computes in the calling thread, and gemv splits the rows between threads itself.
ThreadpoolController().select(internal_api="openblas").limit(limits=1)

_LOWEST = torch.finfo(torch.float32).min
_BLOCK = 64  # rows per block of the CPU scan's gather filter
# The CPU scan's buffer columns: up to _NARROW queries as they are, more padded to a multiple of
# _WIDTH (torch's amax over rows is vectorised for 32 columns, ~15x slower for 16 or 24).
_NARROW, _WIDTH = 8, 32
# The gathering CPU scan pays from about 400-500k rows for a batch; below, its extra chunks and ops
# cost more than they save (docs/decisions.md, "CPU scan"). A single query, whose product is a gemv
# either way, keeps the plain loop (one gemv, one top-k) up to 1M rows: 400k x 64 7.5-8.2 ms against
# 11.1-12.8 in the scan, 1M about even (20-26 ms both).
_SCAN_MIN_ROWS = 400_000
_SCAN_MIN_ROWS_ONE_QUERY = 1_000_000


def scan_pays(n: int, batch: int) -> bool:
    return n >= (_SCAN_MIN_ROWS_ONE_QUERY if batch == 1 else _SCAN_MIN_ROWS)


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
    chunk, scores that rise with the row), the chunk takes the full top-k path instead.

    A single query's product runs in numpy's BLAS (see gemv) on as many threads as the caller's
    torch count, and what is left for torch is element-wise work over the scores: torch runs it on
    one thread (waking a second cost more: 1M x 64 took 25-28 ms with two, 20.6 with one), and the
    caller's count is restored after."""
    batch, n = queries.shape[0], matrix.shape[0]
    kk = min(k, n)
    best_s = torch.full((batch, kk), float("-inf"))
    best_r = torch.full((batch, kk), -1, dtype=torch.long)
    if n == 0 or batch == 0:
        return best_s, best_r
    queries, matrix = queries.detach(), matrix.detach()  # out= products and numpy views take no autograd
    gemv_threads = torch.get_num_threads()
    with _torch_threads(1 if batch == 1 else gemv_threads):
        # qᵀ stays a view of the row-major q (MKL is up to 2x slower with a copied, row-major qᵀ).
        qt = queries.float().contiguous().T  # [D, B]
        width = qt.shape[1] if qt.shape[1] <= _NARROW else _round_up(qt.shape[1], _WIDTH)
        chunk = _round_up(max(kk, max_score_elements // width), _BLOCK)
        starts = _growing_starts(n, min(chunk, _round_up(max(kk * 64, 4096), _BLOCK)), chunk)
        buf = torch.empty(min(chunk, _round_up(n, _BLOCK)), width)
        buf[:, qt.shape[1] :] = float("-inf")
        deleted = ChunkMasks.of_rows(masked_rows, n, starts, matrix.device)
        excluded = ChunkMasks.of_pairs(exclude, n, starts, matrix.device)
        for i, (start, end) in enumerate(itertools.pairwise([*starts, n])):
            rows = end - start
            _rows_times(matrix[start:end], qt, buf[:rows, : qt.shape[1]], upcast_rows, gemv_threads)
            blocks = buf[: _round_up(rows, _BLOCK)]
            blocks[rows:].fill_(float("-inf"))  # the last block's rows past the end
            scores = buf[:rows, :batch].T  # [B, c] view
            deleted.fill(scores, i, start)
            excluded.fill(scores, i, start)
            chunk_ties = tie_ids[start:end] if tie_ids is not None else None
            cs, cr = _candidates(blocks, rows, batch, best_s[:, -1], kk, chunk_ties)
            if cs.shape[1]:
                cand_r = torch.cat([best_r, torch.where(cr >= 0, cr + start, cr)], 1)
                cand_ties = cand_r if tie_ids is None else tie_ids[cand_r.clamp(min=0)]
                best_s, best_r = lex_top(torch.cat([best_s, cs], 1), cand_r, cand_ties, kk)
    best_r = best_r.masked_fill(best_s == float("-inf"), -1)
    return best_s, best_r


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads for this thread set to n, and restored after."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


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


def _rows_times(
    block: torch.Tensor, qt: torch.Tensor, out: torch.Tensor, upcast_rows: int, threads: int
) -> None:
    """out [c, B] (rows may be strided) = block [c, D] @ qt [D, B] in fp32; reduced-precision rows
    are widened a cache-sized slice at a time (the scores keep fp32 resolution). A single query by
    gemv."""
    if qt.shape[1] == 1:
        gemv(block, qt[:, 0].numpy(), out[:, 0].numpy(), upcast_rows, threads)
    elif block.dtype == torch.float32:
        torch.mm(block, qt, out=out)
    else:
        wide = torch.empty(min(upcast_rows, block.shape[0]), block.shape[1])
        for a in range(0, block.shape[0], upcast_rows):
            part = block[a : a + upcast_rows]
            torch.mm(wide[: part.shape[0]].copy_(part), qt, out=out[a : a + part.shape[0]])


_GEMV_ROWS_PER_THREAD = 1 << 16
_gemv_pool: ThreadPoolExecutor | None = None
_gemv_pool_lock = threading.Lock()


def gemv(rows: torch.Tensor, q: np.ndarray, out: np.ndarray, upcast_rows: int, threads: int) -> None:
    """out [c] = rows [c, D] @ q [D] by numpy's BLAS, the rows split between up to `threads` threads
    (this one and pool workers; np.dot releases the GIL), each widening its own reduced-precision
    slices.

    Why: OpenBLAS (numpy's wheels) reads 1M x 64 rows at the memory's pace, 16-19 ms on one thread here
    and ~12 ms on two, against 22 ms for torch's MKL GEMM on a zero-padded second query and 33 ms for
    its gemv. OpenBLAS's own thread pool is held to one thread (above): its threads spin for the cores
    after each call and fight torch's; pool workers here sleep on a queue instead."""
    parts = max(1, min(threads, rows.shape[0] // _GEMV_ROWS_PER_THREAD))
    bounds = [rows.shape[0] * i // parts for i in range(parts + 1)]
    futures = [
        _pool().submit(_gemv_part, rows[a:b], q, out[a:b], upcast_rows)
        for a, b in itertools.pairwise(bounds[1:])
    ]
    _gemv_part(rows[: bounds[1]], q, out[: bounds[1]], upcast_rows)
    for future in futures:
        future.result()


def _gemv_part(rows: torch.Tensor, q: np.ndarray, out: np.ndarray, upcast_rows: int) -> None:
    if rows.dtype == torch.float32:
        _dot_rows(rows.numpy(), q, out)
        return
    wide = torch.empty(min(upcast_rows, rows.shape[0]), rows.shape[1])
    for a in range(0, rows.shape[0], upcast_rows):
        part = wide[: min(upcast_rows, rows.shape[0] - a)].copy_(rows[a : a + upcast_rows])
        _dot_rows(part.numpy(), q, out[a : a + part.shape[0]])


# OpenBLAS's gemv computes a call's rows in groups (of 4 on this machine) and the last c mod 4 with
# another kernel that rounds differently, so a row's score would depend on where it sits in the call:
# a shard (a subset of the rows) and the unsharded gateway would disagree in the last bit. Calls
# cover multiples of this many rows (the tail padded with zero rows): every row is computed by the
# same kernel, wherever the call starts.
_GEMV_ALIGN = 16


def _dot_rows(rows: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """out [c] = rows [c, D] @ q [D], each row's score the same float wherever it sits (_GEMV_ALIGN)."""
    c = rows.shape[0]
    main = c - c % _GEMV_ALIGN
    if main:
        np.dot(rows[:main], q, out=out[:main])
    if main < c:
        tail = np.zeros((_GEMV_ALIGN, rows.shape[1]), np.float32)
        tail[: c - main] = rows[main:]
        out[main:] = np.dot(tail, q)[: c - main]


def _pool() -> ThreadPoolExecutor:
    global _gemv_pool
    with _gemv_pool_lock:
        if _gemv_pool is None:
            workers = max(1, (os.cpu_count() or 2) - 1)
            # torch ops in a worker (widening bf16 slices) stay on that worker's own thread.
            _gemv_pool = ThreadPoolExecutor(workers, "gemv", initializer=torch.set_num_threads, initargs=(1,))
        return _gemv_pool


def _candidates(
    blocks: torch.Tensor, rows: int, batch: int, floor: torch.Tensor, kk: int, ties: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells of a chunk that may enter the top-kk of queries whose k-th best so far is floor [B]:
    (scores [B, m], chunk-local rows [B, m]) padded with -inf / -1. blocks [c', W]: the chunk's
    `rows` rows of scores, query b in column b, c' a multiple of _BLOCK (-inf past the chunk's end);
    ties: the chunk's tie ids (None: the row order).

    The cheapest way that keeps the gather small: the blocks whose best cell passes, else the
    cells that pass, else (the first chunk, rising scores) the chunk's own top-kk."""
    cap = max(4 * kk * batch, blocks.shape[0] * batch // 16)  # cells gathered at most
    if not bool(torch.isinf(floor).any()):  # else fewer than kk eligible so far: every cell passes
        cells = _passing_blocks(blocks, batch, floor, cap)
        if cells is None:
            cells = _passing_cells(blocks[:rows, :batch].T, floor, cap)
        if cells is not None:
            return _by_query(*cells, batch)
    scores = blocks[:rows, :batch].T.contiguous()  # [B, c]
    values, top = chunk_topk(scores, min(kk, rows), ties if ties is not None else torch.arange(rows))
    return values, top


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
