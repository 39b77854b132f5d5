"""The gathering CPU scan of exact_topk (large corpora on CPU) against the same brute force as
test_gateway_topk, on small matrices with small chunks so that every tier runs: the first chunk's
full top-k, the blocks whose best cell passes, the cells that pass, and the full top-k again where
too many pass."""

import threading

import numpy as np
import pytest
import torch

from retrieval_gateway import topk, topk_cpu
from retrieval_gateway.topk import exact_topk
from retrieval_gateway.topk_cpu import cpu_scan, gemv, scan_pays
from tests.unit.test_gateway_topk import check, reference, unit


def scan(queries, matrix, k, *, masked=None, exclude=None, tie_ids=None, max_elements=1 << 22, upcast=32_768):
    return cpu_scan(queries, matrix, k, masked, exclude, tie_ids, max_elements, upcast)


@pytest.fixture
def tiers(monkeypatch):
    """How many chunks each tier answered."""
    counts = {"blocks": 0, "cells": 0, "full": 0}

    def spy(name, real):
        def counted(*args):
            got = real(*args)
            counts[name] += got is not None
            return got

        return counted

    monkeypatch.setattr(topk_cpu, "_passing_blocks", spy("blocks", topk_cpu._passing_blocks))
    monkeypatch.setattr(topk_cpu, "_passing_cells", spy("cells", topk_cpu._passing_cells))
    monkeypatch.setattr(topk_cpu, "chunk_topk", spy("full", topk_cpu.chunk_topk))
    return counts


@pytest.mark.parametrize("batch", [1, 5, 9, 33])  # numpy gemv; narrow; padded to 32; to 64 columns
@pytest.mark.parametrize("k", [1, 5, 40])
def test_matches_brute_force_with_masks_and_exclusions(batch, k, tiers):
    rng = np.random.default_rng(batch * 100 + k)
    n = 20_000
    matrix, queries = unit(rng, n, 16), unit(rng, batch, 16)
    valid = rng.random(n) > 0.1
    exclude = (rng.integers(0, batch, 3000), rng.integers(0, n, 3000))
    width = batch if batch <= 8 else 32 * -(-batch // 32)
    got = scan(
        torch.from_numpy(queries), torch.from_numpy(matrix), k,
        masked=torch.from_numpy(np.flatnonzero(~valid)[::-1].copy()),  # unsorted on purpose
        exclude=tuple(torch.from_numpy(a) for a in exclude), max_elements=1024 * width,
    )  # fmt: skip
    check(got, reference(queries, matrix, k, valid, exclude))
    assert tiers["full"] >= 1 and tiers["blocks"] >= 1, tiers  # the first chunk, then mostly blocks


def test_cells_tier_when_blocks_pass_too_often(tiers):
    # Chunk 2 after a first chunk of 1024 rows: k / 1024 of the cells pass, most 64-row blocks too.
    rng = np.random.default_rng(7)
    matrix, queries = unit(rng, 5000, 16), unit(rng, 3, 16)
    got = scan(torch.from_numpy(queries), torch.from_numpy(matrix), 20, max_elements=1024 * 3)
    check(got, reference(queries, matrix, 20))
    assert tiers["cells"] >= 1, tiers


def test_rising_scores_take_the_full_topk_and_stay_exact(tiers):
    # Every chunk beats the last: whole chunks pass the floor, so each takes the full top-k.
    n = 6000
    matrix = np.zeros((n, 4), np.float32)
    matrix[:, 0] = np.linspace(0.0, 1.0, n)
    queries = np.array([[1.0, 0, 0, 0], [0.5, 0, 0, 0]], np.float32)
    got = scan(torch.from_numpy(queries), torch.from_numpy(matrix), 30, max_elements=512 * 2)
    check(got, reference(queries, matrix, 30))
    assert tiers["blocks"] == tiers["cells"] == 0 and tiers["full"] >= 10, tiers


@pytest.mark.parametrize("max_elements", [1 << 20, 64 * 2])
def test_ties_rank_by_ascending_tie_id_across_chunks(max_elements):
    rng = np.random.default_rng(1)
    basis = np.eye(4, dtype=np.float32)[:3]
    matrix = basis[rng.integers(0, 3, 3000)]  # 3 distinct rows: every floor is a tie
    tie_ids = rng.permutation(100_000)[:3000].astype(np.int64) + 1
    queries = np.array([[1.0, 0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 1.0]], np.float32)  # 2nd: all 0
    for k in (1, 13, 200):
        got = scan(torch.from_numpy(queries), torch.from_numpy(matrix), k, tie_ids=torch.from_numpy(tie_ids),
                   max_elements=max_elements)  # fmt: skip
        check(got, reference(queries, matrix, k, tie_ids=tie_ids))


def test_everything_masked_or_fewer_than_k_eligible():
    rng = np.random.default_rng(3)
    matrix, queries = unit(rng, 3000, 8), unit(rng, 2, 8)
    valid = np.zeros(3000, bool)
    valid[[5, 1500, 2999]] = True
    masked = torch.from_numpy(np.flatnonzero(~valid))
    got = scan(torch.from_numpy(queries), torch.from_numpy(matrix), 10, masked=masked, max_elements=256 * 2)
    check(got, reference(queries, matrix, 10, valid))
    scores, rows = scan(torch.from_numpy(queries), torch.from_numpy(matrix), 4, masked=torch.arange(3000))
    assert (rows == -1).all() and torch.isneginf(scores).all()


def test_bf16_storage_scores_in_fp32():
    rng = np.random.default_rng(2)
    matrix, queries = unit(rng, 8000, 32), unit(rng, 3, 32)
    as_bf16 = torch.from_numpy(matrix).bfloat16()
    got = scan(torch.from_numpy(queries), as_bf16, 20, max_elements=1024 * 3, upcast=300)
    check(got, reference(queries, as_bf16.float().numpy(), 20))


def test_exact_topk_takes_the_scan_for_large_corpora_only(monkeypatch):
    calls = []
    monkeypatch.setattr(topk, "cpu_scan", lambda *a: calls.append(a) or (torch.empty(0), torch.empty(0)))
    assert not scan_pays(1682, 32) and not scan_pays(100_000, 32)
    assert scan_pays(400_000, 2) and scan_pays(1_000_000, 32)
    assert not scan_pays(400_000, 1) and scan_pays(1_000_000, 1)  # one query: a gemv either way
    exact_topk(torch.zeros(1, 4), torch.zeros(1682, 4), 10)
    exact_topk(torch.zeros(1, 4), torch.zeros(400_000, 4), 10)
    assert not calls
    exact_topk(torch.zeros(32, 4), torch.zeros(1_000_000, 4), 10)
    assert len(calls) == 1


def test_single_query_scan_restores_the_callers_threads():
    rng = np.random.default_rng(5)
    matrix, queries = unit(rng, 5000, 16), unit(rng, 1, 16)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = scan(torch.from_numpy(queries), torch.from_numpy(matrix), 10, max_elements=1024)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    check(got, reference(queries, matrix, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_query_gemv_split_between_threads(dtype, monkeypatch):
    rng = np.random.default_rng(6)
    matrix, queries = unit(rng, 6000, 16), unit(rng, 1, 16)
    stored = torch.from_numpy(matrix).to(dtype)
    threads = []
    real = topk_cpu._gemv_part
    monkeypatch.setattr(topk_cpu, "_gemv_part", lambda *a: threads.append(threading.get_ident()) or real(*a))
    monkeypatch.setattr(topk_cpu, "_GEMV_ROWS_PER_THREAD", 256)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = scan(torch.from_numpy(queries), stored, 25, max_elements=2048, upcast=100)
    finally:
        torch.set_num_threads(before)
    check(got, reference(queries, stored.float().numpy(), 25))
    assert len(set(threads)) == 2, "the rows were not split between two threads"


def test_inputs_that_require_grad_are_scored_without_autograd():
    rng = np.random.default_rng(9)
    matrix, queries = unit(rng, 3000, 8), unit(rng, 3, 8)
    for batch in (1, 3):
        q = torch.from_numpy(queries[:batch]).requires_grad_()
        got = scan(q, torch.from_numpy(matrix).requires_grad_(), 5, max_elements=512 * 3)
        check(got, reference(queries[:batch], matrix, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_single_querys_score_of_a_row_does_not_depend_on_where_the_row_sits(dtype, threads):
    # A shard scores a subset of the rows, at other positions: its scores must be the unsharded
    # gateway's bit for bit (BLAS kernels round a call's last few rows differently, see _dot_rows).
    rng = np.random.default_rng(7)
    matrix = torch.from_numpy(unit(rng, 300_001, 64)).to(dtype)  # > 2 x the rows a gemv thread takes
    q = unit(rng, 1, 64)[0]
    whole = np.empty(matrix.shape[0], np.float32)
    gemv(matrix, q, whole, upcast_rows=1000, threads=threads)
    for subset in (rng.permutation(matrix.shape[0])[:1237], np.arange(5, 300_001, 3)):
        part = np.empty(len(subset), np.float32)
        gemv(matrix[torch.from_numpy(subset)], q, part, upcast_rows=1000, threads=threads)
        np.testing.assert_array_equal(part, whole[subset])
