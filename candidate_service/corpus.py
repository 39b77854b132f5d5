"""The candidate service's core (no grpc): the model, the corpus and the parts around it.

- loading.py: open the item store (the corpus of record), import the items file, derive embeddings
  from the model's cache file or the encoder, keep that cache fresh;
- active_model.py: which model to serve, recorded in the item store (a restart after a rollout comes
  back on the rolled-out model);
- writes.py: upserts and deletes, committed to the item store before they are applied and announced;
- watch.py: WatchCorpus streams (snapshot, then deltas), bounded in number;
- rollout.py: moving the served corpus to another model while this one serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

import numpy as np

from candidate_service import metrics
from candidate_service.active_model import ActiveModel, load_active_model
from candidate_service.config import CandidateConfig
from candidate_service.encoder import ItemEncoder
from candidate_service.item_store import ItemStore, SqliteItemStore
from candidate_service.loading import (
    CacheRefresher,
    StoreOpener,
    bring_in_items,
    build_corpus,
    open_item_store,
)
from candidate_service.rollout import Rollouts, RolloutStatus, ServingModel
from candidate_service.store import Attrs, CorpusStore, Delta
from candidate_service.watch import SnapshotPart, WatchHub, WatchLimits
from candidate_service.writes import CorpusWriter, DeleteResult, UpsertResult
from shared.errors import NotReady
from shared.model.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusSummary:
    """The corpus's size, dim and version (GetCorpusInfo answers with it)."""

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
    active: ActiveModel


class CandidateCore:
    def __init__(self, config: CandidateConfig, open_store: StoreOpener = SqliteItemStore.open) -> None:
        """`open_store` opens the item store at a path (a test passes a fault-injecting one)."""
        self.config = config
        self.encoder: ItemEncoder | None = None
        self._open_store = open_store
        self._items: ItemStore | None = None  # open from load_model on
        self._active: ActiveModel | None = None
        self._serving: _Serving | None = None
        self._retired_caches: list[CacheRefresher] = []  # previous models' cache writes still running
        self._stopping = threading.Event()
        self.rollouts = Rollouts(self, config.cache_dir, self.load_encoder)

    # -- start-up (blocking; run in a thread so health can be probed meanwhile) ----------------------

    def load_encoder(self, checkpoint: str) -> ItemEncoder:
        """Load a checkpoint's candidate tower (blocking; CheckpointError when it does not load)."""
        loaded = load_checkpoint(checkpoint)
        encoder = ItemEncoder(loaded, self.config.encode_batch_size, on_encoded=metrics.observe_encode)
        logger.info("model %s loaded from %s (D=%d)", loaded.fingerprint, checkpoint, loaded.config.emb_dim)
        return encoder

    def load_model(self) -> None:
        """Open the item store, then load the model it records as active (or --checkpoint, recorded)."""
        items = open_item_store(self.config, self._open_store)
        try:
            encoder, active = load_active_model(
                items, self.config.checkpoint, self.load_encoder, lambda e: e.fingerprint
            )
        except BaseException:
            items.close()
            raise
        self._items, self._active, self.encoder = items, active, encoder
        metrics.set_models(encoder.fingerprint)

    def load_corpus(self) -> None:
        """Import the items file if asked, then build the corpus (embeddings from the cache or encoded)."""
        encoder = self._require_encoder()
        items, active = self._items, self._active
        assert items is not None and active is not None  # set with the encoder
        bring_in_items(items, self.config)
        corpus, cache_version = build_corpus(items, encoder, self.config.cache_dir, self._stopping)
        limits = WatchLimits(
            max_watchers=self.config.max_watchers,
            max_queued=self.config.watcher_queue_size,
            max_resyncs=self.config.max_watcher_resyncs,
            chunk_bytes=self.config.snapshot_chunk_bytes,
        )
        hub = WatchHub(corpus, self.config.delta_ring_size, limits)
        cache = CacheRefresher.for_model(
            self.config.cache_dir, encoder.fingerprint, cache_version, self.config.cache_refresh_after_changes
        )
        writer = CorpusWriter(self.config, encoder, corpus, items, hub, self._after_commit)
        self._serving = _Serving(items, corpus, hub, writer, cache, active)
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

    def info(self) -> CorpusSummary:
        corpus = self._require_serving().corpus
        return CorpusSummary(corpus.num_items, corpus.dim, corpus.version, corpus.fingerprint)

    def _after_commit(self, delta: Delta) -> None:
        self._update_gauges()
        serving = self._require_serving()
        serving.cache.observe(serving.corpus)
        self.rollouts.observe(delta)

    # -- model rollout (rollout.py drives it) --------------------------------------------------------

    def serving_model(self) -> ServingModel:
        serving = self._require_serving()
        encoder = self._require_encoder()
        return ServingModel(encoder, serving.corpus, serving.items, serving.writer, serving.active)

    def install_model(self, encoder: ItemEncoder, corpus: CorpusStore, model: ActiveModel) -> None:
        """Serve another model's corpus from now on: writer, encoder, corpus, watch streams and cache at
        once (on the loop, with the write path held; the item store has recorded it already)."""
        serving = self._require_serving()
        serving.writer.switch_model(encoder, corpus)
        cache = CacheRefresher.for_model(
            self.config.cache_dir, encoder.fingerprint, -1, self.config.cache_refresh_after_changes
        )
        self._retired_caches = [c for c in (*self._retired_caches, serving.cache) if c.busy]
        self.encoder = encoder
        self._active = model
        self._serving = replace(serving, corpus=corpus, cache=cache, active=model)
        serving.hub.switch(corpus)
        cache.observe(corpus)  # no cache file of this corpus yet: written now, in the background
        metrics.set_models(encoder.fingerprint)
        self._update_gauges()

    async def start_rollout(self, checkpoint: str) -> RolloutStatus:
        return await self.rollouts.start(checkpoint)

    def rollout_status(self) -> RolloutStatus:
        return self.rollouts.status()

    async def abort_rollout(self) -> RolloutStatus:
        return await self.rollouts.abort()

    def _update_gauges(self) -> None:
        if self._serving is not None:
            metrics.ITEMS.set(self._serving.corpus.num_items)
            metrics.VERSION.set(self._serving.corpus.version)

    # -- RPC operations ----------------------------------------------------------------------------

    async def encode(self, post_ids: np.ndarray, author_ids: np.ndarray) -> tuple[np.ndarray, ItemEncoder]:
        """[N, D] embeddings and the encoder (model) that made them (a rollout may switch meanwhile)."""
        encoder = self._require_encoder()
        return await asyncio.to_thread(encoder.encode, post_ids, author_ids), encoder

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
        with serving.hub.watch(known_version, known_fingerprint) as events:
            yield events

    # -- shutdown ----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Shutdown: end watch streams, abandon a corpus build or a rollout still in progress."""
        self._stopping.set()
        self.rollouts.request_stop()
        if self._serving is not None:
            self._serving.hub.close()

    async def aclose(self) -> None:
        """Close the item store once a rollout, a change in progress and cache writes have finished."""
        self.rollouts.request_stop()
        await self.rollouts.wait()
        serving, self._serving = self._serving, None
        items, self._items = self._items, None
        if serving is not None:
            await serving.writer.close()
            await serving.cache.wait()
        for cache in self._retired_caches:
            await cache.wait()
        if items is not None:
            items.close()
