"""The split query's scores and their block maxima in one pass over the rows (Triton, cuda). No grpc
import.

`device_topk` scores bf16/fp16 rows against a query split into hi + lo terms (topk_chunks.split_query),
then its prefilter reads the scores again for each block's max. With cuBLAS that is a [2B, c] fp32
GEMM output, an add and an amax pass: at B=32 over 10M x 64 bf16 on an H200, 1.1 + 0.9 + 0.36 ms of
device time for a 1.28 GB matrix (docs/decisions.md "GPU top-k"). Here each program multiplies one
tile of rows by both terms on the tensor cores (bf16 products are exact in fp32, accumulated in
fp32), adds them in registers with a per-row bias (-inf for deleted rows) and writes the [B, c] fp32
scores and the max of each block of `block` columns: the matrix is read once and the scores written
once (0.76-0.78 ms for the same work).

Used when Triton imports and `fused_scores_ok()` (a one-time check against the cuBLAS path on the
device) passes; otherwise the cuBLAS path runs as before. The kernel also runs under Triton's
interpreter (TRITON_INTERPRET=1, CPU tensors), which is how tests without a GPU cover it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
from collections.abc import Callable

import torch

from retrieval_gateway.topk_chunks import block_maxima, split_query

log = logging.getLogger(__name__)

MAX_DIM = 512  # wider rows: the cuBLAS path (a tile of rows must fit the kernel's registers)
NUM_WARPS = 4  # 2 and 8 measured within 10% of it on an H200 (bench/gpu_profile.py --fused-only)
_REDUCED = (torch.bfloat16, torch.float16)


@functools.cache
def _kernel() -> Callable:
    """The jitted kernel, defined at first use: importing Triton costs time every gateway would pay,
    and TRITON_INTERPRET is read when a kernel is defined."""
    import triton
    import triton.language as tl

    # the sizes vary per call: specialising on them (== 1, multiple of 16) would compile anew mid-serving
    @triton.jit(do_not_specialize=["n_queries", "n_rows", "stride_out", "stride_max"])
    def split_scores_kernel(
        hi_ptr, lo_ptr, x_ptr, bias_ptr, out_ptr, max_ptr,
        n_queries, n_rows, dim, stride_q, stride_x, stride_out, stride_max,
        DIM_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_q = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, DIM_P)
        row_ok = rows < n_rows
        q_ok = qs < n_queries
        d_ok = d < dim
        x = tl.load(
            x_ptr + rows.to(tl.int64)[:, None] * stride_x + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        q_off = qs.to(tl.int64)[:, None] * stride_q + d[None, :]
        q_mask = q_ok[:, None] & d_ok[None, :]
        hi = tl.load(hi_ptr + q_off, mask=q_mask, other=0.0)
        lo = tl.load(lo_ptr + q_off, mask=q_mask, other=0.0)
        xt = tl.trans(x)
        acc = tl.dot(hi, xt, out_dtype=tl.float32)
        acc += tl.dot(lo, xt, out_dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0)[None, :]
        acc = tl.where(row_ok[None, :], acc, float("-inf"))
        out_off = qs.to(tl.int64)[:, None] * stride_out + rows[None, :]
        tl.store(out_ptr + out_off, acc, mask=q_ok[:, None] & row_ok[None, :])
        tl.store(max_ptr + qs.to(tl.int64) * stride_max + pid_n, tl.max(acc, axis=1), mask=q_ok)

    return split_scores_kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def available(matrix: torch.Tensor) -> bool:
    """Whether the fused kernel can score this matrix (Triton present, reduced precision, not too wide)."""
    return matrix.dtype in _REDUCED and 1 <= matrix.shape[1] <= MAX_DIM and _installed()


@functools.cache
def _installed() -> bool:
    """Whether Triton can be imported (looked up once: a search of sys.path for a missing package costs
    more than a small search)."""
    return importlib.util.find_spec("triton") is not None


def split_scores(
    hi: torch.Tensor, lo: torch.Tensor, rows: torch.Tensor, block: int, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """hi, lo [B, D] and rows [c, D] in one reduced dtype -> (scores [B, c] fp32 = hi·rows + lo·rows
    (+ bias [c] fp32 per row, e.g. -inf for deleted rows), maxima [B, ceil(c / block)] fp32: the max
    of each block of `block` columns, the last one short). block: a power of two >= 16."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    batch, dim = hi.shape
    c = rows.shape[0]
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    hi, lo = hi.contiguous(), lo.contiguous()
    scores = torch.empty(batch, c, device=rows.device, dtype=torch.float32)
    blocks = _cdiv(c, block)
    maxima = torch.empty(batch, blocks, device=rows.device, dtype=torch.float32)
    dim_p = max(16, _pow2(dim))
    block_q = min(64, max(16, _pow2(batch)))
    if block_q * block * dim_p > 64 * 128 * 128:  # keep a tile's operands within registers
        block_q = 16
    grid = (blocks, _cdiv(batch, block_q))
    _kernel()[grid](
        hi, lo, rows, scores if bias is None else bias, scores, maxima, batch, c, dim, hi.stride(0),
        rows.stride(0), scores.stride(0), maxima.stride(0), DIM_P=dim_p, BLOCK_Q=block_q, BLOCK_N=block,
        HAS_BIAS=bias is not None, num_warps=NUM_WARPS,
    )  # fmt: skip
    return scores, maxima


_CHECKED: dict[tuple[str, torch.dtype, int], bool] = {}
_CHECK_LOCK = threading.Lock()


def fused_scores_ok(device: torch.device, dtype: torch.dtype, block: int, dim: int) -> bool:
    """Once per (device, dtype, dim): compile the kernel's variants (query tiles of 16, 32 and 64, with
    and without a bias) and compare each with the unfused computation on a small random problem. A
    failure (no compiler, a Triton bug, a mismatch) is logged once and the caller keeps the cuBLAS
    path. The gateway runs it when a corpus loads, so no request waits for a compilation."""
    key = (str(device), dtype, dim)
    with _CHECK_LOCK:
        if key not in _CHECKED:
            _CHECKED[key] = _self_check(device, dtype, block, dim)
        return _CHECKED[key]


def _self_check(device: torch.device, dtype: torch.dtype, block: int, dim: int) -> bool:
    try:
        gen = torch.Generator().manual_seed(7)
        rows = torch.randn(3 * block + 5, dim, generator=gen).to(dtype)
        deleted = torch.zeros(rows.shape[0]).index_fill_(0, torch.arange(0, rows.shape[0], 3), float("-inf"))
        for batch, bias in [(5, None), (5, deleted), (20, None), (20, deleted), (40, None), (40, deleted)]:
            hi, lo = split_query(torch.randn(batch, dim, generator=gen), dtype).split(batch)
            want = hi.float() @ rows.float().T + lo.float() @ rows.float().T
            if bias is not None:
                want += bias
            got, maxima = split_scores(hi.to(device), lo.to(device), rows.to(device), block,
                                       None if bias is None else bias.to(device))  # fmt: skip
            got, maxima = got.cpu(), maxima.cpu()
            same = torch.allclose(got, want, rtol=1e-5, atol=1e-5)
            if not (same and torch.equal(maxima, block_maxima(got, block))):
                log.warning("fused split-query scores disagree with the unfused path on %s (batch %d, "
                            "bias %s); the cuBLAS path is used", device, batch, bias is not None)  # fmt: skip
                return False
        return True
    except Exception:  # any failure means: keep the cuBLAS path
        log.warning("fused split-query scores unavailable on %s; the cuBLAS path is used", device,
                    exc_info=True)  # fmt: skip
        return False
