"""candidate_service killed (SIGKILL) while it builds and writes its cache, and while it logs upserts:
the restart recovers, the cache on disk is never corrupt, and no acknowledged upsert is lost.

Kill points are found from the outside, not guessed from timings: the log line that starts encoding,
the temporary snapshot file that exists only while a snapshot is written (initial build or a
compaction), and a count of acknowledged upserts.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from candidate_service.persistence import SNAPSHOT_FILE, read_log, read_snapshot
from shared import codec
from shared.model.checkpoint import load_checkpoint
from tests.reliability.harness import START_S, wait_until, write_items
from tests.support import ServiceProcess
from twotower.v1 import candidate_tower_pb2, candidate_tower_pb2_grpc, common_pb2

pytestmark = pytest.mark.reliability

BIG = 200_000  # items: reading, encoding and writing them takes a moment (~2 s here)
INT64 = (common_pb2.DTYPE_INT64,)


def _tmp_files(cache: Path) -> list[Path]:
    return list(cache.glob("*/.*.tmp")) if cache.exists() else []


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
    """The snapshot, if any, passes every check (checksum, shapes); the log has no corrupt record."""
    loaded = load_checkpoint(ckpt)
    dirs = [d for d in cache.iterdir() if d.is_dir()] if cache.exists() else []
    for d in dirs:
        if (d / SNAPSHOT_FILE).exists():
            digest = d.name.split("-", 1)[1]
            snap = read_snapshot(d, loaded.fingerprint, _full_digest(d, digest), loaded.config.emb_dim)
            read_log(d / "deltas.log")
            return f"snapshot of {len(snap.post_ids)} items"
    return "no snapshot"


def _full_digest(directory: Path, prefix: str) -> str:
    """The snapshot records the full items digest; the directory name only its first 16 chars."""
    from safetensors import safe_open

    with safe_open(str(directory / SNAPSHOT_FILE), framework="np") as f:
        digest = (f.metadata() or {}).get("items_digest", "")
    assert digest.startswith(prefix)
    return digest


def _kill_when(proc: ServiceProcess, ready, what: str, delay: float = 0.0) -> str:
    wait_until(lambda: ready() or proc.proc.poll() is not None, what, START_S)
    time.sleep(delay)
    proc.kill()
    log = proc.log()
    return "after cache written" if "corpus cached" in log else "encoded" if "encoded" in log else "encoding"


INITIAL_POINTS = {
    "reading items": ("model", 0.2),
    "encoding": ("encoding", 0.1),
    "writing snapshot": ("tmp", 0.0),
}
SLOW_POINTS = {f"encoding+{d:.2f}s": ("encoding", d) for d in (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)}


def _initial_build_case(tmp_path: Path, ckpt: Path, items: Path, trigger: str, delay: float) -> None:
    cache = tmp_path / "cache"
    proc = _start(tmp_path, ckpt, items, cache, "killed")
    conditions = {
        "model": lambda: "loaded from" in proc.log(),
        "encoding": lambda: "encoding " in proc.log(),
        "tmp": lambda: bool(_tmp_files(cache)),
    }
    landed = _kill_when(proc, conditions[trigger], trigger, delay)
    on_disk = _check_cache_on_disk(cache, ckpt)  # raises CacheError if corrupt
    print(f"\nkilled at {trigger}+{delay}s (landed: {landed}); on disk: {on_disk}")
    again = _start(tmp_path, ckpt, items, cache, "restarted").wait_serving(START_S)
    try:
        assert corpus_post_ids(again.address) == set(range(1, BIG + 1))
        assert "discarding the corpus cache" not in again.log()  # a crash never leaves a corrupt cache
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


@pytest.mark.parametrize("kill_at", ["after 15 acks", "during compaction", "after 40 acks"])
def test_kill_during_a_stream_of_upserts_loses_no_acknowledged_upsert(tmp_path, tiny_checkpoint, kill_at):
    items = write_items(tmp_path / "items.jsonl", range(1, 3001))
    cache = tmp_path / "cache"
    # Compaction every 8 deltas rewrites the snapshot often, so kills also land in and around it.
    flags = ("--compact-after-deltas", "8")
    proc = _start(tmp_path, tiny_checkpoint, items, cache, "writer", *flags).wait_serving(START_S)
    acked: list[int] = []
    attempted: list[int] = []
    stop = threading.Event()
    writer = threading.Thread(target=_upsert_stream, args=(proc.address, 100_001, acked, attempted, stop))
    writer.start()
    try:
        if kill_at == "during compaction":
            wait_until(lambda: bool(_tmp_files(cache)) or len(acked) > 400, "a compaction", 60)
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
        assert "discarding the corpus cache" not in again.log()
    finally:
        again.stop()
        proc.stop()
    assert np.all(np.diff(sorted(acked)) == 1)
