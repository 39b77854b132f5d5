"""The item store (the corpus of record) without grpc: transactional changes with the version, reopen,
one process per store, refusal of anything it cannot read, and write failures (injected SQLITE_FULL /
failed fsync, and a real file size limit in a subprocess) that apply nothing and leave later writes
working."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from candidate_service.item_store import APPLICATION_ID, Items, ItemStoreError, SqliteItemStore
from shared.errors import StorageFull, StorageUnavailable
from tests.candidate_faults import StoreFaults
from tests.support import REPO_ROOT

NONE = np.zeros(0, np.int64)


def items(*ids: int, author: int = 1, attrs: dict | None = None) -> Items:
    post_ids = np.asarray(ids, np.int64)
    return Items(post_ids, np.full(len(ids), author, np.int64), [attrs] * len(ids))


def state(store: SqliteItemStore) -> dict[int, tuple[int, dict | None]]:
    rows = store.load()
    return {p: (a, attrs) for p, a, attrs in zip(rows.post_ids.tolist(), rows.author_ids.tolist(),
                                                 rows.attributes, strict=True)}  # fmt: skip


@pytest.fixture
def path(tmp_path):
    return tmp_path / "store" / "items.sqlite3"


def test_new_store_is_fresh_then_each_commit_bumps_the_version(path):
    store = SqliteItemStore.open(path)
    v0 = store.version
    assert store.fresh and len(store.load()) == 0 and v0 > 1_600_000_000_000_000  # microseconds
    store.commit(v0 + 1, items(3, 1, 2, attrs={"title": "été", "k": "v"}), NONE, {"items_digest": "abc"})
    assert not store.fresh and store.version == v0 + 1 and store.meta("items_digest") == "abc"
    # one change: upserts first, then deletes (an id in both ends up deleted)
    store.commit(v0 + 2, items(2, 9, author=7), np.asarray([1, 9, 404], np.int64))
    assert state(store) == {2: (7, None), 3: (1, {"title": "été", "k": "v"})}
    with pytest.raises(ValueError, match="does not follow"):
        store.commit(v0 + 4, items(5), NONE)
    store.close()
    again = SqliteItemStore.open(path)
    assert (
        again.version == v0 + 2
        and not again.fresh
        and state(again) == {2: (7, None), 3: (1, {"title": "été", "k": "v"})}
    )
    again.close()


def test_load_returns_rows_sorted_with_attributes_in_place(path):
    store = SqliteItemStore.open(path)
    ids = np.random.default_rng(0).permutation(np.arange(1, 2001)).astype(np.int64)
    attrs = [{"n": str(i)} if i % 3 == 0 else None for i in ids.tolist()]
    store.commit(store.version + 1, Items(ids, ids % 13, attrs), NONE)
    rows = store.load()
    assert rows.post_ids.tolist() == list(range(1, 2001)) and rows.author_ids.tolist() == [
        i % 13 for i in range(1, 2001)
    ]
    assert rows.attributes == [{"n": str(i)} if i % 3 == 0 else None for i in range(1, 2001)]
    store.close()


def test_a_second_process_on_the_same_store_is_refused_until_the_first_closes(path):
    first = SqliteItemStore.open(path)
    with pytest.raises(ItemStoreError, match=r"in use by another process \(pid \d+\)"):
        SqliteItemStore.open(path)
    first.close()
    SqliteItemStore.open(path).close()


def _damage(path, how: str) -> None:
    if how == "garbage header":
        data = bytearray(path.read_bytes())
        data[:100] = b"\xab" * 100
        path.write_bytes(bytes(data))
    elif how == "another application":
        path.unlink()
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE items (x)")
    elif how == "another schema version":
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA user_version = 7")
    elif how == "corrupt pages":
        data = bytearray(path.read_bytes())
        data[4096 * 2 : 4096 * 4] = np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
    elif how == "bad attributes":
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE items SET attributes = '{not json' WHERE post_id = 5")
    elif how == "missing version":
        with sqlite3.connect(path) as conn:
            conn.execute("DELETE FROM meta WHERE key = 'version'")


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("garbage header", "file is not a database"),
        ("another application", "not a twotower item store"),
        ("another schema version", "schema version 7, this service reads 1"),
        ("corrupt pages", "integrity check failed"),
        ("bad attributes", "malformed JSON"),
        ("missing version", "meta 'version'"),
    ],
)
def test_a_store_it_cannot_read_is_refused_and_left_untouched(path, how, message):
    store = SqliteItemStore.open(path)
    store.commit(store.version + 1, items(*range(1, 3001), attrs={"title": "x" * 40}), NONE)
    store.close()
    _damage(path, how)
    before = path.read_bytes()
    with pytest.raises(ItemStoreError) as info:
        store = SqliteItemStore.open(path)
        store.load()  # some damage shows only when the rows are read
    assert message in str(info.value) and str(path) in str(info.value)
    assert "never replaced" in str(info.value)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("fault", "error"), [("SQLITE_FULL", StorageFull), ("SQLITE_IOERR_FSYNC", StorageUnavailable)]
)
def test_a_failed_commit_applies_nothing_and_later_commits_work(path, fault, error):
    faults = StoreFaults()
    store = faults.open(path)
    v = store.version
    store.commit(v + 1, items(100), NONE)
    faults.fail_next_commits(fault)
    with pytest.raises(error, match=fault) as info:
        store.commit(v + 2, items(101), np.asarray([100], np.int64))
    assert "not" in str(info.value) and str(path) in str(info.value)
    assert store.version == v + 1 and state(store) == {100: (1, None)}  # rolled back, version kept
    store.commit(v + 2, items(102), NONE)  # the same version number: 101 was never acknowledged
    store.commit(v + 3, Items.empty(), np.asarray([100], np.int64))
    store.close()
    again = SqliteItemStore.open(path)
    assert again.version == v + 3 and state(again) == {102: (1, None)}
    again.close()


def test_a_real_file_size_limit_fails_the_write_and_nothing_acknowledged_is_lost(path):
    # RLIMIT_FSIZE makes the kernel refuse writes past the limit (EFBIG), as a full disk refuses them
    # (ENOSPC). It is set in a subprocess (it would hit pytest's own files here) around one commit.
    script = textwrap.dedent(f"""
        import json, resource
        import numpy as np
        from candidate_service.item_store import Items, SqliteItemStore
        def one(i):
            return Items(np.asarray([i]), np.asarray([1]), [{{"title": "x" * 200}}])
        none = np.zeros(0, np.int64)
        store = SqliteItemStore.open({str(path)!r})
        v, out = store.version, {{}}
        store.commit(v + 1, one(100), none)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
        try:
            store.commit(v + 2, one(101), none)
            out["101"] = "acknowledged"
        except Exception as exc:
            out["101"] = type(exc).__name__ + ": " + str(exc)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        store.commit(v + 2, one(102), none)
        store.commit(v + 3, Items.empty(), np.asarray([100]))
        out["version"] = store.version - v
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["101"].startswith("StorageFull: the item store") and "RLIMIT_FSIZE" in out["101"], out
    assert out["version"] == 3
    store = SqliteItemStore.open(path)
    assert state(store) == {102: (1, {"title": "x" * 200})}
    store.close()


def test_the_file_is_marked_as_an_item_store_in_wal_mode(path):
    SqliteItemStore.open(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


def test_set_meta_is_durable_leaves_the_version_and_fails_whole(path):
    faults = StoreFaults()
    store = faults.open(path)
    version = store.version
    store.set_meta({"active_checkpoint": "/ckpt/a", "active_fingerprint": "aaaa"})
    assert store.version == version and store.fresh  # not a change of the corpus
    faults.fail_next_commits("SQLITE_FULL")
    with pytest.raises(StorageFull):
        store.set_meta({"active_checkpoint": "/ckpt/b", "active_fingerprint": "bbbb"})
    with pytest.raises(ValueError, match="cannot be set directly"):
        store.set_meta({"version": "1"})
    store.close()
    again = SqliteItemStore.open(path)
    assert (again.meta("active_checkpoint"), again.meta("active_fingerprint")) == ("/ckpt/a", "aaaa")
    assert again.version == version
    again.close()
