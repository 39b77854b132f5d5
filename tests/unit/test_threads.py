"""Intra-op threads per batch (shared/threads.py): how many, the CPU limit read from the cgroup, and
that the serving paths (user tower, corpus scan) set them in the thread that computes."""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import pytest
import torch

from retrieval_gateway.config import GatewayConfig
from retrieval_gateway.index import CorpusIndex, Query
from shared.threads import INTRA_OP, WORK_PER_THREAD, IntraOpThreads, usable_cpus


def in_worker(fn):
    """Run fn in a fresh thread (thread counts are per thread: the test's own stays as it was)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


@pytest.fixture
def restore_threads():
    before, limit = torch.get_num_threads(), INTRA_OP.limit
    yield
    torch.set_num_threads(before)
    INTRA_OP.limit = limit


def test_threads_grow_with_the_work_up_to_the_limit():
    policy = IntraOpThreads(limit=4)
    assert policy.threads_for(0) == 1
    assert policy.threads_for(WORK_PER_THREAD - 1) == 1  # a small op: one thread, no wake-ups
    assert policy.threads_for(2 * WORK_PER_THREAD) == 2
    assert policy.threads_for(100 * WORK_PER_THREAD) == 4  # never past the limit
    assert IntraOpThreads(limit=1).threads_for(100 * WORK_PER_THREAD) == 1


def test_configure_takes_a_limit_or_the_usable_cpus():
    policy = IntraOpThreads(limit=3)
    policy.configure(None)
    assert policy.limit == min(torch.get_num_threads(), usable_cpus())
    policy.configure(2)
    assert policy.limit == 2
    with pytest.raises(ValueError, match="torch threads must be >= 1"):
        policy.configure(0)


@pytest.mark.parametrize(
    "cpu_max, expected",
    [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("garbage", None), (None, None)],
)
def test_usable_cpus_reads_the_cgroup_quota(tmp_path, cpu_max, expected):
    affinity = len(os.sched_getaffinity(0))
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    want = affinity if expected is None else min(affinity, expected)
    assert usable_cpus(path) == want


def test_use_for_sets_the_calling_threads_count(restore_threads):
    policy = IntraOpThreads(limit=2)

    def small_then_large() -> tuple[int, int]:
        policy.use_for(10)
        small = torch.get_num_threads()
        policy.use_for(10 * WORK_PER_THREAD)
        return small, torch.get_num_threads()

    assert in_worker(small_then_large) == (1, 2)


def test_a_small_corpus_is_scanned_on_one_thread_a_large_one_on_more(restore_threads):
    INTRA_OP.configure(2)
    index = CorpusIndex("cpu", "fp32")
    n, d = 300, 8
    rng = np.random.default_rng(0)
    emb = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((n, d))).float(), dim=1)
    index.load_snapshot(1, "fp", np.arange(1, n + 1), np.zeros(n, np.int64), emb, [{}] * n)
    query = Query(emb[0], "fp", 5)

    def search_then_threads(batch: int) -> int:
        assert index.search([query] * batch)[0].post_ids[0] == 1
        return torch.get_num_threads()

    assert in_worker(lambda: search_then_threads(1)) == 1
    many = 2 * WORK_PER_THREAD // (n * d) + 1  # enough queries for two threads' worth of product
    assert in_worker(lambda: search_then_threads(many)) == 2


def test_the_gateway_flag_is_validated():
    with pytest.raises(ValueError, match="torch_threads must be >= 1"):
        GatewayConfig(user_service="u:1", candidate_service="c:2", torch_threads=0)
    assert GatewayConfig(user_service="u:1", candidate_service="c:2", torch_threads=3).torch_threads == 3
