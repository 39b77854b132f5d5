"""The cuda strategy of exact_topk (fp32-output GEMM on a split query, masks cut by chunk on the host,
ties at a chunk's cut deferred to one check after the loop), forced on CPU against the same brute
force as test_gateway_topk: CI has no GPU, and this is the code a GPU runs."""

import warnings

import numpy as np
import pytest
import torch

from retrieval_gateway import topk
from retrieval_gateway.topk import DEFAULT_MAX_SCORE_ELEMENTS, _exact_topk, _split_query, exact_topk
from tests.unit.test_gateway_topk import check, reference, unit


def device_path(queries, matrix, k, *, masked=None, exclude=None, tie_ids=None, max_elements=None):
    return _exact_topk(
        queries, matrix, k, masked, exclude, tie_ids, max_elements or DEFAULT_MAX_SCORE_ELEMENTS, None,
        False, gemm=True, defer_ties=True,
    )  # fmt: skip


@pytest.mark.parametrize("max_elements", [1 << 24, 700, 64])  # one chunk, several, chunk == k
@pytest.mark.parametrize("k", [1, 7, 64])
def test_device_path_matches_brute_force_with_masks_and_exclusions(max_elements, k):
    rng = np.random.default_rng(k)
    matrix, queries = unit(rng, 300, 16), unit(rng, 5, 16)
    valid = rng.random(300) > 0.2
    exclude = (rng.integers(0, 5, 200), rng.integers(0, 300, 200))
    got = device_path(
        torch.from_numpy(queries), torch.from_numpy(matrix), k,
        masked=torch.from_numpy(np.flatnonzero(~valid)[::-1].copy()),  # unsorted on purpose
        exclude=tuple(torch.from_numpy(a) for a in exclude), max_elements=max_elements,
    )  # fmt: skip
    check(got, reference(queries, matrix, k, valid, exclude))


@pytest.mark.parametrize("max_elements", [1 << 20, 8])
def test_device_path_resolves_ties_at_the_cut_after_the_loop(max_elements, monkeypatch):
    rng = np.random.default_rng(1)
    basis = np.eye(4, dtype=np.float32)[:3]
    matrix = basis[rng.integers(0, 3, 40)]
    tie_ids = rng.permutation(1000)[:40].astype(np.int64) + 1
    queries = np.array([[1.0, 0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 1.0]], np.float32)
    calls = []
    real = topk._exact_topk
    monkeypatch.setattr(topk, "_exact_topk", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    for k in (1, 5, 13, 40):
        calls.clear()
        got = device_path(torch.from_numpy(queries), torch.from_numpy(matrix), k,
                          tie_ids=torch.from_numpy(tie_ids), max_elements=max_elements)  # fmt: skip
        check(got, reference(queries, matrix, k, tie_ids=tie_ids))
        # The 2nd query's scores are all 0: a chunk longer than k is cut inside a tie, hence one rerun
        # (chunks of exactly k rows are taken whole, and lex_top orders the merge).
        cut = max(k, min(40, max_elements // 2)) > k
        assert calls == ([{"gemm": True, "defer_ties": False, "query_terms": 2}] if cut else [])


def test_device_path_without_ties_runs_once(monkeypatch):
    rng = np.random.default_rng(5)
    matrix, queries = unit(rng, 500, 16), unit(rng, 4, 16)
    calls = []
    real = topk._exact_topk
    monkeypatch.setattr(topk, "_exact_topk", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    check(device_path(torch.from_numpy(queries), torch.from_numpy(matrix), 20, max_elements=400),
          reference(queries, matrix, 20))  # fmt: skip
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_query_keeps_about_16_bits(dtype):
    q = torch.from_numpy(unit(np.random.default_rng(6), 8, 64))
    split = _split_query(q, dtype)
    assert split.dtype == dtype and split.shape == (16, 64)
    rebuilt = split[:8].float() + split[8:].float()
    assert (rebuilt - q).abs().max() <= 2**-16 * q.abs().max()
    assert (split[:8].float() - q).abs().max() > 2**-12 * q.abs().max()  # one term alone would not


def test_gemm_path_matches_the_widening_path_on_bf16_storage():
    rng = np.random.default_rng(7)
    matrix, queries = unit(rng, 3000, 64), unit(rng, 6, 64)
    stored = torch.from_numpy(matrix).bfloat16()
    masked = torch.tensor([3, 999, 2000])
    widened = exact_topk(torch.from_numpy(queries), stored, 100, masked_rows=masked)
    gemm = device_path(torch.from_numpy(queries), stored, 100, masked=masked, max_elements=6 * 700)
    assert torch.equal(widened[1], gemm[1])
    torch.testing.assert_close(widened[0], gemm[0], atol=5e-6, rtol=0)
    # Exact against the bf16-rounded rows with an fp32 query (not a bf16-rounded one).
    valid = np.ones(3000, bool)
    valid[masked.numpy()] = False
    check(gemm, reference(queries, stored.float().numpy(), 100, valid))


@pytest.mark.cuda
def test_cuda_chunk_loop_never_waits_for_the_device():
    # Several chunks, deleted rows and exclusions on the host, bf16 storage (the GEMM path), no tie at
    # any cut: the one synchronising call allowed is the tie check after the loop.
    rng = np.random.default_rng(8)
    matrix = torch.from_numpy(unit(rng, 20_000, 64)).to("cuda", torch.bfloat16)
    queries = torch.from_numpy(unit(rng, 4, 64)).cuda()
    ties = torch.arange(1, 20_001, device="cuda")
    masked = torch.tensor([5, 7_000, 19_999])
    exclude = (torch.tensor([0, 3, 3]), torch.tensor([10, 15_000, 3]))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores, rows = exact_topk(queries, matrix, 100, masked_rows=masked, exclude=exclude,
                                      tie_ids=ties, max_score_elements=4 * 3_000)  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, syncs
    cpu = exact_topk(queries.cpu(), matrix.cpu(), 100, masked_rows=masked, exclude=exclude,
                     tie_ids=ties.cpu(), max_score_elements=4 * 3_000)  # fmt: skip
    assert torch.equal(cpu[1], rows.cpu())
    torch.testing.assert_close(cpu[0], scores.cpu(), atol=5e-6, rtol=0)
