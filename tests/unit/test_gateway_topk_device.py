"""The cuda strategy of exact_topk (fp32-output GEMM on a split query, masks cut by chunk on the host,
a block-max prefilter for batches, one copy to the host and the tie check there), forced on CPU
against the same brute force as test_gateway_topk: CI has no GPU, and this is the code a GPU runs."""

import warnings

import numpy as np
import pytest
import torch

from retrieval_gateway import topk, topk_device
from retrieval_gateway.topk import DEFAULT_MAX_SCORE_ELEMENTS, accelerator_topk, exact_topk
from retrieval_gateway.topk_chunks import split_query
from tests.unit.test_gateway_topk import check, reference, unit


def device_path(queries, matrix, k, *, masked=None, exclude=None, tie_ids=None, max_elements=None,
                prefilter=False):  # fmt: skip
    return accelerator_topk(
        queries, matrix, k, masked, exclude, tie_ids, max_elements or DEFAULT_MAX_SCORE_ELEMENTS, None,
        gemm=True, prefilter_min_batch=1 if prefilter else 1 << 30, prefilter_block=4,
    )  # fmt: skip


@pytest.fixture
def prefilters(monkeypatch):
    """Counts the chunks that took the block-max prefilter."""
    calls = []
    real = topk_device._prefilter
    monkeypatch.setattr(topk_device, "_prefilter", lambda *a: calls.append(a[1]) or real(*a))
    return calls


@pytest.mark.parametrize("prefilter", [False, True])
@pytest.mark.parametrize("max_elements", [1 << 24, 7000, 64])  # one chunk, several, chunk == k + 1
@pytest.mark.parametrize("k", [1, 7, 64])
def test_device_path_matches_brute_force_with_masks_and_exclusions(max_elements, k, prefilter, prefilters):
    rng = np.random.default_rng(k)
    matrix, queries = unit(rng, 3000, 16), unit(rng, 5, 16)
    valid = rng.random(3000) > 0.2
    exclude = (rng.integers(0, 5, 2000), rng.integers(0, 3000, 2000))
    got = device_path(
        torch.from_numpy(queries), torch.from_numpy(matrix), k,
        masked=torch.from_numpy(np.flatnonzero(~valid)[::-1].copy()),  # unsorted on purpose
        exclude=tuple(torch.from_numpy(a) for a in exclude), max_elements=max_elements, prefilter=prefilter,
    )  # fmt: skip
    assert got[0].device.type == got[1].device.type == "cpu"
    check(got, reference(queries, matrix, k, valid, exclude))
    # the prefilter runs where it is asked for and the chunk is long enough (8 x its k + 1 blocks of 4)
    assert bool(prefilters) == (prefilter and min(3000, max_elements // 5) >= 8 * (k + 1) * 4)


def test_by_default_batches_take_the_prefilter_and_single_queries_do_not(prefilters):
    rng = np.random.default_rng(9)
    matrix, queries = torch.from_numpy(unit(rng, 3000, 16)), torch.from_numpy(unit(rng, 2, 16))
    for batch, used in [(1, False), (2, True)]:
        prefilters.clear()
        got = accelerator_topk(queries[:batch], matrix, 1, None, None, None, 1 << 24, None, gemm=True)
        check(got, reference(queries[:batch].numpy(), matrix.numpy(), 1))
        assert bool(prefilters) == used


@pytest.mark.parametrize("c", [64, 67, 1000])  # whole blocks, a short last block, many blocks
@pytest.mark.parametrize("keep", [1, 5, 16])
def test_prefilter_keeps_what_topk_keeps(c, keep):
    g = torch.Generator().manual_seed(c * keep)
    scores = torch.randn(6, c, generator=g)
    scores[0] = scores[0].round()  # many equal scores
    scores[1, : c - 3] = float("-inf")  # almost nothing eligible
    scores[2] = torch.arange(c, dtype=torch.float32)  # the best cells in the short last block
    values, cols = topk_device._prefilter(scores, keep, 4)
    want = torch.topk(scores, keep, dim=1).values
    assert torch.equal(values, want)
    finite = torch.isfinite(values)
    assert torch.equal(scores.gather(1, cols.clamp(max=c - 1))[finite], values[finite])
    for b in range(6):
        picked = cols[b][finite[b]].tolist()
        assert len(set(picked)) == len(picked)


@pytest.mark.parametrize("prefilter", [False, True])
@pytest.mark.parametrize("max_elements", [1 << 20, 16])
def test_device_path_reruns_for_a_tie_at_the_cut_only(max_elements, prefilter, monkeypatch):
    rng = np.random.default_rng(1)
    basis = np.eye(4, dtype=np.float32)[:3]
    groups = rng.integers(0, 3, 400)
    matrix = basis[groups]
    tie_ids = rng.permutation(10_000)[:400].astype(np.int64) + 1
    queries = np.array([[1.0, 0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 1.0]], np.float32)
    calls = []
    real = topk._exact_topk
    monkeypatch.setattr(topk, "_exact_topk", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    first = int((groups == 0).sum())
    for q, k, tied in [(queries, 5, True), (queries, 400, False), (queries[:1], first, False),
                       (queries[:1], first + 3, True)]:  # fmt: skip
        calls.clear()
        got = device_path(torch.from_numpy(q), torch.from_numpy(matrix), k, tie_ids=torch.from_numpy(tie_ids),
                          max_elements=max_elements, prefilter=prefilter)  # fmt: skip
        check(got, reference(q, matrix, k, tie_ids=tie_ids))
        # All scores of the 2nd query are 0; the 1st query's are 1, 0.5 or 0.25 by group: a cut after
        # the 1s is no tie (the run of 1s is ordered by tie id on the host), 3 more is.
        assert calls == ([{"gemm": True, "query_terms": 2}] if tied else [])


def test_device_path_orders_runs_of_equal_scores_by_tie_id():
    matrix = np.repeat(np.eye(3, 4, dtype=np.float32), [5, 7, 9], axis=0)
    tie_ids = np.arange(21, dtype=np.int64)[::-1].copy()  # the last rows rank first in a tie
    queries = np.array([[1.0, 0.5, 0.25, 0.0]], np.float32)
    scores, rows = device_path(torch.from_numpy(queries), torch.from_numpy(matrix), 12,
                               tie_ids=torch.from_numpy(tie_ids))  # fmt: skip
    assert rows[0].tolist() == [4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 5]
    assert scores[0].tolist() == [1.0] * 5 + [0.5] * 7


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("width", [1, 101])
def test_candidates_travel_to_the_host_packed_in_one_tensor(batch, width):
    g = torch.Generator().manual_seed(width)
    scores = torch.randn(batch, width, generator=g)
    scores[0, 0] = float("-inf")
    rows = torch.randint(-1, 1 << 40, (batch, width), generator=g)
    packed = topk_device._pack(scores, rows)
    assert packed.dtype == torch.int32 and packed.shape == (batch, 3 * width)
    got_scores, got_rows = topk_device._unpack(packed.clone(), width)  # a fresh tensor, as .cpu() gives
    assert torch.equal(got_scores, scores) and torch.equal(got_rows, rows)


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
    split = split_query(q, dtype)
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
    # the cut: the one synchronising call allowed is the copy of the candidates to the host.
    rng = np.random.default_rng(8)
    matrix = torch.from_numpy(unit(rng, 20_000, 64)).to("cuda", torch.bfloat16)
    queries = torch.from_numpy(unit(rng, 4, 64)).cuda()
    ties = torch.arange(1, 20_001, device="cuda")
    masked = torch.tensor([5, 7_000, 19_999])
    exclude = (torch.tensor([0, 3, 3]), torch.tensor([10, 15_000, 3]))
    topk.prepare(matrix)  # what the index does when a corpus loads: the fused kernel's one-time check
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
    assert scores.device.type == rows.device.type == "cpu"
    assert torch.equal(cpu[1], rows)
    torch.testing.assert_close(cpu[0], scores, atol=5e-6, rtol=0)
