"""retrieval_gateway/sharding.py: the fixed post-id hash, how evenly it spreads ids, ShardFilter, and
the router's exact merge (= sorting the union by score desc, post id asc)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_gateway.sharding import ShardFilter, ShardHits, merge_hits, shard_of, splitmix64

_MASK64 = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    """splitmix64's output function in plain Python integers (Steele, Lea & Flood 2014)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


# ---- the hash is fixed -----------------------------------------------------------------------------
PINNED_IDS = [0, 1, 2, 3, 42, 1000, 123456789, 2**62, -1, 2**63 - 1, -(2**63)]
# Every shard and router of a deployment must agree on these for its whole life: a change of hash
# (constants, shifts, signed/unsigned handling, the mod) moves items between shards and fails here.
PINNED_SHARDS = {
    2: [1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1],
    4: [3, 1, 2, 1, 1, 0, 1, 3, 0, 3, 3],
    7: [2, 2, 4, 2, 5, 0, 5, 4, 0, 2, 6],
}


def test_splitmix64_matches_the_published_function():
    # splitmix64 seeded with 0 yields 0xE220A8397B1DCDAF first (the published test vector).
    assert int(splitmix64(np.array([0], np.int64))[0]) == 0xE220A8397B1DCDAF
    ids = np.array(PINNED_IDS, np.int64)
    assert [int(v) for v in splitmix64(ids)] == [splitmix64_reference(i & _MASK64) for i in PINNED_IDS]


@pytest.mark.parametrize("num_shards", sorted(PINNED_SHARDS))
def test_shard_of_is_pinned(num_shards):
    got = shard_of(np.array(PINNED_IDS, np.int64), num_shards)
    assert got.dtype == np.int64
    assert got.tolist() == PINNED_SHARDS[num_shards]
    assert got.tolist() == [splitmix64_reference(i & _MASK64) % num_shards for i in PINNED_IDS]


def test_shard_of_depends_on_the_id_alone():
    ids = np.arange(1, 1001, dtype=np.int64)
    whole = shard_of(ids, 7)
    assert shard_of(ids[::-1], 7).tolist() == whole[::-1].tolist()  # not on position
    assert [int(shard_of(ids[i : i + 1], 7)[0]) for i in range(0, 1000, 97)] == whole[::97].tolist()
    assert shard_of(ids.tolist(), 7).tolist() == whole.tolist()  # lists as well as arrays


def test_shard_of_with_one_shard_and_bad_counts():
    assert shard_of(np.array(PINNED_IDS, np.int64), 1).tolist() == [0] * len(PINNED_IDS)
    assert shard_of(np.empty(0, np.int64), 4).tolist() == []
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_shards"):
            shard_of(np.array([1], np.int64), bad)


# ---- the hash spreads ids evenly -------------------------------------------------------------------
N_SPREAD = 100_000
SPREADS = {
    "sequential": np.arange(1, N_SPREAD + 1, dtype=np.int64),
    "stride 2": np.arange(N_SPREAD, dtype=np.int64) * 2,
    "stride 4": np.arange(N_SPREAD, dtype=np.int64) * 4 + 3,
    "stride 7": np.arange(N_SPREAD, dtype=np.int64) * 7,
    "stride 1024": np.arange(N_SPREAD, dtype=np.int64) * 1024,
    "shard prefix": (np.arange(N_SPREAD, dtype=np.int64) % 4 << 56) | (np.arange(N_SPREAD) // 4),
    "snowflake-like": (np.arange(N_SPREAD, dtype=np.int64) << 22) + 1_700_000_000_000 * (1 << 22),
}


@pytest.mark.parametrize("num_shards", [2, 4, 7])
@pytest.mark.parametrize("kind", sorted(SPREADS))
def test_ids_spread_within_3_percent_per_shard(kind, num_shards):
    counts = np.bincount(shard_of(SPREADS[kind], num_shards), minlength=num_shards)
    assert counts.sum() == N_SPREAD and len(counts) == num_shards
    expected = N_SPREAD / num_shards
    assert np.abs(counts - expected).max() <= 0.03 * expected, counts.tolist()


# ---- ShardFilter ------------------------------------------------------------------------------------
def test_shard_filters_partition_the_ids():
    ids = np.arange(-500, 5000, 3, dtype=np.int64)
    masks = np.stack([ShardFilter(i, 4).mask(ids) for i in range(4)])
    assert masks.dtype == bool
    assert (masks.sum(axis=0) == 1).all()  # every id on exactly one shard
    for i in range(4):
        assert (shard_of(ids[masks[i]], 4) == i).all()


def test_a_single_shard_keeps_everything():
    ids = np.array(PINNED_IDS, np.int64)
    assert ShardFilter(0, 1).mask(ids).all()
    assert ShardFilter(0, 1).mask(np.empty(0, np.int64)).shape == (0,)


@pytest.mark.parametrize(("index", "count"), [(-1, 2), (2, 2), (0, 0), (5, 4)])
def test_shard_filter_rejects_an_index_outside_the_count(index, count):
    with pytest.raises(ValueError, match="shard index"):
        ShardFilter(index, count)


# ---- merge_hits ---------------------------------------------------------------------------------------
def hits(post_ids, scores) -> ShardHits:
    """One shard's top list, sorted as a shard returns it (score desc, post id asc)."""
    post_ids, scores = np.asarray(post_ids, np.int64), np.asarray(scores, np.float32)
    order = np.lexsort((post_ids, -scores))
    post_ids, scores = post_ids[order], scores[order]
    return ShardHits(post_ids, post_ids % 97, scores, [{"p": str(p)} for p in post_ids.tolist()])


def union_sorted(parts, k):
    """The reference: every hit of every part, sorted by (score desc, post id asc), first k."""
    rows = [
        (float(s), int(p), int(a), attrs)
        for part in parts
        for p, a, s, attrs in zip(part.post_ids, part.author_ids, part.scores, part.attributes, strict=True)
    ]
    rows.sort(key=lambda r: (-r[0], r[1]))
    return rows[:k]


def as_rows(merged: ShardHits):
    assert len(merged.post_ids) == len(merged.author_ids) == len(merged.scores) == len(merged.attributes)
    assert merged.post_ids.dtype == np.int64 and merged.scores.dtype == np.float32
    return [
        (float(s), int(p), int(a), attrs)
        for p, a, s, attrs in zip(
            merged.post_ids, merged.author_ids, merged.scores, merged.attributes, strict=True
        )
    ]


def test_merge_breaks_exact_ties_across_shards_by_post_id():
    a = hits([10, 3, 7], [0.5, 0.5, 0.25])
    b = hits([4, 1, 9], [0.5, 0.25, 0.75])
    merged = merge_hits([a, b], 5)
    assert merged.post_ids.tolist() == [9, 3, 4, 10, 1]
    assert merged.scores.tolist() == [0.75, 0.5, 0.5, 0.5, 0.25]
    assert merged.attributes == [{"p": "9"}, {"p": "3"}, {"p": "4"}, {"p": "10"}, {"p": "1"}]
    assert merged.author_ids.tolist() == [9, 3, 4, 10, 1]


def test_merge_with_k_larger_than_the_union_returns_the_whole_union():
    a, b = hits([1, 2], [0.1, 0.9]), hits([3], [0.5])
    assert as_rows(merge_hits([a, b], 100)) == union_sorted([a, b], 100)
    assert merge_hits([a, b], 100).post_ids.tolist() == [2, 3, 1]


def test_merge_of_nothing_and_of_empty_parts():
    empty = hits([], [])
    for parts in ([], [empty], [empty, empty]):
        merged = merge_hits(parts, 3)
        assert as_rows(merged) == []
    one = hits([5, 6, 7], [0.3, 0.2, 0.1])
    assert as_rows(merge_hits([empty, one, empty], 2)) == union_sorted([one], 2)


@st.composite
def shard_lists(draw):
    """2-5 shards with disjoint post ids, scores from a small set (many exact ties across shards)."""
    n_shards = draw(st.integers(1, 5))
    pool = draw(st.lists(st.integers(-(2**40), 2**40), min_size=0, max_size=60, unique=True))
    score_values = st.sampled_from([-1.0, -0.0, 0.0, 0.125, 0.5, 0.5000001, 1.0, 3.25])
    owner = draw(st.lists(st.integers(0, n_shards - 1), min_size=len(pool), max_size=len(pool)))
    scores = draw(st.lists(score_values, min_size=len(pool), max_size=len(pool)))
    parts = []
    for s in range(n_shards):
        mine = [i for i in range(len(pool)) if owner[i] == s]
        parts.append(hits([pool[i] for i in mine], [scores[i] for i in mine]))
    return parts


@settings(max_examples=300, deadline=None)
@given(parts=shard_lists(), k=st.integers(1, 80))
def test_merge_equals_sorting_the_union(parts, k):
    assert as_rows(merge_hits(parts, k)) == union_sorted(parts, k)


@settings(max_examples=200, deadline=None)
@given(parts=shard_lists(), k=st.integers(1, 30))
def test_merge_of_each_shards_top_k_equals_the_global_top_k(parts, k):
    """What the router actually merges: each shard's own top k, never its whole list."""
    truncated = [ShardHits(p.post_ids[:k], p.author_ids[:k], p.scores[:k], p.attributes[:k]) for p in parts]
    assert as_rows(merge_hits(truncated, k)) == union_sorted(parts, k)
