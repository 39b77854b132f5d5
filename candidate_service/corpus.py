"""The candidate service's core (no grpc): load or build the corpus, encode, upsert, delete, watch.

Every change is made durable (delta log, fsync) before it is applied, published and acknowledged;
one asyncio lock serialises changes so versions are consecutive, and the work under it runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from candidate_service import metrics
from candidate_service.config import CandidateConfig
from candidate_service.encoder import ItemEncoder
from candidate_service.items_file import read_items
from candidate_service.persistence import (
    LOG_FILE,
    SNAPSHOT_FILE,
    CacheError,
    DeltaLog,
    cache_dir_for,
    read_log,
    read_snapshot,
    remove_stale_temp_files,
    write_snapshot,
)
from candidate_service.store import Attrs, CorpusStore, Delta, Snapshot
from candidate_service.watch import WatchHub
from shared.convert import check_unique_ids
from shared.errors import InvalidInput, NotReady, Overloaded
from shared.model.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpsertResult:
    version: int
    inserted: int
    updated: int


@dataclass(frozen=True)
class DeleteResult:
    version: int
    deleted: int
    unknown_post_ids: list[int]


@dataclass(frozen=True)
class CorpusInfo:
    num_items: int
    dim: int
    version: int
    fingerprint: str


@dataclass(frozen=True)
class SnapshotPart:
    """Rows [lo, hi) of `snapshot`, chunk `index` of `num_chunks`."""

    snapshot: Snapshot
    index: int
    num_chunks: int
    lo: int
    hi: int


def initial_version() -> int:
    """A freshly built corpus starts at the current time in microseconds, not at 1: a rebuilt corpus
    (new cache) must never reuse a version number a watcher may already hold for different content."""
    return time.time_ns() // 1000


class CandidateCore:
    def __init__(self, config: CandidateConfig) -> None:
        self.config = config
        self.encoder: ItemEncoder | None = None
        self.store: CorpusStore | None = None
        self.hub: WatchHub | None = None
        self._log: DeltaLog | None = None
        self._dir: Path | None = None
        self._items_digest = ""
        self._write_lock = asyncio.Lock()
        self._compaction: asyncio.Task | None = None
        self._stopping = threading.Event()

    # -- start-up (blocking; run in a thread so health can be probed meanwhile) ----------------------

    def load_model(self) -> None:
        loaded = load_checkpoint(self.config.checkpoint)
        self.encoder = ItemEncoder(loaded, self.config.encode_batch_size, on_encoded=metrics.observe_encode)
        logger.info(
            "model %s loaded from %s (D=%d)",
            loaded.fingerprint,
            self.config.checkpoint,
            loaded.config.emb_dim,
        )

    def load_corpus(self) -> None:
        """Load the cache for (model, items file) and replay its delta log, or encode the items file."""
        encoder = self._require_encoder()
        items = read_items(self.config.items)
        self._items_digest = items.digest
        self._dir = cache_dir_for(self.config.cache_dir, encoder.fingerprint, items.digest)
        remove_stale_temp_files(self._dir)
        replayed: list[Delta] = []
        log_records, log_end = 0, 0
        try:
            store, replayed, log_records, log_end = self._load_cache(encoder)
            logger.info(
                "corpus loaded from cache %s: %d items, version %d (%d deltas replayed)",
                self._dir, store.num_items, store.version, len(replayed),
            )  # fmt: skip
        except FileNotFoundError:
            store = self._build(items)
        except CacheError as exc:
            aside = self._dir.with_name(f"{self._dir.name}.corrupt-{time.time_ns()}")
            self._dir.rename(aside)
            logger.warning("discarding the corpus cache (%s); moved it to %s and re-encoding", exc, aside)
            store = self._build(items)
        self._log = DeltaLog(self._dir / LOG_FILE, log_end)
        self._log.records = log_records
        self.hub = WatchHub(
            store.version - len(replayed), self.config.delta_ring_size, self.config.watcher_queue_size
        )
        self.hub.seed(replayed)
        self.store = store
        if self._log.records >= self.config.compact_after_deltas:
            self._compact_now()
        self._update_gauges()

    def _load_cache(self, encoder: ItemEncoder) -> tuple[CorpusStore, list[Delta], int, int]:
        assert self._dir is not None
        if not (self._dir / SNAPSHOT_FILE).exists():
            if (self._dir / LOG_FILE).exists() and (self._dir / LOG_FILE).stat().st_size:
                raise CacheError(f"{self._dir}: a delta log without its snapshot")
            raise FileNotFoundError(self._dir / SNAPSHOT_FILE)
        snap = read_snapshot(self._dir, encoder.fingerprint, self._items_digest, encoder.dim)
        try:
            store = CorpusStore.from_rows(
                snap.fingerprint,
                snap.version,
                snap.post_ids,
                snap.author_ids,
                snap.embeddings,
                snap.attributes,
            )
        except ValueError as exc:
            raise CacheError(f"{self._dir / SNAPSHOT_FILE}: {exc}") from exc
        deltas, log_end = read_log(self._dir / LOG_FILE)
        replayed = [d for d in deltas if d.version > snap.version]  # older ones predate a compaction
        for delta in replayed:
            try:
                store.apply(delta)
            except ValueError as exc:  # a gap or a foreign fingerprint: the log does not fit the snapshot
                raise CacheError(f"{self._dir / LOG_FILE}: {exc}") from exc
        return store, replayed, len(deltas), log_end

    def _build(self, items) -> CorpusStore:
        encoder = self._require_encoder()
        assert self._dir is not None
        logger.info("encoding %d items from %s (batch %d)", len(items), self.config.items, encoder.batch_size)
        embeddings = encoder.encode(items.post_ids, items.author_ids, label="corpus", stop=self._stopping)
        store = CorpusStore.from_rows(
            encoder.fingerprint,
            initial_version(),
            items.post_ids,
            items.author_ids,
            embeddings,
            items.attributes,
        )
        self._dir.mkdir(parents=True, exist_ok=True)
        (self._dir / LOG_FILE).unlink(missing_ok=True)  # a stale log must never replay onto a new snapshot
        write_snapshot(self._dir, store.snapshot(), self._items_digest)
        logger.info("corpus cached in %s (version %d)", self._dir, store.version)
        return store

    def _compact_now(self) -> None:
        assert self.store is not None and self._log is not None and self._dir is not None
        write_snapshot(self._dir, self.store.snapshot(), self._items_digest)
        self._log.keep_from(self._log.size, 0)
        logger.info("delta log folded into a new snapshot at version %d", self.store.version)

    # -- state -------------------------------------------------------------------------------------

    @property
    def model_ready(self) -> bool:
        return self.encoder is not None

    @property
    def ready(self) -> bool:
        return self.store is not None

    def _require_encoder(self) -> ItemEncoder:
        if self.encoder is None:
            raise NotReady("the model is still loading")
        return self.encoder

    def _require_store(self) -> tuple[CorpusStore, WatchHub, DeltaLog]:
        if self.store is None or self.hub is None or self._log is None:
            raise NotReady("the corpus is still loading")
        return self.store, self.hub, self._log

    def info(self) -> CorpusInfo:
        store, _, _ = self._require_store()
        return CorpusInfo(store.num_items, store.dim, store.version, store.fingerprint)

    def _update_gauges(self) -> None:
        if self.store is not None and self._log is not None:
            metrics.ITEMS.set(self.store.num_items)
            metrics.VERSION.set(self.store.version)
            metrics.DELTA_LOG_RECORDS.set(self._log.records)

    # -- RPC operations ----------------------------------------------------------------------------

    async def encode(self, post_ids: np.ndarray, author_ids: np.ndarray) -> np.ndarray:
        encoder = self._require_encoder()
        return await asyncio.to_thread(encoder.encode, post_ids, author_ids)  # [N, D]

    async def upsert(
        self, post_ids: np.ndarray, author_ids: np.ndarray, attributes: list[Attrs]
    ) -> UpsertResult:
        self._require_store()
        embeddings = await self.encode(post_ids, author_ids)  # outside the lock: encodes run concurrently
        # Shielded: once started, a change is committed and published even if the caller goes away.
        return await asyncio.shield(
            asyncio.ensure_future(self._upsert(post_ids, author_ids, embeddings, attributes))
        )

    async def _upsert(self, post_ids, author_ids, embeddings, attributes) -> UpsertResult:
        store, _, _ = self._require_store()
        async with self._write_lock:
            delta, inserted = store.upsert_delta(post_ids, author_ids, embeddings, attributes)
            if delta.nbytes > self.config.max_delta_bytes:
                raise InvalidInput(
                    f"upsert of {delta.nbytes} bytes (embeddings + attributes) exceeds the limit of "
                    f"{self.config.max_delta_bytes}: send fewer items per call"
                )
            await self._commit(delta)
        return UpsertResult(delta.version, inserted, len(post_ids) - inserted)

    async def delete(self, post_ids: np.ndarray) -> DeleteResult:
        self._require_store()
        n = len(post_ids)
        if n == 0:
            raise InvalidInput("no post ids given")
        if n > self.config.max_batch_items:
            raise InvalidInput(f"{n} post ids in one request; the limit is {self.config.max_batch_items}")
        bad = np.flatnonzero(post_ids <= 0)
        if bad.size:
            raise InvalidInput(f"post_ids[{int(bad[0])}] must be > 0, got {int(post_ids[bad[0]])}")
        check_unique_ids(post_ids, "post_ids")
        return await asyncio.shield(asyncio.ensure_future(self._delete(post_ids)))

    async def _delete(self, post_ids: np.ndarray) -> DeleteResult:
        store, _, _ = self._require_store()
        async with self._write_lock:
            delta, unknown = store.delete_delta(post_ids)
            if delta is None:
                return DeleteResult(store.version, 0, unknown)
            await self._commit(delta)
        return DeleteResult(delta.version, len(delta.deleted_post_ids), unknown)

    async def _commit(self, delta: Delta) -> None:
        """Durable, then visible, then announced (write lock held)."""
        store, hub, log = self._require_store()

        def write_and_apply() -> None:
            log.append(delta)  # fsynced: from here on the change survives a crash
            store.apply(delta)

        await asyncio.to_thread(write_and_apply)
        hub.publish(delta)
        self._update_gauges()
        if log.records >= self.config.compact_after_deltas and self._compaction is None:
            self._compaction = asyncio.ensure_future(self._compact())

    async def _compact(self) -> None:
        """Fold the log into a new snapshot without blocking writers while the snapshot is written."""
        store, _, log = self._require_store()
        assert self._dir is not None
        try:
            async with self._write_lock:
                snap = await asyncio.to_thread(store.snapshot)
                offset, records = log.size, log.records
            await asyncio.to_thread(write_snapshot, self._dir, snap, self._items_digest)
            async with self._write_lock:  # records appended meanwhile are kept
                await asyncio.to_thread(log.keep_from, offset, log.records - records)
            logger.info("delta log folded into a new snapshot at version %d", snap.version)
            self._update_gauges()
        except Exception:
            logger.exception("compaction failed; the delta log keeps growing and will be retried")
        finally:
            self._compaction = None

    async def watch(self, known_version: int, known_fingerprint: str) -> AsyncIterator[SnapshotPart | Delta]:
        """A snapshot (unless the watcher can continue with deltas), then every delta, until cancelled."""
        store, hub, _ = self._require_store()
        watcher = hub.register()  # before deciding, so no delta published from now on is missed
        metrics.WATCHERS.set(hub.num_watchers)
        try:
            backlog = hub.deltas_after(known_version) if known_fingerprint == store.fingerprint else None
            if backlog is not None:
                for delta in backlog:
                    yield delta
                sent = backlog[-1].version if backlog else known_version
            else:
                sent = None
            resyncs = 0
            while True:
                if sent is None:  # a fresh snapshot; deltas queued meanwhile follow it
                    if resyncs > self.config.max_watcher_resyncs:
                        raise Overloaded(
                            f"watcher fell behind {resyncs} times in a row; reconnect with known_version"
                        )
                    watcher.reset()
                    snap = await asyncio.to_thread(store.snapshot)
                    async for part in self._snapshot_parts(snap):
                        yield part
                    metrics.SNAPSHOTS_SENT.inc()
                    sent = snap.version
                delta = await watcher.next()
                if watcher.closed:
                    return
                if delta is None:
                    metrics.WATCHER_RESYNCS.inc()
                    resyncs, sent = resyncs + 1, None
                    continue
                if delta.version <= sent:
                    continue  # already in the snapshot
                if delta.version != sent + 1:  # cannot happen by construction; never send a gap
                    logger.error("watcher would skip from version %d to %d; resyncing", sent, delta.version)
                    sent = None
                    continue
                if watcher.pending() == 0:
                    resyncs = 0  # caught up
                yield delta
                sent = delta.version
        finally:
            hub.unregister(watcher)
            metrics.WATCHERS.set(hub.num_watchers)

    async def _snapshot_parts(self, snap: Snapshot) -> AsyncIterator[SnapshotPart]:
        bounds = snap.chunk_bounds(self.config.snapshot_chunk_bytes)
        for index, (lo, hi) in enumerate(bounds):
            yield SnapshotPart(snap, index, len(bounds), lo, hi)

    def request_stop(self) -> None:
        """Shutdown: end watch streams and abandon a corpus build still in progress."""
        self._stopping.set()
        if self.hub is not None:
            self.hub.close()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
