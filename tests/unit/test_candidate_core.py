"""CandidateCore without grpc: the item store is the record (restarts, another model, a changed items
file, --import-items, a corrupt store), embeddings are derived (cached per model, partly re-encoded
when stale, rebuilt when corrupt), failed writes apply nothing, and the watch stream (snapshot,
deltas, resume, slow watchers, the watcher limit)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace

import numpy as np
import pytest

from candidate_service.config import CandidateConfig
from candidate_service.corpus import CandidateCore
from candidate_service.embedding_cache import cache_file, read_cache
from candidate_service.item_store import ItemStoreError
from candidate_service.items_file import ItemsFileError
from candidate_service.watch import SnapshotPart
from shared.errors import InvalidInput, NotReady, Overloaded, StorageFull, StorageUnavailable
from shared.model.checkpoint import load_checkpoint, random_model, save_checkpoint
from shared.model.features import featurize_items
from tests.candidate_faults import StoreFaults

N = 50


def write_items(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def setup(tmp_path, tiny_checkpoint):
    items = tmp_path / "items.jsonl"
    write_items(
        items, [{"post_id": i, "author_id": i % 5, "attributes": {"title": f"t{i}"}} for i in range(1, N + 1)]
    )
    return CandidateConfig(checkpoint=tiny_checkpoint, items=items, cache_dir=tmp_path / "cache")


@pytest.fixture
def other_checkpoint(tmp_path, tiny_config):
    path = tmp_path / "ckpt-b"
    save_checkpoint(random_model(tiny_config, seed=1), path)
    return path


def started(config: CandidateConfig, open_store=None, encoded: list[int] | None = None) -> CandidateCore:
    """A loaded core; `encoded` collects every post id the encoder is asked for while loading."""
    core = CandidateCore(config) if open_store is None else CandidateCore(config, open_store)
    core.load_model()
    if encoded is not None:
        real = core.encoder.encode

        def spy(post_ids, author_ids, *args, **kwargs):
            encoded.extend(np.asarray(post_ids).tolist())
            return real(post_ids, author_ids, *args, **kwargs)

        core.encoder.encode = spy
    core.load_corpus()
    return core


def run(coro, timeout: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def close(core: CandidateCore) -> None:
    run(core.aclose())


def ids(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def state(core: CandidateCore) -> dict:
    """{post_id: (author_id, attributes)}: what the item store must keep whatever the model."""
    snap = core.corpus.snapshot()
    return {
        int(p): (int(a), attrs)
        for p, a, attrs in zip(snap.post_ids, snap.author_ids, snap.attributes, strict=True)
    }


def embeddings(core: CandidateCore) -> dict[int, np.ndarray]:
    snap = core.corpus.snapshot()
    return dict(zip(snap.post_ids.tolist(), snap.embeddings, strict=True))


def same_embeddings(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> bool:
    """Equal up to float rounding: a row encoded in another batch may differ in the last bit."""
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)


def assert_encoded_by(core: CandidateCore, checkpoint) -> None:
    loaded = load_checkpoint(checkpoint)
    snap = core.corpus.snapshot()
    expected = loaded.model.encode_items(featurize_items(snap.post_ids, snap.author_ids, loaded.config))
    assert np.allclose(snap.embeddings, expected.detach().numpy(), atol=1e-6)
    assert core.info().fingerprint == loaded.fingerprint


async def change(core: CandidateCore) -> int:
    """New item 1000, item 1 with new author and attributes, item 4 with new attributes, 2 and 3 deleted."""
    up = await core.upsert(ids(1, 1000), ids(9, 9), [{"title": "new"}, None])
    assert (up.inserted, up.updated) == (1, 1)
    await core.upsert(ids(4), ids(4 % 5), [{"title": "renamed"}])
    gone = await core.delete(ids(2, 3, 77777))
    assert gone.deleted == 2 and gone.unknown_post_ids == [77777] and gone.version == up.version + 2
    return gone.version


def test_build_encodes_with_the_model_and_caches(setup):
    core = started(setup)
    assert_encoded_by(core, setup.checkpoint)
    assert core.info().num_items == N and state(core)[1] == (1, {"title": "t1"})
    cached = read_cache(cache_file(setup.cache_dir, core.info().fingerprint), core.info().fingerprint, 16)
    assert cached.version == core.info().version and len(cached) == N
    assert setup.item_store_path.exists() and len(core.item_store.load()) == N
    close(core)


def test_restart_loads_the_cache_without_encoding(setup):
    first = started(setup)
    before, emb, version = state(first), embeddings(first), first.info().version
    close(first)
    encoded: list[int] = []
    second = started(setup, encoded=encoded)
    assert encoded == [] and state(second) == before and same_embeddings(embeddings(second), emb)
    assert second.info().version == version
    close(second)


def test_upserts_and_deletes_survive_a_restart(setup):
    core = started(setup)
    version = run(change(core))
    before, emb = state(core), embeddings(core)
    close(core)
    again = started(setup)
    assert (
        again.info().version == version and state(again) == before and same_embeddings(embeddings(again), emb)
    )
    assert before[1] == (9, {"title": "new"}) and 1000 in before and 2 not in before and 3 not in before
    close(again)


def test_restart_with_another_model_keeps_every_change_and_re_encodes_only_what_changed(
    setup, other_checkpoint
):
    core = started(setup)
    version = run(change(core))
    before = state(core)
    close(core)

    encoded: list[int] = []
    model_b = started(replace(setup, checkpoint=other_checkpoint), encoded=encoded)
    assert state(model_b) == before and model_b.info().version == version  # nothing reverted
    assert_encoded_by(model_b, other_checkpoint)
    assert sorted(encoded) == sorted(before)  # no cache for model B yet: everything
    close(model_b)

    encoded.clear()
    back = started(setup, encoded=encoded)  # model A's cache predates the changes: stale
    assert state(back) == before and back.info().version == version
    assert_encoded_by(back, setup.checkpoint)
    assert sorted(encoded) == [1, 1000]  # new author or new item; attribute changes cost nothing
    close(back)


def test_corrupt_embedding_cache_is_rebuilt_with_every_item(setup, caplog):
    core = started(setup)
    run(change(core))
    before, emb, fingerprint = state(core), embeddings(core), core.info().fingerprint
    close(core)
    path = cache_file(setup.cache_dir, fingerprint)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = started(setup)
    assert "embeddings cache is unusable" in caplog.text and "checksum mismatch" in caplog.text
    assert state(again) == before and same_embeddings(
        embeddings(again), emb
    )  # every item, the same embeddings
    assert read_cache(path, fingerprint, 16).version == again.info().version  # rewritten, valid
    close(again)


def test_lost_embedding_cache_is_rebuilt_with_every_item(setup):
    core = started(setup)
    run(change(core))
    before, emb = state(core), embeddings(core)
    close(core)
    for path in (setup.cache_dir / "embeddings").iterdir():
        path.unlink()
    again = started(setup)
    assert state(again) == before and same_embeddings(embeddings(again), emb)
    close(again)


def test_corrupt_item_store_refuses_to_load_and_is_not_replaced(setup):
    core = started(setup)
    run(change(core))
    close(core)
    store = setup.item_store_path
    data = bytearray(store.read_bytes())
    data[:16] = b"not an sqlite db"
    store.write_bytes(bytes(data))
    core = CandidateCore(setup)
    with pytest.raises(ItemStoreError, match=r"cannot be read .* never replaced"):
        core.load_model()  # the store is opened first: it records which model to serve
    assert store.read_bytes() == bytes(data) and not core.ready and not core.model_ready
    core = CandidateCore(setup)  # the lock was released: a fixed store can be opened again
    with pytest.raises(ItemStoreError, match="file is not a database"):
        core.load_model()


def test_changed_items_file_is_not_applied_without_import(setup, caplog):
    core = started(setup)
    run(change(core))
    before = state(core)
    close(core)
    write_items(setup.items, [{"post_id": 1}, {"post_id": 2}, {"post_id": 5000}])
    with caplog.at_level(logging.INFO):
        again = started(setup)
    assert state(again) == before
    assert "differs from the one last imported" in caplog.text and "--import-items" in caplog.text
    close(again)
    caplog.clear()
    setup.items.unlink()
    with caplog.at_level(logging.INFO):
        close(started(setup))  # the file is not needed once imported
    assert "not found; not needed" in caplog.text


def test_import_items_upserts_new_and_changed_items_and_keeps_the_rest(setup, caplog):
    core = started(setup)
    version = run(change(core))
    before = state(core)
    close(core)
    # item 5: new author; item 6: same; item 7: new attributes; 9001: new; the others are not in the file
    write_items(setup.items, [{"post_id": 5, "author_id": 3, "attributes": {"title": "t5"}},
                              {"post_id": 6, "author_id": 1, "attributes": {"title": "t6"}},
                              {"post_id": 7, "author_id": 2, "attributes": {"title": "seven"}},
                              {"post_id": 9001, "author_id": 1}])  # fmt: skip
    with caplog.at_level(logging.INFO):
        again = started(replace(setup, import_items=True))
    expected = {**before, 5: (3, {"title": "t5"}), 7: (2, {"title": "seven"}), 9001: (1, None)}
    assert state(again) == expected and again.info().version == version + 1  # one change
    assert "1 new items, 2 changed, 1 unchanged" in caplog.text
    assert_encoded_by(again, setup.checkpoint)
    close(again)


def test_new_store_needs_an_items_file(setup):
    core = CandidateCore(replace(setup, items=None))
    core.load_model()
    with pytest.raises(ItemsFileError, match="is new and no items file was given"):
        core.load_corpus()


def test_item_store_path_is_independent_of_the_model(setup, tmp_path, other_checkpoint):
    config = replace(setup, item_store=tmp_path / "elsewhere" / "record.sqlite3")
    core = started(config)
    run(core.upsert(ids(4242), ids(1), [None]))
    close(core)
    again = started(replace(config, checkpoint=other_checkpoint))
    assert 4242 in state(again) and not (setup.cache_dir / "items.sqlite3").exists()
    close(again)


@pytest.mark.parametrize("fault", ["SQLITE_FULL", "SQLITE_IOERR_FSYNC"])
def test_failed_write_changes_nothing_and_later_writes_are_kept(setup, fault):
    # The scenario: upsert 100 acknowledged, upsert 101 fails (disk full / failed fsync),
    # upsert 102 and delete 1 acknowledged; a restart has exactly the acknowledged state.
    faults = StoreFaults()
    core = started(setup, faults.open)
    error = StorageFull if fault == "SQLITE_FULL" else StorageUnavailable

    async def scenario():
        with core.watch(0, "") as events:
            (snap,) = await take(events, 1)
            v = snap.snapshot.version
            assert (await core.upsert(ids(100), ids(1), [None])).version == v + 1
            faults.fail_next_commits(fault)
            with pytest.raises(error, match=fault):
                await core.upsert(ids(101), ids(1), [{"a": "b"}])
            assert core.info().version == v + 1 and 101 not in state(core)  # memory untouched
            assert (await core.upsert(ids(102), ids(1), [None])).version == v + 2
            faults.fail_next_commits(fault)
            with pytest.raises(error):
                await core.delete(ids(5))
            assert (await core.delete(ids(1))).version == v + 3
            seen = [describe(d) for d in await take(events, 3)]  # consecutive versions, no 101
            assert seen == [
                ("delta", v + 1, (100,), ()),
                ("delta", v + 2, (102,), ()),
                ("delta", v + 3, (), (1,)),
            ]
        await core.aclose()

    run(scenario())
    again = started(setup)
    assert set(state(again)) == (set(range(2, N + 1)) | {100, 102})
    close(again)


def test_cache_is_refreshed_in_the_background_after_enough_changes(setup):
    config = replace(setup, cache_refresh_after_changes=3)
    core = started(config)
    fingerprint, initial = core.info().fingerprint, core.info().version

    async def changes():
        for i in range(7):
            await core.upsert(ids(500 + i), ids(1), [None])
            await asyncio.sleep(0)
        await core.aclose()  # waits for a refresh in progress

    run(changes())
    on_disk = read_cache(cache_file(setup.cache_dir, fingerprint), fingerprint, 16)
    assert initial + 3 <= on_disk.version <= initial + 7
    encoded: list[int] = []
    again = started(config, encoded=encoded)
    assert len(encoded) == initial + 7 - on_disk.version and 506 in state(again)
    close(again)


async def take(stream, count: int) -> list:
    out = []
    async for event in stream:
        out.append(event)
        if len(out) == count:
            break
    return out


def describe(event) -> tuple:
    if isinstance(event, SnapshotPart):
        return ("chunk", event.snapshot.version, event.index, event.lo, event.hi)
    return (
        "delta",
        event.version,
        tuple(event.upsert_post_ids.tolist()),
        tuple(event.deleted_post_ids.tolist()),
    )


def test_watch_sends_snapshot_then_deltas_and_resumes(setup):
    core = started(setup)

    async def main():
        fingerprint = core.info().fingerprint
        with core.watch(0, "") as first:
            head = await take(first, 1)
            assert isinstance(head[0], SnapshotPart) and head[0].num_chunks == 1 and head[0].hi == N
            start = head[0].snapshot.version
            await core.upsert(ids(900), ids(1), [None])
            await core.delete(ids(900))
            deltas = await take(first, 2)
            assert [describe(d) for d in deltas] == [
                ("delta", start + 1, (900,), ()), ("delta", start + 2, (), (900,)),
            ]  # fmt: skip
        # a watcher that knows `start` resumes with the two deltas, no snapshot
        with core.watch(start, fingerprint) as resumed:
            assert [describe(d) for d in await take(resumed, 2)] == [describe(d) for d in deltas]
        # another fingerprint or an unknown future version gets a snapshot
        for version, other in ((start, "other"), (start + 99, fingerprint)):
            with core.watch(version, other) as events:
                (event,) = await take(events, 1)
                assert isinstance(event, SnapshotPart) and event.snapshot.version == start + 2
        await core.aclose()

    run(main())


def test_slow_watcher_gets_a_fresh_snapshot_then_is_cut_off(setup):
    core = started(replace(setup, watcher_queue_size=2, max_watcher_resyncs=1))

    async def main():
        with core.watch(0, "") as slow:
            (snap,) = await take(slow, 1)
            for i in range(4):  # overflows the slow watcher's queue of 2 without waiting for it
                await core.upsert(ids(700 + i), ids(1), [None])
            (again,) = await take(slow, 1)
            assert isinstance(again, SnapshotPart) and again.snapshot.version == snap.snapshot.version + 4
            for i in range(4):
                await core.upsert(ids(800 + i), ids(1), [None])
            with pytest.raises(Overloaded):
                await take(slow, 5)
        assert core.hub.num_watchers == 0
        await core.aclose()

    run(main())


def test_watchers_past_the_limit_are_refused_until_one_leaves(setup):
    core = started(replace(setup, max_watchers=2))

    async def main():
        with core.watch(0, "") as a, core.watch(0, ""):
            refused = r"2 WatchCorpus streams are open.*--max-watchers 2"
            with pytest.raises(Overloaded, match=refused), core.watch(0, ""):
                pass
            assert core.hub.num_watchers == 2
            await take(a, 1)
        with core.watch(0, "") as c:  # both left: room again
            assert isinstance((await take(c, 1))[0], SnapshotPart)
        assert core.hub.num_watchers == 0
        await core.aclose()

    run(main())


def test_bad_requests_change_nothing(setup):
    core = started(setup)
    version = core.info().version

    async def bad():
        for call in (
            core.upsert(ids(0), ids(0), [None]),
            core.upsert(ids(-3), ids(0), [None]),
            core.upsert(ids(5), ids(-1), [None]),
            core.delete(ids()),
            core.delete(ids(0)),
            core.delete(ids(4, 4)),
            core.delete(np.arange(1, setup.max_batch_items + 2, dtype=np.int64)),
        ):
            with pytest.raises(InvalidInput):
                await call
        await core.aclose()

    run(bad())
    again = started(setup)
    assert again.info().version == version and again.info().num_items == N
    close(again)


def test_not_ready_before_the_corpus_is_loaded(setup):
    core = CandidateCore(setup)
    with pytest.raises(NotReady):
        core.info()
    with pytest.raises(NotReady):
        run(core.encode(ids(1), ids(0)))
    with pytest.raises(NotReady), core.watch(0, ""):
        pass


def test_a_write_waiting_for_the_corpus_lock_does_not_stall_the_event_loop(setup):
    """A snapshot copy (a new watcher, a rollout, a cache write) holds the corpus lock for a while on a
    large corpus: a write that needs the lock meanwhile waits in a worker thread, not on the loop."""
    import threading

    core = started(setup)
    lock = core.corpus._lock
    entered, release = threading.Event(), threading.Event()
    timed_out = []
    real = core.corpus.upsert_delta

    def upsert_delta(*args):
        entered.set()
        return real(*args)

    def hold() -> None:
        with lock:
            if not release.wait(10):  # only when the loop is stuck behind the lock
                timed_out.append(True)

    core.corpus.upsert_delta = upsert_delta
    holder = threading.Thread(target=hold)

    async def body():
        holder.start()
        while not lock.locked():
            await asyncio.sleep(0.001)
        write = asyncio.ensure_future(core.upsert(ids(4242), ids(1), [None]))
        while not entered.is_set():  # the loop runs on while the write waits for the lock
            await asyncio.sleep(0.001)
        release.set()
        return await write

    up = run(body())
    holder.join(15)
    assert not timed_out and up.inserted == 1 and 4242 in core.corpus
    close(core)
