"""candidate_service killed (SIGKILL) while it imports the items file, encodes and writes its
embeddings cache, and while it commits upserts: the restart recovers, the item store and the cache on
disk are never corrupt, and no acknowledged upsert is lost.

Kill points are found from the outside, not guessed from timings: the log lines that say the item
store was created and that encoding starts, the temporary cache file that exists only while the
cache is written, and a count of acknowledged upserts. A kill while upserts stream in lands at an
arbitrary point among frequent cache refreshes, not certainly inside one (the test prints whether a
refresh was in progress): nothing there depends on the cache, which is derived data.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from candidate_service.embedding_cache import cache_file, read_cache
from candidate_service.item_store import SqliteItemStore
from shared import codec
from shared.model.checkpoint import load_checkpoint
from tests.reliability.harness import START_S, wait_until, write_items
from tests.support import ServiceProcess
from twotower.v1 import candidate_tower_pb2, candidate_tower_pb2_grpc, common_pb2

pytestmark = pytest.mark.reliability

BIG = 200_000  # items: reading, encoding and writing them takes a moment (~2 s here)
INT64 = (common_pb2.DTYPE_INT64,)


def _tmp_files(cache: Path) -> list[Path]:
    return list(cache.glob("embeddings/.*.tmp")) if cache.exists() else []


def _start(tmp: Path, ckpt: Path, items: Path, cache: Path, name: str, *extra: str) -> ServiceProcess:
    args = ["--checkpoint", str(ckpt), "--items", str(items), "--cache-dir", str(cache), *extra]
    return ServiceProcess("candidate_service", args, tmp, name)


def corpus_post_ids(address: str) -> set[int]:
    """Every live post id, from a fresh WatchCorpus snapshot."""
    ids: set[int] = set()
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stream = candidate_tower_pb2_grpc.CandidateTowerStub(ch).WatchCorpus(
            candidate_tower_pb2.WatchCorpusRequest(), timeout=60
        )
        for event in stream:
            chunk = event.snapshot_chunk
            ids.update(codec.decode_numpy(chunk.post_ids, "post_ids", INT64, shape=(None,)).tolist())
            if chunk.chunk_index == chunk.num_chunks - 1:
                stream.cancel()
                break
    return ids


def _check_cache_on_disk(cache: Path, ckpt: Path) -> str:
    """The item store opens and reads; the embeddings cache, if any, passes every check (checksum,
    shapes). Raises ItemStoreError / CacheError otherwise."""
    loaded = load_checkpoint(ckpt)
    found = []
    if (cache / "items.sqlite3").exists():
        store = SqliteItemStore.open(cache / "items.sqlite3")
        found.append(f"item store of {len(store.load())} items")
        store.close()
    path = cache_file(cache, loaded.fingerprint)
    if path.exists():
        found.append(f"cache of {len(read_cache(path, loaded.fingerprint, loaded.config.emb_dim))} rows")
    return ", ".join(found) or "nothing"


def _kill_when(proc: ServiceProcess, ready, what: str, delay: float = 0.0) -> str:
    wait_until(lambda: ready() or proc.proc.poll() is not None, what, START_S)
    time.sleep(delay)
    proc.kill()
    log = proc.log()
    if "embeddings cache" in log and "written" in log:
        return "after cache written"
    return "encoded" if "encoded" in log else "encoding" if "encoding " in log else "importing"


INITIAL_POINTS = {
    "importing items": ("created", 0.2),
    "encoding": ("encoding", 0.1),
    "writing cache": ("tmp", 0.0),
}
SLOW_POINTS = {f"encoding+{d:.2f}s": ("encoding", d) for d in (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)}


def _initial_build_case(tmp_path: Path, ckpt: Path, items: Path, trigger: str, delay: float) -> None:
    cache = tmp_path / "cache"
    proc = _start(tmp_path, ckpt, items, cache, "killed")
    conditions = {
        "created": lambda: "created the item store" in proc.log(),
        "encoding": lambda: "encoding " in proc.log(),
        # the temp file exists for a moment only: once the log says the cache is written, the kill
        # lands after it (printed as "landed")
        "tmp": lambda: bool(_tmp_files(cache)) or "written at version" in proc.log(),
    }
    landed = _kill_when(proc, conditions[trigger], trigger, delay)
    on_disk = _check_cache_on_disk(cache, ckpt)  # raises ItemStoreError / CacheError if corrupt
    print(f"\nkilled at {trigger}+{delay}s (landed: {landed}); on disk: {on_disk}")
    again = _start(tmp_path, ckpt, items, cache, "restarted").wait_serving(START_S)
    try:
        assert corpus_post_ids(again.address) == set(range(1, BIG + 1))
        assert "embeddings cache is unusable" not in again.log()  # a crash never leaves a corrupt cache
        assert not _tmp_files(cache), _tmp_files(cache)  # nothing left behind by the killed write
    finally:
        again.stop()
    _check_cache_on_disk(cache, ckpt)


@pytest.fixture(scope="module")
def big_items(tmp_path_factory) -> Path:
    return write_items(tmp_path_factory.mktemp("items") / "big.jsonl", range(1, BIG + 1), authors=7)


@pytest.mark.parametrize("point", list(INITIAL_POINTS))
def test_kill_during_initial_encode_and_cache_write_recovers(tmp_path, tiny_checkpoint, big_items, point):
    _initial_build_case(tmp_path, tiny_checkpoint, big_items, *INITIAL_POINTS[point])


@pytest.mark.slow
@pytest.mark.parametrize("point", list(SLOW_POINTS))
def test_kill_sweep_during_initial_encode_and_cache_write(tmp_path, tiny_checkpoint, big_items, point):
    _initial_build_case(tmp_path, tiny_checkpoint, big_items, *SLOW_POINTS[point])


def _upsert_stream(address: str, first_id: int, acked: list[int], attempted: list[int], stop) -> None:
    with grpc.insecure_channel(address) as ch:
        stub = candidate_tower_pb2_grpc.CandidateTowerStub(ch)
        post = first_id
        while not stop.is_set():
            items = [common_pb2.Item(post_id=post, author_id=3, attributes={"v": str(post)})]
            attempted.append(post)
            try:
                stub.UpsertItems(candidate_tower_pb2.UpsertItemsRequest(items=items), timeout=5)
            except grpc.RpcError:
                return  # the server died under this call: not acknowledged
            acked.append(post)
            post += 1


@pytest.mark.parametrize("kill_at", ["after 15 acks", "among cache refreshes", "after 40 acks"])
def test_kill_during_a_stream_of_upserts_loses_no_acknowledged_upsert(tmp_path, tiny_checkpoint, kill_at):
    items = write_items(tmp_path / "items.jsonl", range(1, 3001))
    cache = tmp_path / "cache"
    # A cache refresh every 8 changes rewrites the cache file often, so kills may land in and around it.
    flags = ("--cache-refresh-after-changes", "8")
    proc = _start(tmp_path, tiny_checkpoint, items, cache, "writer", *flags).wait_serving(START_S)
    acked: list[int] = []
    attempted: list[int] = []
    stop = threading.Event()
    writer = threading.Thread(target=_upsert_stream, args=(proc.address, 100_001, acked, attempted, stop))
    writer.start()
    try:
        if kill_at == "among cache refreshes":  # after 15 acks, in a refresh if one is seen, else at 400
            wait_until(lambda: len(acked) >= 15, "15 acks", 60)
            wait_until(lambda: bool(_tmp_files(cache)) or len(acked) > 400, "a refresh or 400 acks", 60)
            refreshing = bool(_tmp_files(cache))
            kill_at = f"{kill_at} ({'a refresh in progress' if refreshing else 'none seen in progress'})"
        else:
            wait_until(lambda: len(acked) >= int(kill_at.split()[1]), kill_at, 60)
        proc.kill()
    finally:
        stop.set()
        writer.join(10)
    _check_cache_on_disk(cache, tiny_checkpoint)
    port = ["--port", str(proc.port)]
    again = _start(tmp_path, tiny_checkpoint, items, cache, "reader", *flags, *port).wait_serving(START_S)
    try:
        ids = corpus_post_ids(again.address)
        print(f"\nkill {kill_at}: {len(acked)} acked, {len(attempted)} attempted, {len(ids) - 3000} present")
        assert len(acked) >= 15
        assert set(acked) <= ids  # no acknowledged upsert lost
        assert ids <= set(range(1, 3001)) | set(attempted)  # nothing invented
        assert len(ids) - 3000 in (len(acked), len(acked) + 1)  # at most the one in flight, if durable
        assert "embeddings cache is unusable" not in again.log()
    finally:
        again.stop()
        proc.stop()
    assert np.all(np.diff(sorted(acked)) == 1)
