"""The candidate service's core (no grpc): the model, the corpus and the three parts around it.

- loading.py: open the item store (the corpus of record), import the items file, derive embeddings
  from the model's cache file or the encoder, keep that cache fresh;
- writes.py: upserts and deletes, committed to the item store before they are applied and announced;
- watch.py: WatchCorpus streams (snapshot, then deltas), bounded in number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import numpy as np

from candidate_service import metrics
from candidate_service.config import CandidateConfig
from candidate_service.encoder import ItemEncoder
from candidate_service.item_store import ItemStore, SqliteItemStore
from candidate_service.loading import CacheRefresher, StoreOpener, build_corpus, open_item_store
from candidate_service.store import Attrs, CorpusStore, Delta
from candidate_service.watch import SnapshotPart, WatchHub, WatchLimits
from candidate_service.writes import CorpusWriter, DeleteResult, UpsertResult
from shared.errors import NotReady
from shared.model.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusInfo:
    num_items: int
    dim: int
    version: int
    fingerprint: str


@dataclass(frozen=True)
class _Serving:
    """Everything that exists once the corpus is loaded (set at once, so readers see all or nothing)."""

    items: ItemStore
    corpus: CorpusStore
    hub: WatchHub
    writer: CorpusWriter
    cache: CacheRefresher


class CandidateCore:
    def __init__(self, config: CandidateConfig, open_store: StoreOpener = SqliteItemStore.open) -> None:
        """`open_store` opens the item store at a path (a test passes a fault-injecting one)."""
        self.config = config
        self.encoder: ItemEncoder | None = None
        self._open_store = open_store
        self._serving: _Serving | None = None
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
        """Open the item store, then build the corpus from it (embeddings from the cache or encoded)."""
        encoder = self._require_encoder()
        items = open_item_store(self.config, self._open_store)
        try:
            corpus, cache_version = build_corpus(items, encoder, self.config.cache_dir, self._stopping)
        except BaseException:
            items.close()
            raise
        limits = WatchLimits(
            max_watchers=self.config.max_watchers,
            max_queued=self.config.watcher_queue_size,
            max_resyncs=self.config.max_watcher_resyncs,
            chunk_bytes=self.config.snapshot_chunk_bytes,
        )
        hub = WatchHub(corpus.version, self.config.delta_ring_size, limits)
        cache = CacheRefresher.for_model(
            self.config.cache_dir, encoder.fingerprint, cache_version, self.config.cache_refresh_after_changes
        )
        writer = CorpusWriter(self.config, encoder, corpus, items, hub, self._after_commit)
        self._serving = _Serving(items, corpus, hub, writer, cache)
        self._update_gauges()

    # -- state -------------------------------------------------------------------------------------

    @property
    def model_ready(self) -> bool:
        return self.encoder is not None

    @property
    def ready(self) -> bool:
        return self._serving is not None

    @property
    def corpus(self) -> CorpusStore:
        return self._require_serving().corpus

    @property
    def hub(self) -> WatchHub:
        return self._require_serving().hub

    @property
    def item_store(self) -> ItemStore:
        return self._require_serving().items

    def _require_encoder(self) -> ItemEncoder:
        if self.encoder is None:
            raise NotReady("the model is still loading")
        return self.encoder

    def _require_serving(self) -> _Serving:
        if self._serving is None:
            raise NotReady("the corpus is still loading")
        return self._serving

    def info(self) -> CorpusInfo:
        corpus = self._require_serving().corpus
        return CorpusInfo(corpus.num_items, corpus.dim, corpus.version, corpus.fingerprint)

    def _after_commit(self) -> None:
        self._update_gauges()
        serving = self._require_serving()
        serving.cache.observe(serving.corpus)

    def _update_gauges(self) -> None:
        if self._serving is not None:
            metrics.ITEMS.set(self._serving.corpus.num_items)
            metrics.VERSION.set(self._serving.corpus.version)

    # -- RPC operations ----------------------------------------------------------------------------

    async def encode(self, post_ids: np.ndarray, author_ids: np.ndarray) -> np.ndarray:
        encoder = self._require_encoder()
        return await asyncio.to_thread(encoder.encode, post_ids, author_ids)  # [N, D]

    async def upsert(
        self, post_ids: np.ndarray, author_ids: np.ndarray, attributes: list[Attrs]
    ) -> UpsertResult:
        return await self._require_serving().writer.upsert(post_ids, author_ids, attributes)

    async def delete(self, post_ids: np.ndarray) -> DeleteResult:
        return await self._require_serving().writer.delete(post_ids)

    @contextlib.contextmanager
    def watch(
        self, known_version: int, known_fingerprint: str
    ) -> Iterator[AsyncIterator[SnapshotPart | Delta]]:
        """The watcher is registered on entry (NotReady, or Overloaded past --max-watchers) and
        unregistered on exit; the events are a snapshot unless it can continue, then every delta."""
        serving = self._require_serving()
        with serving.hub.watch(serving.corpus, known_version, known_fingerprint) as events:
            yield events

    # -- shutdown ----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Shutdown: end watch streams and abandon a corpus build still in progress."""
        self._stopping.set()
        if self._serving is not None:
            self._serving.hub.close()

    async def aclose(self) -> None:
        """Close the item store once a change in progress and a cache write have finished."""
        serving, self._serving = self._serving, None
        if serving is None:
            return
        await serving.writer.close()
        await serving.cache.wait()
        serving.items.close()
