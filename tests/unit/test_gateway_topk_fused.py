"""The fused split-query scorer of the accelerator loop (topk_triton: scores and block maxima in one
pass, deleted rows as a bias, maxima refreshed after exclusions) and the host's ordering of runs of
equal scores. The loop runs on CPU with a torch stand-in for the kernel (CI has neither a GPU nor
Triton); the kernel itself runs under Triton's interpreter where Triton is installed, and on cuda."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval_gateway import topk, topk_triton
from retrieval_gateway.topk import DEFAULT_MAX_SCORE_ELEMENTS, accelerator_topk, exact_topk
from retrieval_gateway.topk_chunks import ChunkMasks, block_maxima, lex_top, order_runs
from tests.unit.test_gateway_topk import check, reference, unit

REPO = Path(__file__).resolve().parents[2]
HAS_TRITON = topk_triton._installed()


def stand_in(hi, lo, rows, block, bias=None):
    """What the kernel computes, in torch: the scores (+ bias) and their block maxima."""
    scores = hi.float() @ rows.float().T + lo.float() @ rows.float().T
    if bias is not None:
        scores += bias
    return scores, block_maxima(scores, block)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kernel replaced by the stand-in; counts its calls and the biases it got."""
    calls = []
    monkeypatch.setattr(
        topk_triton, "available", lambda matrix: matrix.dtype in (torch.bfloat16, torch.float16)
    )

    def fake(hi, lo, rows, block, bias=None):
        calls.append(bias)
        return stand_in(hi, lo, rows, block, bias)

    monkeypatch.setattr(topk_triton, "split_scores", fake)
    return calls


def fused_path(queries, matrix, k, *, masked=None, exclude=None, max_elements=None, prefilter=True, block=16):
    return accelerator_topk(
        queries, matrix, k, masked, exclude, None, max_elements or DEFAULT_MAX_SCORE_ELEMENTS, None,
        gemm=True, prefilter_min_batch=1 if prefilter else 1 << 30, prefilter_block=block, fused=True,
    )  # fmt: skip


@pytest.mark.parametrize("prefilter", [False, True])
@pytest.mark.parametrize("max_elements", [1 << 24, 5 * 750])  # one chunk, two (of 2 x 750 rows)
@pytest.mark.parametrize("k", [1, 7])
def test_fused_path_matches_brute_force_with_masks_and_exclusions(k, max_elements, prefilter, kernel_calls):
    rng = np.random.default_rng(k)
    stored = torch.from_numpy(unit(rng, 3000, 16)).bfloat16()
    queries = unit(rng, 5, 16)
    valid = rng.random(3000) > 0.2
    exclude = (rng.integers(0, 5, 2000), rng.integers(0, 3000, 2000))
    got = fused_path(
        torch.from_numpy(queries), stored, k, masked=torch.from_numpy(np.flatnonzero(~valid)),
        exclude=tuple(torch.from_numpy(a) for a in exclude), max_elements=max_elements, prefilter=prefilter,
    )  # fmt: skip
    check(got, reference(queries, stored.float().numpy(), k, valid, exclude))
    assert len(kernel_calls) == (1 if max_elements > 5 * 3000 else 2)  # fused chunks are twice as long
    # deleted rows reach the kernel as a bias of -inf at their rows, 0 elsewhere
    bias = torch.cat(kernel_calls)
    assert (
        torch.equal(torch.isneginf(bias), torch.from_numpy(~valid))
        and (bias[torch.from_numpy(valid)] == 0).all()
    )


def test_maxima_are_refreshed_after_exclusions(kernel_calls, monkeypatch):
    # Each query excludes its 60 best rows: their blocks' maxima from the kernel are stale (too high),
    # and a prefilter trusting them would keep blocks of excluded cells in place of the right ones.
    rng = np.random.default_rng(3)
    stored = torch.from_numpy(unit(rng, 4000, 16)).bfloat16()
    queries = unit(rng, 4, 16)
    best = np.argsort(-(queries @ stored.float().numpy().T), axis=1)[:, :60]
    exclude = (np.repeat(np.arange(4), 60), best.ravel())
    want = reference(queries, stored.float().numpy(), 3, None, exclude)
    pairs = tuple(torch.from_numpy(a) for a in exclude)
    check(fused_path(torch.from_numpy(queries), stored, 3, exclude=pairs), want)
    monkeypatch.setattr(ChunkMasks, "refresh_maxima", lambda *a: None)
    with pytest.raises(AssertionError):  # the test can fail: without the refresh the answer is wrong
        check(fused_path(torch.from_numpy(queries), stored, 3, exclude=pairs), want)


def test_fused_is_chosen_only_where_it_can_run():
    cpu_bf16 = torch.zeros(10, 64, dtype=torch.bfloat16)
    assert not topk._use_fused(None, cpu_bf16, 32, 128)  # auto: cuda only
    assert not topk._use_fused(True, torch.zeros(10, 64), 32, 128)  # fp32 rows: no split query
    assert not topk._use_fused(True, torch.zeros(10, 1024, dtype=torch.bfloat16), 32, 128)  # too wide
    assert topk._use_fused(True, cpu_bf16, 32, 128) == HAS_TRITON


def test_a_failing_or_wrong_kernel_keeps_the_cublas_path(monkeypatch, caplog):
    monkeypatch.setattr(topk_triton, "_CHECKED", {})
    monkeypatch.setattr(
        topk_triton, "split_scores", lambda *a: (_ for _ in ()).throw(RuntimeError("no ptxas"))
    )
    with caplog.at_level(logging.WARNING):
        assert not topk_triton.fused_scores_ok(torch.device("cpu"), torch.bfloat16, 128, 64)
    assert "no ptxas" in caplog.text

    def off_by_one(hi, lo, rows, block, bias=None):
        scores, maxima = stand_in(hi, lo, rows, block, bias)
        return scores + 1e-3, maxima + 1e-3

    monkeypatch.setattr(topk_triton, "_CHECKED", {})
    monkeypatch.setattr(topk_triton, "split_scores", off_by_one)
    assert not topk_triton.fused_scores_ok(torch.device("cpu"), torch.bfloat16, 128, 64)
    monkeypatch.setattr(topk_triton, "_CHECKED", {})
    monkeypatch.setattr(topk_triton, "split_scores", stand_in)
    assert topk_triton.fused_scores_ok(torch.device("cpu"), torch.bfloat16, 128, 64)


def test_kernel_rejects_a_block_that_is_not_a_power_of_two():
    x = torch.zeros(4, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="power of two"):
        topk_triton.split_scores(x, x, x, 100)


@pytest.mark.parametrize("seed", range(4))
def test_order_runs_matches_lex_top(seed):
    rng = np.random.default_rng(seed)
    scores = torch.from_numpy(rng.integers(0, 30, (6, 50)).astype(np.float32))  # many runs
    scores[1, 40:] = float("-inf")
    scores = scores.sort(dim=1, descending=True).values
    rows = torch.from_numpy(rng.permutation(6 * 50).reshape(6, 50))
    tie_ids = torch.from_numpy(rng.permutation(1000))
    got = order_runs(scores, rows, tie_ids)
    want_s, want_r = lex_top(scores, rows, tie_ids[rows], 50)
    finite = torch.isfinite(scores)
    assert torch.equal(want_s, scores) and torch.equal(got[finite], want_r[finite])
    assert torch.equal(order_runs(scores, rows, None)[finite], lex_top(scores, rows, rows, 50)[1][finite])


@pytest.mark.parametrize("accelerator", [False, True])
def test_queries_that_require_grad_are_ranked_with_ties(accelerator):
    # The host orders runs of equal scores in numpy, which refuses tensors that require grad.
    matrix = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)  # two: a GEMM, not numpy's gemv
    if accelerator:
        got = accelerator_topk(q, matrix, 3, None, None, None, 1 << 20, None, gemm=False)
    else:
        got = exact_topk(q, matrix, 3)
    assert got[1].tolist() == [[0, 1, 3]] * 2 and got[0].tolist() == [[1.0, 1.0, 1.0]] * 2


def test_order_runs_leaves_distinct_scores_alone():
    scores = torch.tensor([[3.0, 2.0, 1.0]])
    rows = torch.tensor([[9, 4, 7]])
    assert order_runs(scores, rows, None) is rows


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (its interpreter runs the kernel on CPU)")
def test_kernel_under_the_interpreter():
    # A child process: TRITON_INTERPRET is read when the kernel is defined. fp16, which the interpreter
    # supports (it misreads bf16; the cuda test covers bf16).
    code = """
import json, torch
from retrieval_gateway import topk_triton
from retrieval_gateway.topk_chunks import block_maxima
out = {"ok": topk_triton.fused_scores_ok(torch.device("cpu"), torch.float16, 128, 48)}
g = torch.Generator().manual_seed(0)
for b, c, d in [(1, 1000, 64), (20, 300, 48), (70, 129, 200)]:
    q = torch.randn(b, d, generator=g)
    rows = torch.randn(c, d, generator=g).half()
    bias = torch.zeros(c).index_fill_(0, torch.arange(0, c, 7), float("-inf"))
    hi = q.half(); lo = (q - hi.float()).half()
    scores, maxima = topk_triton.split_scores(hi, lo, rows, 128, bias)
    want = hi.float() @ rows.float().T + lo.float() @ rows.float().T + bias
    out[f"{b}x{c}x{d}"] = [bool(torch.allclose(scores, want, rtol=1e-5, atol=1e-5)),
                           bool(torch.equal(maxima, block_maxima(scores, 128))), list(maxima.shape)]
print(json.dumps(out))
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {
        "ok": True, "1x1000x64": [True, True, [1, 8]], "20x300x48": [True, True, [20, 3]],
        "70x129x200": [True, True, [70, 2]],
    }  # fmt: skip


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_cuda_fused_path_finds_the_exact_top_k():
    # Against brute force in float64 over the stored bf16 rows. Not row for row against the cuBLAS
    # path or the CPU: their fp32 sums round differently (~3e-7 on an H200), which may swap near-ties.
    rng = np.random.default_rng(11)
    stored = torch.from_numpy(unit(rng, 300_000, 64)).bfloat16()
    matrix = stored.cuda()
    queries = unit(rng, 32, 64)
    valid = np.ones(300_000, bool)
    valid[rng.choice(300_000, 500, replace=False)] = False
    exclude = (np.repeat(np.arange(32), 50), rng.integers(0, 300_000, 1600))
    assert topk_triton.fused_scores_ok(matrix.device, torch.bfloat16, 128, 64)
    scores, rows = accelerator_topk(
        torch.from_numpy(queries), matrix, 100, torch.from_numpy(np.flatnonzero(~valid)),
        tuple(torch.from_numpy(a) for a in exclude), None, 1 << 28, None, gemm=True, fused=True,
    )  # fmt: skip
    exact = queries.astype(np.float64) @ stored.double().numpy().T
    for b, (w_rows, w_scores) in enumerate(reference(queries, stored.float().numpy(), 100, valid, exclude)):
        got = rows[b].numpy()
        assert valid[got].all() and not np.isin(got, exclude[1][exclude[0] == b]).any()
        # the split query carries ~16 bits: scores within a few 1e-6 of exact, near-ties may swap
        np.testing.assert_allclose(scores[b].numpy(), exact[b, got], atol=5e-6)
        np.testing.assert_allclose(np.sort(exact[b, got])[::-1], w_scores, atol=5e-6)
        assert (exact[b, got[~np.isin(got, w_rows)]] >= w_scores[-1] - 5e-6).all()
