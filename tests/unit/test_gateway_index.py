"""CorpusIndex: search equals brute force on post ids; deletes, upserts, growth, gaps, mismatches,
snapshot swaps under concurrent searches; info() never waits for a search."""

import threading
import time

import numpy as np
import pytest
import torch

from retrieval_gateway import index as index_module
from retrieval_gateway.index import CorpusGap, CorpusIndex, Query
from shared.corpus_rows import AttributeColumn, Delta
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


def delta(version, posts=(), authors=None, emb=None, attrs=None, deleted=(), fp=FP):
    posts = np.asarray(posts, np.int64)
    return Delta(
        version,
        fp,
        posts,
        posts % 5 if authors is None else np.asarray(authors, np.int64),
        np.zeros((len(posts), D), np.float32) if emb is None else np.asarray(emb, np.float32),
        [{}] * len(posts) if attrs is None else list(attrs),
        np.asarray(deleted, np.int64),
    )


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
    index.apply_delta(delta(4, deleted=[gone, 777]))
    assert gone not in ids(index.search([q(query, 10)])[0]) and index.info().size == 3
    # Upsert: one replacement (moves to the query's direction), many new rows (capacity grows).
    new_posts = np.array([int(posts[1]), *range(20_001, 20_011)], np.int64)
    new_emb = unit(rng, len(new_posts))
    new_emb[0] = query
    index.apply_delta(delta(5, new_posts, emb=new_emb))
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
    for version, fp in ((5, FP), (3, FP), (4, "0" * 16)):
        with pytest.raises(CorpusGap):
            index.apply_delta(delta(version, deleted=[int(posts[0])], fp=fp))
    assert index.info().version == 3 and index.info().size == 50
    with pytest.raises(CorpusGap, match="duplicate"):
        index.apply_delta(delta(4, [5, 5], deleted=[int(posts[0])]))
    with pytest.raises(CorpusGap, match="misaligned"):
        index.apply_delta(delta(4, [5], emb=np.zeros((1, D + 1)), deleted=[int(posts[0])]))
    assert (
        index.info().version == 3
        and index.info().size == 50
        and int(posts[0]) in ids(index.search([q(np.ones(D, np.float32), 50)])[0])
    )


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
    index.apply_delta(delta(2, [9], emb=np.ones((1, D))))
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

    def wait_for(version):  # bounded: the searchers must see the first and the last snapshot
        deadline = time.monotonic() + 10
        while version not in seen and time.monotonic() < deadline:
            time.sleep(0.001)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(1)
    for v in range(2, 30):
        snapshot(v)
    wait_for(29)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors and {1, 29} <= seen


def test_info_does_not_wait_for_a_search_in_flight(monkeypatch):
    # A scoring batch holds the index lock through the whole matmul + top-k; info() is read on the
    # event loop, so it must answer while a batch is blocked inside exact_topk.
    index, _, _, _, rng = make()
    entered, release = threading.Event(), threading.Event()
    real = index_module.exact_topk

    def blocked_topk(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(index_module, "exact_topk", blocked_topk)
    searcher = threading.Thread(target=index.search, args=([q(unit(rng, 1)[0], 5)],), daemon=True)
    searcher.start()
    got = []
    try:
        assert entered.wait(30)
        reader = threading.Thread(target=lambda: got.append(index.info()), daemon=True)
        reader.start()
        reader.join(10)
        assert got, "info() waited for the search in flight"
        assert (got[0].version, got[0].fingerprint, got[0].size, got[0].dim) == (3, FP, 50, D)
    finally:
        release.set()
        searcher.join(30)


def test_info_is_published_after_each_change():
    index = CorpusIndex("cpu")
    assert index.info() is None
    index.load_snapshot(7, FP, np.array([1, 2]), np.array([0, 0]), torch.ones(2, D), [{}, {}])
    first = index.info()
    assert (first.version, first.size, first.dim) == (7, 2, D)
    index.apply_delta(delta(8, [3, 4], deleted=[1]))
    assert (index.info().version, index.info().size) == (8, 3)
    assert (first.version, first.size) == (7, 2)  # a published view never changes


def test_attributes_follow_upserts_replacements_deletes_and_reused_rows():
    index, _, posts, _, _ = make(n=6)
    everything = np.ones(D, np.float32)
    a, b = int(posts[0]), int(posts[1])
    index.apply_delta(delta(4, deleted=[a, b]))  # two free rows, reused by the next upserts
    index.apply_delta(delta(5, [500, 501, int(posts[2])], attrs=[{"t": "new"}, {}, {"t": 'é, ü "x"'}]))
    got = {h.post_id: h.attributes for h in index.search([q(everything, 10)])[0].hits}
    expected = {int(p): {"title": f"t{p}"} for p in posts[3:]}
    expected.update({500: {"t": "new"}, 501: {}, int(posts[2]): {"t": 'é, ü "x"'}})
    assert got == expected
    index.apply_delta(delta(6, [777], attrs=[{"k": "v"}], deleted=[777, 500]))  # upsert then delete
    got = {h.post_id: h.attributes for h in index.search([q(everything, 10)])[0].hits}
    del expected[500]
    assert got == expected


def test_a_shards_search_keeps_the_hits_attributes_encoded():
    index, _, posts, _, _ = make(n=6)
    index.apply_delta(delta(4, [500, 501], attrs=[{"t": "new"}, {}]))
    queries = [q(np.ones(D, np.float32), 10, posts=[int(posts[0])]), q(-np.ones(D, np.float32), 3)]
    decoded = index.search(queries)
    encoded = index.search(queries, encoded=True)
    for d, e in zip(decoded, encoded, strict=True):
        assert isinstance(e.attributes, AttributeColumn) and len(e.attributes) == len(e.post_ids)
        assert e.attributes.decode() == d.attributes and e.hits == d.hits


def test_snapshot_arrays_are_copied_unless_handed_over():
    posts, authors = np.array([1, 2, 3], np.int64), np.array([7, 7, 8], np.int64)
    emb = torch.eye(3, D)
    index = CorpusIndex("cpu")
    index.load_snapshot(1, FP, posts, authors, emb, [{}, {"a": "b"}, {}])
    index.apply_delta(delta(2, [1], [9], np.full((1, D), 5.0), deleted=[2]))
    assert posts.tolist() == [1, 2, 3] and authors.tolist() == [7, 7, 8] and emb[0, 0] == 1.0
    handed = torch.eye(3, D)
    column = AttributeColumn.encode([{}, {"a": "b"}, {}])
    index.load_snapshot(3, FP, posts.copy(), authors.copy(), handed, column, copy=False)
    hits = index.search([q(np.eye(D, dtype=np.float32)[1], 3)])[0].hits
    assert (hits[0].post_id, hits[0].author_id, hits[0].attributes) == (2, 7, {"a": "b"})


def test_random_deltas_match_a_dict_model():
    # Upserts, replacements, deletes (known, unknown, upserted in the same delta), exclusions by post
    # and author: every search equals brute force over a plain dict model, attributes included.
    rng = np.random.default_rng(11)
    index = CorpusIndex("cpu")
    model = {}  # post id -> (author, embedding, attributes)
    start = rng.choice(np.arange(1, 400), 60, replace=False)
    for p in start.tolist():
        model[p] = (p % 9, unit(rng, 1)[0], {"title": f"m{p}"} if p % 3 else {})
    cols = [model[p] for p in start.tolist()]
    index.load_snapshot(
        1,
        FP,
        start.astype(np.int64),
        np.array([c[0] for c in cols], np.int64),
        torch.from_numpy(np.stack([c[1] for c in cols])),
        [c[2] for c in cols],
    )
    for version in range(2, 40):
        ups = rng.choice(np.arange(1, 400), int(rng.integers(0, 12)), replace=False)
        dels = rng.choice(np.arange(1, 420), int(rng.integers(0, 12)))
        emb = unit(rng, len(ups))
        attrs = [{"v": f"{version}-{p}"} if p % 2 else {} for p in ups.tolist()]
        index.apply_delta(delta(version, ups, ups % 9, emb, attrs, dels))
        for p, e, at in zip(ups.tolist(), emb, attrs, strict=True):
            model[p] = (p % 9, e, at)
        for p in dels.tolist():
            model.pop(p, None)
        ref = np.array(sorted(model), np.int64)
        ref_emb = np.stack([model[p][1] for p in ref.tolist()])
        query = unit(rng, 1)[0]
        banned_posts = rng.choice(np.arange(1, 420), 5).tolist()
        banned = set(banned_posts) | {p for p in ref.tolist() if model[p][0] == 4}
        res = index.search([q(query, 30, posts=np.unique(banned_posts), authors=[4])])[0]
        assert ids(res) == brute(query, ref_emb, ref, 30, banned)
        assert [(h.author_id, h.attributes) for h in res.hits] == [model[h.post_id][0::2] for h in res.hits]
        assert index.info().size == len(model) and res.version == version


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
        index.apply_delta(delta(2, [7], [0], emb[:1], deleted=[9, 10]))
        results.append([ids(r) for r in index.search(queries)])
    assert results[0] == results[1]
