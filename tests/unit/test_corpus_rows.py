"""CorpusRows: the one owner of the corpus's rows. Random delta sequences against a dict model (with
small merge and compaction thresholds so that every path runs), the version and fingerprint checks,
the apply order, compaction, attribute encoding and the memory budget per item."""

from __future__ import annotations

import contextlib
import json
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import corpus_rows
from shared.corpus_rows import AttributeColumn, CorpusGap, CorpusRows, Delta

FP = "f" * 16
D = 3


def delta(version, posts=(), authors=None, attrs=None, deleted=(), fp=FP, dim=D):
    posts = np.asarray(posts, np.int64)
    return Delta(
        version,
        fp,
        posts,
        posts * 10 if authors is None else np.asarray(authors, np.int64),
        np.zeros((len(posts), dim), np.float32),
        [None] * len(posts) if attrs is None else list(attrs),
        np.asarray(deleted, np.int64),
    )


def snapshot(posts, attrs=None, version=1):
    posts = np.asarray(posts, np.int64)
    attrs = [{"title": f"t{p}"} for p in posts.tolist()] if attrs is None else attrs
    return CorpusRows.from_columns(version, FP, D, posts, posts * 10, attrs)


def check_matches(rows: CorpusRows, model: dict[int, tuple[int, dict]], universe: range) -> None:
    """Every observable of `rows` equals the dict model (post id -> (author, attributes))."""
    assert rows.size == len(model)
    ids = np.array(list(universe), np.int64)
    found = rows.rows_of(ids)
    assert {int(i) for i in ids[found >= 0]} == set(model)
    live = found[found >= 0]
    assert len(set(live.tolist())) == len(live)  # one row per id
    assert rows.post_ids[live].tolist() == ids[found >= 0].tolist()
    assert rows.author_ids[live].tolist() == [model[int(i)][0] for i in ids[found >= 0]]
    assert rows.attributes(live) == [model[int(i)][1] for i in ids[found >= 0]]
    free = rows.free_rows()
    assert sorted(free.tolist() + live.tolist()) == list(range(rows.used))  # every row is one or the other
    assert (rows.post_ids[free] == 0).all() and rows.attributes(free) == [{}] * len(free)
    posts, authors, column = rows.columns()
    assert sorted(posts.tolist()) == sorted(model)
    assert column.decode() == [model[p][1] for p in posts.tolist()]
    assert authors.tolist() == [model[p][0] for p in posts.tolist()]


# Merge the id overlay after 2 changes and compact the arena at any garbage: every path runs.
SMALL_THRESHOLDS = {"_OVERLAY_MIN": 2, "_OVERLAY_PER_SQRT": 0, "_ARENA_GARBAGE_FLOOR": 0}
UNIVERSE = range(1, 41)
ids_st = st.lists(st.integers(1, 40), max_size=12)
attrs_st = st.one_of(
    st.none(),
    st.just({}),
    st.dictionaries(st.sampled_from(["t", "genre", "ü"]), st.text(max_size=6), max_size=2),
)
step_st = st.tuples(
    st.lists(st.tuples(st.integers(1, 40), attrs_st), max_size=12, unique_by=lambda t: t[0]), ids_st
)


@settings(max_examples=150, deadline=None)
@given(
    start=st.lists(st.integers(1, 40), unique=True, max_size=20),
    steps=st.lists(step_st, max_size=25),
    small_thresholds=st.booleans(),
)
def test_random_deltas_match_a_dict_model(start, steps, small_thresholds):
    small = mock.patch.multiple(corpus_rows, **SMALL_THRESHOLDS)
    with small if small_thresholds else contextlib.nullcontext():
        rows = snapshot(start)
        model = {p: (p * 10, {"title": f"t{p}"}) for p in start}
        check_matches(rows, model, UNIVERSE)
        for version, (upserts, deletes) in enumerate(steps, start=2):
            posts = [p for p, _ in upserts]
            authors = [p * 10 + version for p in posts]
            attrs = [a for _, a in upserts]
            d = delta(version, posts, authors, attrs, deletes)
            needed = rows.rows_needed(d)
            written = rows.apply(d)
            assert rows.used == needed and rows.version == version
            assert len(written) == len(posts) and (written < rows.used).all()
            for p, author, a in zip(posts, authors, attrs, strict=True):  # upserts, then deletes
                model[p] = (author, a or {})
            for p in deletes:
                model.pop(p, None)
            check_matches(rows, model, UNIVERSE)
        kept = rows.compact()
        assert rows.used == rows.size == len(kept) and rows.free_rows().size == 0
        check_matches(rows, model, UNIVERSE)


def test_small_thresholds_exercise_merges_and_arena_compaction():
    with (
        mock.patch.multiple(corpus_rows, **SMALL_THRESHOLDS),
        mock.patch.object(
            corpus_rows._IdLookup, "merge", autospec=True, side_effect=corpus_rows._IdLookup.merge
        ) as merge,
        mock.patch.object(
            CorpusRows, "_compact_arena", autospec=True, side_effect=CorpusRows._compact_arena
        ) as compact,
    ):
        rows = snapshot([1, 2, 3])
        rows.apply(delta(2, [4, 5, 1], attrs=[{"a": "b"}] * 3, deleted=[2]))
        rows.apply(delta(3, [6], deleted=[4, 3]))
    assert merge.call_count >= 1 and compact.call_count >= 1
    check_matches(rows, {1: (10, {"a": "b"}), 5: (50, {"a": "b"}), 6: (60, {})}, range(1, 8))


def test_delta_must_follow_version_and_model_and_changes_nothing_when_refused():
    rows = snapshot([1, 2, 3], version=5)
    bad = [
        (delta(7, [4]), "does not follow"),
        (delta(5, [4]), "does not follow"),
        (delta(6, [4], fp="0" * 16), "model"),
        (delta(6, [4, 4]), "duplicate"),
        (delta(6, [0]), "<= 0"),
        (delta(6, [4], dim=D + 1), "misaligned"),
        (Delta(6, FP, np.array([4]), np.array([1, 2]), np.zeros((1, D)), [None], np.zeros(0, np.int64)),
         "misaligned"),
    ]  # fmt: skip
    for d, message in bad:
        with pytest.raises(CorpusGap, match=message):
            rows.apply(d)
    assert isinstance(CorpusGap("x"), ValueError)  # callers that catch ValueError keep working
    check_matches(rows, {p: (p * 10, {"title": f"t{p}"}) for p in (1, 2, 3)}, range(0, 6))
    assert rows.version == 5


def test_one_apply_order_upserts_then_deletes():
    rows = snapshot([1, 2])
    rows.apply(delta(2, [3, 1], attrs=[{"a": "b"}, {"c": "d"}], deleted=[3, 1, 1, 99]))
    assert rows.size == 1 and rows.rows_of(np.array([1, 2, 3])).tolist()[::2] == [-1, -1]
    rows.apply(delta(3, [3], attrs=[{"e": "f"}], deleted=[]))  # a deleted id comes back
    assert rows.attributes(rows.rows_of(np.array([3]))) == [{"e": "f"}]


def test_free_rows_are_reused_before_growing():
    rows = snapshot([10, 20, 30, 40])
    rows.apply(delta(2, deleted=[20, 40]))
    assert rows.used == 4 and sorted(rows.free_rows().tolist()) == [1, 3]
    assert rows.rows_needed(delta(3, [50, 60, 70])) == 5
    written = rows.apply(delta(3, [50, 60, 70]))
    assert sorted(written.tolist()) == [1, 3, 4] and rows.used == 5 and rows.free_rows().size == 0


def test_snapshot_rows_are_checked():
    for posts, authors, message in (
        ([1, 2, 2], [0, 0, 0], "duplicate"),
        ([1, -2], [0, 0], "<= 0"),
        ([1, 2], [0], "misaligned"),
    ):
        with pytest.raises(CorpusGap, match=message):
            CorpusRows.from_columns(1, FP, D, np.array(posts), np.array(authors), [None] * len(posts))
    with pytest.raises(CorpusGap, match="misaligned"):
        CorpusRows.from_columns(1, FP, D, np.array([1, 2]), np.array([0, 0]), [None])


def test_arrays_are_copied_unless_handed_over():
    posts, authors = np.array([5, 6], np.int64), np.array([1, 1], np.int64)
    column = AttributeColumn.encode([{"a": "1"}, {}])
    rows = CorpusRows.from_columns(1, FP, D, posts, authors, column)
    rows.apply(delta(2, [5], [9], [{"b": "2"}], deleted=[6]))
    assert posts.tolist() == [5, 6] and authors.tolist() == [1, 1] and column.decode() == [{"a": "1"}, {}]
    adopted = CorpusRows.from_columns(1, FP, D, posts, authors, column, copy=False)
    assert adopted.post_ids is not posts and np.shares_memory(adopted.post_ids, posts)


def test_lookup_is_vectorised_and_ignores_unknown_ids():
    rows = snapshot([7, 3, 11])
    assert rows.rows_of(np.array([3, 7, 11, 4, -1, 0, 1 << 62])).tolist() == [1, 0, 2, -1, -1, -1, -1]
    assert 3 in rows and 4 not in rows
    assert rows.rows_of(np.zeros(0, np.int64)).shape == (0,)


def test_attribute_encoding_round_trips_any_text():
    attrs = [{}, None, {"title": 'a "quoted", [bracketed] {braced} title'}, {"ключ": "значение 🎬", "": ""},
             {"nul": "a\x00b", "back": "\\"}]  # fmt: skip
    column = AttributeColumn.encode(attrs)
    assert len(column) == 5 and column.decode() == [a or {} for a in attrs]
    assert column.offsets[1] == column.offsets[0] == 0  # an empty map costs no bytes


def test_attribute_columns_slice_concatenate_and_gather_as_one_json_array():
    attrs = [{}, {"title": 'a "q", [b]'}, {}, {"ключ": "🎬", "k": ""}, {"t": "x"}, {}]
    column = AttributeColumn.encode(attrs)
    parts = [column.rows(0, 2), column.rows(2, 2), column.rows(2, 5), column.rows(5, 6)]
    assert [p.decode() for p in parts] == [attrs[0:2], [], attrs[2:5], attrs[5:6]]
    joined = AttributeColumn.concat(parts)
    assert joined.decode() == attrs and joined.offsets.tolist() == column.offsets.tolist()
    rows, text = joined.json_array()
    assert rows.tolist() == [1, 3, 4] and json.loads(text) == [attrs[i] for i in (1, 3, 4)]
    compact = json.dumps([attrs[i] for i in (1, 3, 4)], separators=(",", ":"), ensure_ascii=False)
    assert text == compact.encode()
    none, empty = AttributeColumn.encode([{}, None]).json_array()
    assert none.tolist() == [] and empty == b""
    assert AttributeColumn.concat([]).json_array()[1] == b""
    with mock.patch.object(corpus_rows, "_GATHER_ROWS", 2):  # gathered in blocks, joined as one array
        rows, text = joined.json_array()
    assert rows.tolist() == [1, 3, 4] and json.loads(text) == [attrs[i] for i in (1, 3, 4)]


def test_an_attribute_column_of_rows_is_their_encoded_attributes():
    posts = list(range(1, 9))
    attrs = [{"t": str(p)} if p % 3 else {} for p in posts]
    rows = CorpusRows.from_columns(1, FP, D, np.array(posts), np.zeros(8, np.int64), attrs)
    which = np.array([7, 0, 2, 2, 5], np.int64)
    column = rows.attribute_column(which)
    assert column.decode() == rows.attributes(which) == [attrs[i] for i in which.tolist()]
    assert len(rows.attribute_column(np.zeros(0, np.int64))) == 0


@pytest.mark.parametrize("announced", [False, True])
def test_attribute_builder_spans_blocks_and_checks_the_announced_rows(announced):
    batches = [[{"title": f"t{i}-{j}"} if (i + j) % 3 else None for j in range(7)] for i in range(5)]
    flat = [a or {} for batch in batches for a in batch]
    with mock.patch.object(corpus_rows, "_BLOCK_BYTES", 40):  # several blocks, one batch larger than a block
        builder = corpus_rows.AttributeColumnBuilder(len(flat) if announced else None)
        for batch in batches:
            builder.extend(batch)
        assert len(builder._blocks) > 1
        column = builder.finish()
    assert len(column) == len(flat) and column.decode() == flat
    assert builder.finish().decode() == []  # it let go of everything
    if announced:
        short = corpus_rows.AttributeColumnBuilder(3)
        short.extend([{}])
        with pytest.raises(ValueError, match="1 rows of the 3"):
            short.finish()
        with pytest.raises(ValueError, match="more than the 3"):
            corpus_rows.AttributeColumnBuilder(3).extend([{}] * 4)


def test_memory_per_item_within_budget():
    # The budget: at most 64 bytes per item beyond the embeddings, plus the attribute bytes.
    n = 100_000
    posts = np.random.default_rng(0).permutation(np.arange(1, 10 * n))[:n].astype(np.int64)
    column = AttributeColumn.encode({"title": f"movie {p}"} for p in posts.tolist())
    rows = CorpusRows.from_columns(1, FP, D, posts, posts % 1000, column, copy=False)
    assert rows.attribute_bytes_held == rows.attribute_bytes_used == len(column.data)
    assert (rows.nbytes - rows.attribute_bytes_held) / n <= 64
    # Churn: the id overlay is folded into the base before it costs much, the columns grow by a
    # quarter, and the arena's garbage stays bounded by compaction.
    for version in range(2, 400):
        fresh = np.arange(version * 1000, version * 1000 + 60) + 10 * n
        gone = posts[version * 50 : version * 50 + 50]
        rows.apply(delta(version, fresh, attrs=[{"title": "x" * (version % 20)}] * 60, deleted=gone))
    assert rows.size == n + 398 * 10 and rows.used > n  # grew past the snapshot's exact size
    assert (rows.nbytes - rows.attribute_bytes_held) / rows.size <= 64
    used = rows.attribute_bytes_used
    assert rows.attribute_bytes_held <= 1.25 * (used + max(corpus_rows._ARENA_GARBAGE_FLOOR, used // 4)) + (
        1 << 16
    )
