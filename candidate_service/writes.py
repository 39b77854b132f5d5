"""The write path (no grpc): validate, encode, commit to the item store, then apply and announce.

Order of a change: the delta is built from the in-memory corpus (version + 1), committed to the item
store in one transaction (durable when it returns), and only then applied in memory and published to
watchers, then acknowledged. A failed commit (disk full, I/O error) raises before anything in memory
changes, so the version is neither skipped nor reused for published content, and the service goes on
serving reads and taking later writes. One asyncio lock keeps versions consecutive; the blocking work
under it runs in a worker thread. A model rollout takes the same lock for its switch (`held`), and then
hands the writer the new model's encoder and corpus (`switch_model`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from candidate_service import metrics
from candidate_service.config import CandidateConfig
from candidate_service.encoder import ItemEncoder
from candidate_service.item_store import Items, ItemStore
from candidate_service.store import Attrs, CorpusStore, Delta
from candidate_service.watch import WatchHub
from shared.convert import check_unique_ids
from shared.errors import InvalidInput, NotReady, ServiceError, StorageUnavailable

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


class CorpusWriter:
    def __init__(
        self,
        config: CandidateConfig,
        encoder: ItemEncoder,
        corpus: CorpusStore,
        items: ItemStore,
        hub: WatchHub,
        on_commit: Callable[[Delta], None],
    ) -> None:
        self.config = config
        self.encoder = encoder
        self.corpus = corpus
        self.items = items
        self.hub = hub
        self._on_commit = on_commit  # gauges, cache refresh, a rollout's record of changes
        self._lock = asyncio.Lock()
        self._closed = False

    async def upsert(
        self, post_ids: np.ndarray, author_ids: np.ndarray, attributes: list[Attrs]
    ) -> UpsertResult:
        # Encoded outside the lock (concurrent upserts encode in parallel); the encoder checks the ids.
        encoder = self.encoder
        embeddings = await asyncio.to_thread(encoder.encode, post_ids, author_ids)  # [N, D]
        # Shielded: once started, a change is committed and published even if the caller goes away.
        return await asyncio.shield(
            asyncio.ensure_future(self._upsert(post_ids, author_ids, encoder, embeddings, attributes))
        )

    async def _upsert(self, post_ids, author_ids, encoder, embeddings, attributes) -> UpsertResult:
        async with self._lock:
            self._check_open()
            if encoder is not self.encoder:  # a rollout switched models meanwhile: never mix them
                embeddings = await asyncio.to_thread(self.encoder.encode, post_ids, author_ids)
            # In a thread: the corpus lock may be held by a snapshot copy (a new watcher, a rollout).
            delta, inserted = await asyncio.to_thread(
                self.corpus.upsert_delta, post_ids, author_ids, embeddings, attributes
            )
            if delta.nbytes > self.config.max_delta_bytes:
                raise InvalidInput(
                    f"upsert of {delta.nbytes} bytes (embeddings + attributes) exceeds the limit of "
                    f"{self.config.max_delta_bytes}: send fewer items per call"
                )
            await self._commit(delta)
        return UpsertResult(delta.version, inserted, len(post_ids) - inserted)

    async def delete(self, post_ids: np.ndarray) -> DeleteResult:
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
        async with self._lock:
            self._check_open()
            delta, unknown = await asyncio.to_thread(self.corpus.delete_delta, post_ids)
            if delta is None:
                return DeleteResult(self.corpus.version, 0, unknown)
            await self._commit(delta)
        return DeleteResult(delta.version, len(delta.deleted_post_ids), unknown)

    async def _commit(self, delta: Delta) -> None:
        """Durable, then visible, then announced (lock held)."""
        upserts = Items(delta.upsert_post_ids, delta.upsert_author_ids, delta.upsert_attributes)

        def commit_then_apply() -> None:
            if self.items.version != self.corpus.version:  # only after a failed apply (out of memory)
                raise StorageUnavailable(
                    f"the corpus in memory (version {self.corpus.version}) is behind the item store "
                    f"(version {self.items.version}); restart candidate_service to reload it"
                )
            try:
                self.items.commit(delta.version, upserts, delta.deleted_post_ids)
            except ServiceError as exc:
                metrics.STORE_WRITE_FAILURES.labels(type(exc).__name__).inc()
                logger.warning("write to version %d refused: %s", delta.version, exc)
                raise
            # From here on the change survives a crash; memory follows the store.
            self.corpus.apply(delta)

        await asyncio.to_thread(commit_then_apply)
        self.hub.publish(delta)
        self._on_commit(delta)

    def _check_open(self) -> None:
        if self._closed:
            raise NotReady("candidate_service is shutting down")

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """No change commits while inside (a rollout's switch); NotReady once shutting down. Every
        change committed before entry has been applied, published and passed to `on_commit`."""
        async with self._lock:
            self._check_open()
            yield

    def switch_model(self, encoder: ItemEncoder, corpus: CorpusStore) -> None:
        """From now on changes are encoded with `encoder` and applied to `corpus` (inside `held`)."""
        assert self._lock.locked(), "switch_model outside held()"
        self.encoder, self.corpus = encoder, corpus

    async def close(self) -> None:
        """Shutdown: changes in progress finish (commit and apply); later ones are refused."""
        async with self._lock:
            self._closed = True
