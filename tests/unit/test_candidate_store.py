"""candidate_service core pieces without grpc: items file, in-memory store, embeddings cache file."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading

import numpy as np
import pytest

from candidate_service.embedding_cache import (
    CachedEmbeddings,
    CacheError,
    atomic_write,
    cache_file,
    read_cache,
    reusable_rows,
    write_cache,
)
from candidate_service.items_file import ItemsFileError, file_digest, read_items
from candidate_service.store import CorpusStore, Delta
from shared.corpus_rows import AttributeColumn, attribute_bytes
from shared.errors import InvalidInput

D = 4
NONE = np.zeros(0, np.int64)


def make_store(n: int = 5, version: int = 10) -> CorpusStore:
    ids = np.arange(1, n + 1, dtype=np.int64)
    emb = np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)
    attrs = [{"title": f"t{i}"} if i % 2 else None for i in range(n)]
    return CorpusStore.from_rows("fp", version, ids, ids * 10, emb, attrs)


def upsert(store: CorpusStore, ids: list[int], value: float = 1.0) -> Delta:
    ids_arr = np.asarray(ids, dtype=np.int64)
    emb = np.full((len(ids), D), value, dtype=np.float32)
    delta, _ = store.upsert_delta(ids_arr, ids_arr + 100, emb, [{"k": "v"}] * len(ids))
    store.apply(delta)
    return delta


# -- items file ----------------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_items_file_reads_all_fields_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "i.jsonl", [
        '{"post_id": 3, "author_id": 7, "attributes": {"title": "a"}}', "", '{"post_id": 9}',
    ])  # fmt: skip
    items = read_items(path)
    assert items.post_ids.tolist() == [3, 9] and items.author_ids.tolist() == [7, 0]
    assert items.attributes == [{"title": "a"}, None]
    assert len(items.digest) == 64 and items.digest == file_digest(path)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"author_id": 1}', "'post_id' is missing"),
        ('{"post_id": 0}', "'post_id' must be in [1"),
        ('{"post_id": -4}', "'post_id' must be in [1"),
        ('{"post_id": true}', "must be an integer"),
        ('{"post_id": 1.5}', "must be an integer"),
        ('{"post_id": 1, "author_id": -1}', "'author_id' must be in [0"),
        ('{"post_id": 1, "autor_id": 1}', "unknown field"),
        ('{"post_id": 1, "attributes": {"a": 1}}', "string values"),
        ('{"post_id": 1, "attributes": {"a": "' + "x" * 2000 + '"}}', "over 1024 bytes"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_items_file_malformed_line_is_named(tmp_path, line, problem):
    path = write_lines(tmp_path / "i.jsonl", ['{"post_id": 1}', line])
    with pytest.raises(ItemsFileError) as info:
        read_items(path)
    assert "i.jsonl:2: " in str(info.value) and problem in str(info.value)


def test_items_file_duplicate_names_both_lines(tmp_path):
    path = write_lines(tmp_path / "i.jsonl", ['{"post_id": 5}', '{"post_id": 6}', '{"post_id": 5}'])
    with pytest.raises(ItemsFileError, match=r"i.jsonl:3: duplicate post_id 5 \(first on line 1\)"):
        read_items(path)


def test_items_file_missing(tmp_path):
    with pytest.raises(ItemsFileError, match="not found"):
        read_items(tmp_path / "nope.jsonl")


# -- store ---------------------------------------------------------------------------------------------


def test_upsert_replaces_and_inserts_with_one_version_bump():
    store = make_store()
    ids = np.asarray([2, 99], dtype=np.int64)
    delta, inserted = store.upsert_delta(ids, ids, np.ones((2, D), np.float32), [None, {"a": "b"}])
    assert inserted == 1 and delta.version == 11 and store.version == 10  # not applied yet
    store.apply(delta)
    snap = store.snapshot()
    assert store.version == 11 and store.num_items == 6 and snap.version == 11
    row = snap.post_ids.tolist().index(2)
    assert np.all(snap.embeddings[row] == 1) and snap.author_ids[row] == 2 and snap.attributes[row] is None
    assert snap.post_ids.tolist()[-1] == 99 and snap.attributes[-1] == {"a": "b"}


def test_delete_reports_unknown_and_skips_version_when_nothing_changes():
    store = make_store()
    delta, unknown = store.delete_delta(np.asarray([3, 42], dtype=np.int64))
    assert unknown == [42] and delta is not None and delta.deleted_post_ids.tolist() == [3]
    store.apply(delta)
    assert store.version == 11 and 3 not in store and store.num_items == 4
    assert 3 not in store.snapshot().post_ids.tolist()
    none, unknown = store.delete_delta(np.asarray([42], dtype=np.int64))
    assert none is None and unknown == [42] and store.version == 11


def test_apply_refuses_out_of_order_deltas_and_wrong_shapes():
    store = make_store()
    delta, _ = store.upsert_delta(np.asarray([1]), np.asarray([0]), np.zeros((1, D), np.float32), [None])
    store.apply(delta)
    with pytest.raises(ValueError, match="does not follow"):
        store.apply(delta)
    with pytest.raises(InvalidInput):
        store.upsert_delta(np.asarray([1]), np.asarray([0]), np.zeros((1, D + 1), np.float32), [None])


def test_snapshot_is_immutable_while_the_store_changes():
    store = make_store()
    before = store.snapshot()
    copy = before.embeddings.copy()
    upsert(store, [1, 2], value=7.0)
    assert np.array_equal(before.embeddings, copy) and before.version == 10
    assert store.snapshot().version == 11


def test_snapshot_decodes_attributes_without_the_lock_and_is_made_once_per_version(monkeypatch):
    store = make_store(n=50)
    real_decode = AttributeColumn.decode
    applied: list[int] = []

    def decode_while_a_write_lands(column):
        if not applied:  # the first snapshot's decode: a write must get through meanwhile
            writer = threading.Thread(target=lambda: applied.append(upsert(store, [7, 77], 5.0).version))
            writer.start()
            writer.join(timeout=30)
            assert applied == [11], "apply waited for a snapshot's decode"
        return real_decode(column)

    monkeypatch.setattr(AttributeColumn, "decode", decode_while_a_write_lands)
    old = store.snapshot()
    assert old.version == 10 and 77 not in old.post_ids.tolist()  # consistent: the copy made before
    assert old.attributes[1] == {"title": "t1"} and old.attributes[0] is None
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        snaps = list(pool.map(lambda _: store.snapshot(), range(8)))
    assert all(s is snaps[0] for s in snaps) and snaps[0].version == 11
    assert 77 in snaps[0].post_ids.tolist() and store.snapshot() is snaps[0]


def test_dead_rows_are_compacted_and_state_is_kept():
    store = make_store(n=3000)
    delta, _ = store.delete_delta(np.arange(1, 2500, dtype=np.int64))
    store.apply(delta)
    snap = store.snapshot()
    assert snap.post_ids.tolist() == list(range(2500, 3001)) and store.num_items == 501
    upsert(store, [2600], value=3.0)
    assert np.all(store.snapshot().embeddings[100] == 3.0)


def test_chunk_bounds_cover_every_row_within_the_byte_budget():
    store = make_store(n=1000)
    snap = store.snapshot()
    row_bytes = 16 + 4 * D + 8
    bounds = snap.chunk_bounds(row_bytes * 64 + 100)
    assert bounds[0][0] == 0 and bounds[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    for lo, hi in bounds:
        assert (hi - lo) * row_bytes + int(snap.attr_bytes[lo:hi].sum()) <= row_bytes * 64 + 100
    assert CorpusStore(D, "fp", 1).snapshot().chunk_bounds(10) == [(0, 0)]  # empty corpus: one empty chunk


def test_store_and_gateway_index_reach_the_same_rows_after_the_same_deltas():
    """One owner of the rows, one apply order: the same random deltas (store-built upserts and deletes,
    and mixed ones with an id upserted and deleted at once) leave candidate_service's store and the
    gateway's index with the same rows (numbers included), ids, authors, attributes and embeddings,
    and both match a plain dict model applied upserts first, then deletes."""
    torch = pytest.importorskip("torch")
    from retrieval_gateway.index import CorpusIndex

    rng = np.random.default_rng(7)
    pool = np.arange(1, 401, dtype=np.int64)

    def attrs_for(ids: np.ndarray) -> list:
        choices = [None, {}, {"t": "x"}, {"title": 'é"q\n'}, {"a": "1", "b": "2"}]
        return [choices[i] for i in rng.integers(0, len(choices), len(ids))]

    def emb_for(n: int) -> np.ndarray:
        return rng.standard_normal((n, D)).astype(np.float32)

    ids = rng.choice(pool, 150, replace=False)
    start_attrs, start_emb = attrs_for(ids), emb_for(len(ids))
    store = CorpusStore.from_rows("fp", 5, ids, ids * 3, start_emb, start_attrs)
    index = CorpusIndex("cpu", "fp32")
    index.load_snapshot(5, "fp", ids, ids * 3, torch.from_numpy(start_emb), start_attrs)
    model = {int(p): (int(p) * 3, a or None, e) for p, a, e in zip(ids, start_attrs, start_emb, strict=True)}

    mixed_seen = 0
    for step in range(120):
        kind = step % 3
        if kind == 0:
            ups = rng.choice(pool, int(rng.integers(1, 30)), replace=False)
            delta, inserted = store.upsert_delta(ups, ups + step, emb_for(len(ups)), attrs_for(ups))
            assert inserted == sum(int(p) not in model for p in ups)
        elif kind == 1:
            gone = rng.choice(pool, int(rng.integers(1, 40)), replace=False)
            delta, unknown = store.delete_delta(gone)
            assert unknown == [int(p) for p in gone if int(p) not in model]
            if delta is None:
                continue
        else:  # a delta with both sides (a rollout's replay may carry one); `both` is in both
            ups = rng.choice(pool, int(rng.integers(1, 20)), replace=False)
            both = int(ups[0])
            gone = np.unique(np.concatenate([[both], rng.choice(pool, 10, replace=False)]))
            delta = Delta(store.version + 1, "fp", ups, ups + step, emb_for(len(ups)), attrs_for(ups), gone)
            mixed_seen += 1
        store.apply(delta)
        index.apply_delta(delta)
        for p, a, attrs, e in zip(
            delta.upsert_post_ids.tolist(), delta.upsert_author_ids.tolist(), delta.upsert_attributes,
            delta.upsert_embeddings, strict=True,
        ):  # fmt: skip
            model[p] = (a, attrs or None, e)
        for p in delta.deleted_post_ids.tolist():
            model.pop(p, None)
        if kind == 2:
            assert both not in store and both not in model

        snap, corpus = store.snapshot(), index._corpus
        assert corpus is not None and snap.version == store.version == index.info().version == delta.version
        rows = corpus.rows
        live = rows.live_rows()
        assert len(snap) == store.num_items == rows.size == len(model)
        assert rows.used <= 1024  # no compaction here: the row numbers themselves must agree
        assert snap.post_ids.tolist() == rows.post_ids[live].tolist()
        assert snap.author_ids.tolist() == rows.author_ids[live].tolist()
        assert snap.attributes == [a or None for a in rows.attributes(live)]
        assert np.array_equal(snap.embeddings, corpus.matrix[torch.from_numpy(live)].numpy())
        assert snap.attr_bytes.tolist() == [attribute_bytes(a) for a in snap.attributes]
        for i, p in enumerate(snap.post_ids.tolist()):
            author, attrs, emb = model[p]
            assert snap.author_ids[i] == author and snap.attributes[i] == attrs
            assert np.array_equal(snap.embeddings[i], emb)
    assert mixed_seen == 40


# -- embeddings cache file ----------------------------------------------------------------------------


def cached_from(store: CorpusStore) -> CachedEmbeddings:
    snap = store.snapshot()
    return CachedEmbeddings(snap.version, snap.post_ids, snap.author_ids, snap.embeddings)


def test_cache_round_trip(tmp_path):
    path = cache_file(tmp_path, "fp")
    cached = cached_from(make_store())
    write_cache(path, "fp", cached)
    back = read_cache(path, "fp", D)
    assert back.version == cached.version
    for name in ("post_ids", "author_ids", "embeddings"):
        assert np.array_equal(getattr(back, name), getattr(cached, name)), name
    assert path == tmp_path / "embeddings" / "fp.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["fp.safetensors"]  # no temp file left behind


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "unreadable or truncated"),
        ("flip", "checksum mismatch"),
        ("fingerprint", "fingerprint"),
        ("dim", "wrong shapes"),
    ],
)
def test_cache_that_fails_a_check_is_refused(tmp_path, damage, message):
    path = cache_file(tmp_path, "fp")
    write_cache(path, "fp", cached_from(make_store()))
    data = bytearray(path.read_bytes())
    fingerprint, dim = "fp", D
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 7])
    elif damage == "flip":
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "fingerprint":
        fingerprint = "other"
    else:
        dim = D + 1
    with pytest.raises(CacheError, match=message):
        read_cache(path, fingerprint, dim)


def test_missing_cache_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_cache(cache_file(tmp_path, "fp"), "fp", D)


def test_reusable_rows_match_post_and_author():
    cached = CachedEmbeddings(
        1, np.asarray([30, 10, 20]), np.asarray([3, 1, 2]), np.zeros((3, D), np.float32)
    )  # fmt: skip
    rows = reusable_rows(cached, np.asarray([10, 20, 30, 40, 5]), np.asarray([1, 9, 3, 4, 0]))
    assert rows.tolist() == [1, -1, 0, -1, -1]  # 20 changed author, 40 and 5 are new
    assert reusable_rows(
        CachedEmbeddings(1, NONE, NONE, np.zeros((0, D))), np.asarray([1]), np.asarray([0])
    ).tolist() == [-1]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "f"
    target.write_text("old")

    def failing(path: str) -> None:
        with open(path, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f"]


def test_parquet_items_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "post_id": [4, 8], "author_id": [1, None],
        "attributes": pa.array([[("title", "a")], None], type=pa.map_(pa.string(), pa.string())),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "i.parquet")
    items = read_items(tmp_path / "i.parquet")
    assert items.post_ids.tolist() == [4, 8] and items.author_ids.tolist() == [1, 0]
    assert items.attributes == [{"title": "a"}, None]
    pq.write_table(pa.table({"post_id": [4, 4]}), tmp_path / "dup.parquet")
    with pytest.raises(ItemsFileError, match=r"row 2: duplicate post_id 4 \(first in row 1\)"):
        read_items(tmp_path / "dup.parquet")
    pq.write_table(pa.table({"post_id": [0]}), tmp_path / "zero.parquet")
    with pytest.raises(ItemsFileError, match="row 1: 'post_id' must be in"):
        read_items(tmp_path / "zero.parquet")
