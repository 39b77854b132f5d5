"""CandidateCore without grpc: build + cache, reload without re-encoding, delta replay across restarts,
corrupt-cache rebuild, compaction, and the watch stream (snapshot, deltas, resume, slow watchers)."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest

from candidate_service.config import CandidateConfig
from candidate_service.corpus import CandidateCore, SnapshotPart
from candidate_service.persistence import SNAPSHOT_FILE, cache_dir_for, read_snapshot
from shared.errors import InvalidInput, NotReady, Overloaded
from shared.model.checkpoint import load_checkpoint
from shared.model.features import featurize_items

N = 50


@pytest.fixture
def setup(tmp_path, tiny_checkpoint):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(
        json.dumps({"post_id": i, "author_id": i % 5, "attributes": {"title": f"t{i}"}}) + "\n"
        for i in range(1, N + 1)
    ))  # fmt: skip
    return CandidateConfig(checkpoint=tiny_checkpoint, items=items, cache_dir=tmp_path / "cache")


def started(config: CandidateConfig) -> CandidateCore:
    core = CandidateCore(config)
    core.load_model()
    core.load_corpus()
    return core


def run(coro, timeout: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def ids(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def state(core: CandidateCore) -> dict:
    snap = core.store.snapshot()
    return {int(p): (int(a), e.tobytes(), attrs) for p, a, e, attrs in
            zip(snap.post_ids, snap.author_ids, snap.embeddings, snap.attributes, strict=True)}  # fmt: skip


def test_build_encodes_with_the_model_and_caches(setup):
    core = started(setup)
    loaded = load_checkpoint(setup.checkpoint)
    snap = core.store.snapshot()
    expected = loaded.model.encode_items(featurize_items(snap.post_ids, snap.author_ids, loaded.config))
    assert np.allclose(snap.embeddings, expected.detach().numpy(), atol=1e-6)
    assert core.info().num_items == N and snap.attributes[0] == {"title": "t1"}
    assert (cache_dir_for(setup.cache_dir, loaded.fingerprint, core._items_digest) / SNAPSHOT_FILE).exists()
    core.close()


def test_restart_loads_the_cache_without_encoding(setup, monkeypatch):
    first = started(setup)
    before = state(first)
    version = first.info().version
    first.close()
    second = CandidateCore(setup)
    second.load_model()
    monkeypatch.setattr(second.encoder, "encode", lambda *a, **k: pytest.fail("re-encoded a cached corpus"))
    second.load_corpus()
    assert state(second) == before and second.info().version == version


def test_upserts_and_deletes_survive_a_restart(setup):
    core = started(setup)

    async def change():
        up = await core.upsert(ids(1, 1000), ids(9, 9), [{"title": "new"}, None])
        assert (up.inserted, up.updated) == (1, 1)
        gone = await core.delete(ids(2, 3, 77777))
        assert gone.deleted == 2 and gone.unknown_post_ids == [77777] and gone.version == up.version + 1
        return gone.version

    version = run(change())
    before = state(core)
    core.close()
    again = started(setup)
    assert again.info().version == version and state(again) == before
    assert 1000 in again.store and 2 not in again.store and before[1][2] == {"title": "new"}


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

    run(bad())
    assert core.info().version == version and core.info().num_items == N


def test_corrupt_cache_is_moved_aside_and_rebuilt(setup, caplog):
    core = started(setup)
    run(core.upsert(ids(4242), ids(1), [None]))
    directory = core._dir
    core.close()
    data = bytearray((directory / SNAPSHOT_FILE).read_bytes())
    data[-5] ^= 0xFF
    (directory / SNAPSHOT_FILE).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = started(setup)
    assert "discarding the corpus cache" in caplog.text and "checksum mismatch" in caplog.text
    assert again.info().num_items == N and 4242 not in again.store  # rebuilt from the items file
    assert any(p.name.startswith(directory.name + ".corrupt-") for p in directory.parent.iterdir())


def test_compaction_folds_the_log_into_the_snapshot(setup):
    from dataclasses import replace

    config = replace(setup, compact_after_deltas=3)
    core = started(config)

    async def changes():
        for i in range(7):
            await core.upsert(ids(500 + i), ids(1), [None])
            await asyncio.sleep(0)
        while core._compaction is not None:
            await asyncio.sleep(0.01)

    initial = core.info().version
    run(changes())
    on_disk = read_snapshot(core._dir, core.store.fingerprint, core._items_digest, core.store.dim)
    assert on_disk.version > initial and core._log.records == core.info().version - on_disk.version < 7
    before, version = state(core), core.info().version
    core.close()
    again = started(config)
    assert state(again) == before and again.info().version == version


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
        first = core.watch(0, "")
        head = await take(first, 1)
        assert isinstance(head[0], SnapshotPart) and head[0].num_chunks == 1 and head[0].hi == N
        start = head[0].snapshot.version
        await core.upsert(ids(900), ids(1), [None])
        await core.delete(ids(900))
        deltas = await take(first, 2)
        assert [describe(d) for d in deltas] == [
            ("delta", start + 1, (900,), ()), ("delta", start + 2, (), (900,)),
        ]  # fmt: skip
        await first.aclose()
        # a watcher that knows `start` resumes with the two deltas, no snapshot
        resumed = await take(core.watch(start, core.store.fingerprint), 2)
        assert [describe(d) for d in resumed] == [describe(d) for d in deltas]
        # another fingerprint or an unknown future version gets a snapshot
        for version, fingerprint in ((start, "other"), (start + 99, core.store.fingerprint)):
            (event,) = await take(core.watch(version, fingerprint), 1)
            assert isinstance(event, SnapshotPart) and event.snapshot.version == start + 2

    run(main())


def test_slow_watcher_gets_a_fresh_snapshot_then_is_cut_off(setup):
    from dataclasses import replace

    core = started(replace(setup, watcher_queue_size=2, max_watcher_resyncs=1))

    async def main():
        slow = core.watch(0, "")
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

    run(main())


def test_not_ready_before_the_corpus_is_loaded(setup):
    core = CandidateCore(setup)
    with pytest.raises(NotReady):
        core.info()
    with pytest.raises(NotReady):
        run(core.encode(ids(1), ids(0)))
