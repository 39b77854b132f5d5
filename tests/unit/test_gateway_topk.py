"""exact_topk against a brute-force numpy reference: masks, exclusions, chunking, ties, bf16."""

import itertools

import numpy as np
import pytest
import torch

from retrieval_gateway.topk import _product, exact_topk


def reference(queries, matrix, k, valid=None, exclude=None, tie_ids=None):
    """Brute force in float64: rank eligible rows by (score desc, tie asc)."""
    scores = queries.astype(np.float64) @ matrix.astype(np.float64).T  # [B, N]
    n = matrix.shape[0]
    ties = np.arange(n) if tie_ids is None else tie_ids
    out = []
    for b in range(queries.shape[0]):
        ok = np.ones(n, bool) if valid is None else valid.copy()
        if exclude is not None:
            ok[exclude[1][exclude[0] == b]] = False
        rows = np.flatnonzero(ok)
        order = np.lexsort((ties[rows], -scores[b, rows]))[:k]
        out.append((rows[order], scores[b, rows[order]]))
    return out


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def check(got, want):
    scores, rows = (t.numpy() for t in got)
    for b, (w_rows, w_scores) in enumerate(want):
        n = len(w_rows)
        np.testing.assert_array_equal(rows[b, :n], w_rows)
        np.testing.assert_allclose(scores[b, :n], w_scores, atol=1e-5)
        assert (rows[b, n:] == -1).all() and np.isneginf(scores[b, n:]).all()


@pytest.mark.parametrize("max_elements", [1 << 24, 700, 64])  # one chunk, several, chunk == k
@pytest.mark.parametrize("k", [1, 7, 64])
@pytest.mark.parametrize("batch", [1, 5])  # one query: scored by a gemv (topk_cpu.gemv)
def test_matches_brute_force_with_masks_and_exclusions(max_elements, k, batch):
    rng = np.random.default_rng(k)
    matrix, queries = unit(rng, 300, 16), unit(rng, batch, 16)
    valid = rng.random(300) > 0.2
    exclude = (rng.integers(0, batch, 200), rng.integers(0, 300, 200))
    masked = torch.from_numpy(np.flatnonzero(~valid))
    got = exact_topk(
        torch.from_numpy(queries), torch.from_numpy(matrix), k, masked_rows=masked,
        exclude=tuple(torch.from_numpy(a) for a in exclude), max_score_elements=max_elements,
    )  # fmt: skip
    assert got[0].shape == (batch, k)
    check(got, reference(queries, matrix, k, valid, exclude))


@pytest.mark.parametrize("max_elements", [1 << 24, 64])  # one chunk (masks set directly), several
def test_masks_and_exclusions_outside_the_matrix_are_ignored(max_elements):
    rng = np.random.default_rng(5)
    matrix, queries = unit(rng, 50, 8), unit(rng, 3, 8)
    masked = torch.tensor([-1, 3, 50, 10_000])  # only row 3 is in the matrix
    exclude = (torch.tensor([0, 1, 2, 2]), torch.tensor([7, -5, 50, 9]))  # only (0, 7) and (2, 9)
    got = exact_topk(torch.from_numpy(queries), torch.from_numpy(matrix), 10, masked_rows=masked,
                     exclude=exclude, max_score_elements=max_elements)  # fmt: skip
    valid = np.ones(50, bool)
    valid[3] = False
    check(got, reference(queries, matrix, 10, valid, (np.array([0, 2]), np.array([7, 9]))))


def test_fill_all_sets_the_masked_cells_only():
    from retrieval_gateway.topk_chunks import ChunkMasks

    scores = torch.zeros(3, 6)
    masked = torch.tensor([-1, 4, 6])  # only column 4 is inside
    exclude = (torch.tensor([0, 2, 1]), torch.tensor([1, 5, 9]))  # (0, 1) and (2, 5) are inside
    ChunkMasks.fill_all(scores, masked, exclude)
    want = torch.zeros(3, 6)
    want[:, 4] = want[0, 1] = want[2, 5] = float("-inf")
    assert torch.equal(scores, want)
    with pytest.raises(RuntimeError):  # scores it cannot write in place are an error, never unmasked
        ChunkMasks.fill_all(torch.zeros(6, 3).T, masked, exclude)


def test_k_larger_than_corpus_and_everything_masked():
    rng = np.random.default_rng(0)
    matrix, queries = unit(rng, 10, 8), unit(rng, 2, 8)
    valid = np.zeros(10, bool)
    valid[[2, 5, 7]] = True
    got = exact_topk(
        torch.from_numpy(queries),
        torch.from_numpy(matrix),
        50,
        masked_rows=torch.tensor([0, 1, 3, 4, 6, 8, 9]),
    )
    assert got[0].shape == (2, 10)  # K = min(k, N)
    check(got, reference(queries, matrix, 50, valid))
    scores, rows = exact_topk(
        torch.from_numpy(queries), torch.from_numpy(matrix), 3, masked_rows=torch.arange(10)
    )
    assert (rows == -1).all() and torch.isneginf(scores).all()


@pytest.mark.parametrize("max_elements", [1 << 20, 8])
def test_ties_rank_by_ascending_tie_id_even_at_the_cut(max_elements):
    # 40 rows with only 3 distinct vectors: massive exact ties, across chunk boundaries.
    rng = np.random.default_rng(1)
    basis = np.eye(4, dtype=np.float32)[:3]
    matrix = basis[rng.integers(0, 3, 40)]
    tie_ids = rng.permutation(1000)[:40].astype(np.int64) + 1  # post ids, unrelated to row order
    queries = np.array([[1.0, 0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 1.0]], np.float32)  # 2nd: all scores 0
    for k, qs in itertools.product((1, 5, 13, 40), (queries, queries[:1], queries[1:])):  # B = 2, 1, 1
        got = exact_topk(torch.from_numpy(qs), torch.from_numpy(matrix), k,
                         tie_ids=torch.from_numpy(tie_ids), max_score_elements=max_elements)  # fmt: skip
        check(got, reference(qs, matrix, k, tie_ids=tie_ids))


def test_bf16_storage_scores_in_fp32():
    rng = np.random.default_rng(2)
    matrix, queries = unit(rng, 2000, 32), unit(rng, 3, 32)
    as_bf16 = torch.from_numpy(matrix).bfloat16()
    got = exact_topk(torch.from_numpy(queries), as_bf16, 20, upcast_rows=300)  # several upcast slices
    # Exact against the bf16-rounded rows, with fp32 (not bf16) score resolution.
    check(got, reference(queries, as_bf16.float().numpy(), 20))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        exact_topk(torch.zeros(1, 4), torch.zeros(3, 4), 0)
    with pytest.raises(ValueError, match="do not match"):
        exact_topk(torch.zeros(1, 4), torch.zeros(3, 5), 1)
    scores, rows = exact_topk(torch.zeros(2, 4), torch.zeros(0, 4), 5)
    assert scores.shape == rows.shape == (2, 0)


@pytest.mark.slow  # compiles a C++ kernel with inductor (seconds to tens of seconds on a small CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gemv_matches_the_matmul_path(dtype):
    rng = np.random.default_rng(4)
    matrix, queries = unit(rng, 3000, 32), unit(rng, 1, 32)
    stored = torch.from_numpy(matrix).to(dtype)
    masked = torch.tensor([5, 17, 2999])
    plain = exact_topk(torch.from_numpy(queries), stored, 50, masked_rows=masked)
    fused = exact_topk(torch.from_numpy(queries), stored, 50, masked_rows=masked, fused_gemv=True)
    assert torch.equal(plain[1], fused[1])
    torch.testing.assert_close(plain[0], fused[0], atol=1e-5, rtol=0)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    rng = np.random.default_rng(3)
    matrix, queries = unit(rng, 5000, 64), unit(rng, 8, 64)
    for dtype in (torch.float32, torch.bfloat16):
        m = torch.from_numpy(matrix).to(dtype)
        cpu = exact_topk(torch.from_numpy(queries), m, 100)
        gpu_s, gpu_r = (t.cpu() for t in exact_topk(torch.from_numpy(queries).cuda(), m.cuda(), 100))
        # The devices sum the D products in different orders (~1e-7 apart): rows whose scores are that
        # close may trade places, nothing else. Scores agree; each returned row's CPU score is its own.
        torch.testing.assert_close(cpu[0], gpu_s, atol=1e-5, rtol=0)
        cpu_all = torch.from_numpy(queries) @ m.float().T
        torch.testing.assert_close(cpu_all.gather(1, gpu_r), cpu[0], atol=1e-5, rtol=0)
        swapped = (cpu[1] != gpu_r).float().mean().item()
        assert swapped <= 0.02, f"{swapped:.1%} of places differ"


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("n", [1000, 40_000])  # short and tall matrices take different products
def test_product_paths_equal_the_plain_matmul(batch, n):
    g = torch.Generator().manual_seed(batch)
    q, rows = torch.randn(batch, 16, generator=g), torch.randn(n, 16, generator=g)
    got = _product(q, rows)
    assert got.shape == (batch, n) and got.is_contiguous()
    torch.testing.assert_close(got, q @ rows.T, atol=1e-5, rtol=1e-5)
