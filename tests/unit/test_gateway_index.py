"""CorpusIndex: search equals brute force on post ids; deletes, upserts, growth, gaps, mismatches,
snapshot swaps under concurrent searches."""

import threading

import numpy as np
import pytest
import torch

from retrieval_gateway.index import CorpusGap, CorpusIndex, Query
from shared.errors import ModelMismatch, NotReady

FP = "f" * 16
D = 8


def unit(rng, n):
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(query, emb, post_ids, k, banned=()):
    keep = np.array([p not in set(banned) for p in post_ids])
    s = emb[keep] @ query
    order = np.lexsort((post_ids[keep], -s))[:k]
    return post_ids[keep][order].tolist()


def make(n=50, seed=0, dtype="fp32"):
    rng = np.random.default_rng(seed)
    emb = unit(rng, n)
    posts = rng.permutation(10_000)[:n].astype(np.int64) + 1
    authors = (posts % 7).astype(np.int64)
    index = CorpusIndex("cpu", dtype)
    attrs = [{"title": f"t{p}"} for p in posts]
    index.load_snapshot(3, FP, posts, authors, torch.from_numpy(emb), attrs)
    return index, emb, posts, authors, rng


def q(vec, k, fp=FP, posts=(), authors=()):
    return Query(torch.from_numpy(vec), fp, k, np.asarray(posts, np.int64), np.asarray(authors, np.int64))


def ids(result):
    return [h.post_id for h in result.hits]


def test_search_matches_brute_force_with_metadata():
    index, emb, posts, authors, rng = make()
    queries = unit(rng, 4)
    results = index.search([q(queries[i], k) for i, k in enumerate((1, 5, 50, 200))])
    for i, k in enumerate((1, 5, 50, 200)):
        assert ids(results[i]) == brute(queries[i], emb, posts, k)  # k=200 > corpus: all 50
        assert results[i].version == 3 and results[i].fingerprint == FP
        hit = results[i].hits[0]
        row = int(np.flatnonzero(posts == hit.post_id)[0])
        assert hit.author_id == authors[row] and hit.attributes == {"title": f"t{hit.post_id}"}
        assert hit.score == pytest.approx(float(emb[row] @ queries[i]), abs=1e-5)


def test_exclusions_posts_authors_and_unknown_ids():
    index, emb, posts, authors, rng = make()
    query = unit(rng, 1)[0]
    banned_posts = [int(posts[0]), int(posts[1]), 99_999_999, -5]  # unknown ids are ignored
    res = index.search([q(query, 50, posts=banned_posts, authors=[3, 12345])])[0]
    banned = {*banned_posts, *posts[authors == 3].tolist()}
    assert ids(res) == brute(query, emb, posts, 50, banned)
    assert not banned & set(ids(res)) and len(ids(res)) == 50 - len(banned & set(posts.tolist()))
    # Exclusions are per query: the next query in the same batch is unaffected.
    both = index.search([q(query, 5, posts=banned_posts), q(query, 5)])
    assert ids(both[1]) == brute(query, emb, posts, 5)


def test_deltas_delete_upsert_grow_and_reuse_rows():
    index, emb, posts, _authors, rng = make(n=4)
    query = unit(rng, 1)[0]
    gone = int(ids(index.search([q(query, 1)])[0])[0])
    index.apply_delta(
        4, FP, np.empty(0, np.int64), np.empty(0, np.int64), torch.empty(0, D), [], np.array([gone, 777])
    )
    assert gone not in ids(index.search([q(query, 10)])[0]) and index.info().size == 3
    # Upsert: one replacement (moves to the query's direction), many new rows (capacity grows).
    new_posts = np.array([int(posts[1]), *range(20_001, 20_011)], np.int64)
    new_emb = unit(rng, len(new_posts))
    new_emb[0] = query
    index.apply_delta(
        5,
        FP,
        new_posts,
        new_posts % 5,
        torch.from_numpy(new_emb),
        [{}] * len(new_posts),
        np.empty(0, np.int64),
    )
    res = index.search([q(query, 100)])[0]
    assert res.version == 5 and index.info().size == 13 and len(res.hits) == 13
    assert res.hits[0].post_id == int(posts[1]) and res.hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert res.hits[0].attributes == {} and gone not in ids(res)
    expected = {int(p): e for p, e in zip(posts, emb, strict=True) if p != gone}
    expected.update({int(p): e for p, e in zip(new_posts, new_emb, strict=True)})  # replacement wins
    ref_posts = np.array(sorted(expected), np.int64)
    assert ids(res) == brute(query, np.stack([expected[p] for p in ref_posts]), ref_posts, 100)


def test_gap_or_other_model_raises_and_changes_nothing():
    index, _, posts, _, _rng = make()
    none = np.empty(0, np.int64)
    for version, fp in ((5, FP), (3, FP), (4, "0" * 16)):
        with pytest.raises(CorpusGap):
            index.apply_delta(version, fp, none, none, torch.empty(0, D), [], np.array([int(posts[0])]))
    assert index.info().version == 3 and index.info().size == 50
    with pytest.raises(CorpusGap, match="duplicate"):
        index.apply_delta(4, FP, np.array([5, 5]), np.array([0, 0]), torch.zeros(2, D), [{}, {}], none)


def test_fingerprint_mismatch_fails_only_that_query():
    index, emb, posts, _, rng = make()
    query = unit(rng, 1)[0]
    good, bad = index.search([q(query, 3), q(query, 3, fp="0" * 16)])
    assert ids(good) == brute(query, emb, posts, 3)
    assert isinstance(bad, ModelMismatch) and "same checkpoint" in str(bad)


def test_no_corpus_and_empty_corpus_are_not_ready():
    index = CorpusIndex("cpu")
    with pytest.raises(NotReady, match="no corpus"):
        index.search([q(np.ones(D, np.float32), 1)])
    index.load_snapshot(1, FP, np.empty(0, np.int64), np.empty(0, np.int64), torch.empty(0, D), [])
    with pytest.raises(NotReady, match="empty"):
        index.search([q(np.ones(D, np.float32), 1)])
    index.apply_delta(2, FP, np.array([9]), np.array([1]), torch.ones(1, D), [{}], np.empty(0, np.int64))
    assert ids(index.search([q(np.ones(D, np.float32), 5)])[0]) == [9]


def test_bf16_index_matches_brute_force_on_rounded_rows():
    index, emb, posts, _, rng = make(n=300, dtype="bf16")
    query = unit(rng, 1)[0]
    rounded = torch.from_numpy(emb).bfloat16().float().numpy()
    assert ids(index.search([q(query, 20)])[0]) == brute(query, rounded, posts, 20)


def test_snapshot_swap_under_concurrent_search_never_mixes_versions():
    # Version v holds post ids v*1000 + [1, 200]: any hit outside its response's range is a mix.
    index = CorpusIndex("cpu")
    rng = np.random.default_rng(5)

    def snapshot(v):
        posts = np.arange(1, 201, dtype=np.int64) + v * 1000
        index.load_snapshot(v, FP, posts, posts % 3, torch.from_numpy(unit(rng, 200)), [{}] * 200)

    snapshot(1)
    errors, seen = [], set()
    stop = threading.Event()

    def searcher():
        local = np.random.default_rng(threading.get_ident() % 1000)
        while not stop.is_set():
            for res in index.search([q(unit(local, 1)[0], 50) for _ in range(4)]):
                lo = res.version * 1000
                if not all(lo < h.post_id <= lo + 200 for h in res.hits) or len(res.hits) != 50:
                    errors.append((res.version, ids(res)[:3]))
                seen.add(res.version)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for v in range(2, 30):
        snapshot(v)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors and len(seen) > 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_index_matches_cpu_index(dtype):
    rng = np.random.default_rng(9)
    emb, posts = unit(rng, 500), np.arange(1, 501, dtype=np.int64)
    queries = [q(v, 20, posts=[1, 2], authors=[3]) for v in unit(rng, 4)]
    results = []
    for device in ("cpu", "cuda"):
        index = CorpusIndex(device, dtype)
        index.load_snapshot(1, FP, posts, posts % 5, torch.from_numpy(emb), [{}] * 500)
        index.apply_delta(
            2, FP, np.array([7]), np.array([0]), torch.from_numpy(emb[:1]), [{}], np.array([9, 10])
        )
        results.append([ids(r) for r in index.search(queries)])
    assert results[0] == results[1]
