"""Loading and rebuilding the corpus (no grpc): the item store is the record, embeddings are derived.

At start: open the item store (a corrupt or unreadable one stops the service: ItemStoreError), load
the model it records as active (active_model.py), import the items file into the store when it is
new (or when asked: --import-items), load every item, then take
each embedding from the model's cache file when its (post id, author id) is there and encode the
rest: a missing, stale or corrupt cache costs encoding time, never an item. While serving, the cache
is rewritten in the background once enough changes are not in it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from candidate_service import metrics
from candidate_service.config import CandidateConfig
from candidate_service.embedding_cache import (
    CachedEmbeddings,
    CacheError,
    cache_file,
    read_cache,
    remove_stale_temp_files,
    reusable_rows,
    write_cache,
)
from candidate_service.encoder import ItemEncoder
from candidate_service.item_store import Items, ItemStore, ItemStoreError, SqliteItemStore
from candidate_service.items_file import ItemsFileError, file_digest, read_items
from candidate_service.store import CorpusStore, Snapshot
from shared.errors import ServiceError

logger = logging.getLogger(__name__)

StoreOpener = Callable[[Path], ItemStore]


def open_item_store(config: CandidateConfig, opener: StoreOpener = SqliteItemStore.open) -> ItemStore:
    """Open the store of record (ItemStoreError when it cannot be read: the service does not start)."""
    warn_about_old_cache_layout(config.cache_dir)
    return opener(config.item_store_path)


def bring_in_items(store: ItemStore, config: CandidateConfig) -> None:
    """Import the items file into the store when that is what the config asks, else say what it is."""
    if store.fresh:
        if config.items is None:
            raise ItemsFileError(
                f"the item store {store.location} is new and no items file was given to import: "
                "pass --items FILE (an empty file for an empty corpus)"
            )
        import_items(store, config.items)
    elif config.import_items:
        assert config.items is not None  # the config checks it
        import_items(store, config.items)
    elif config.items is not None:
        describe_items_file(store, config.items)


def import_items(store: ItemStore, path: Path) -> None:
    """Upsert the file's new and changed items into the store as one change (all or nothing). Items of
    the store that are not in the file are kept: an import adds and updates, it never deletes."""
    items = read_items(path)
    current = Items.empty() if store.fresh else store.load()
    changed = changed_rows(current, items.post_ids, items.author_ids, items.attributes)
    upserts = Items(
        items.post_ids[changed], items.author_ids[changed], [items.attributes[i] for i in changed]
    )
    try:
        store.commit(store.version + 1, upserts, np.zeros(0, np.int64),
                     {"items_digest": items.digest, "items_file": str(path)})  # fmt: skip
    except ServiceError as exc:  # disk full at start: the service cannot start, and says why
        raise ItemStoreError(f"importing {path} into the item store failed: {exc}") from exc
    known = int(np.isin(items.post_ids[changed], current.post_ids).sum()) if len(current) else 0
    logger.info(
        "imported %s into the item store %s (version %d): %d new items, %d changed, %d unchanged; "
        "items not in the file are kept",
        path, store.location, store.version, len(changed) - known, known, len(items) - len(changed),
    )  # fmt: skip


def describe_items_file(store: ItemStore, path: Path) -> None:
    """Say what the items file is to an existing store: never applied silently."""
    if not path.is_file():
        logger.warning("items file %s not found; not needed: the item store %s is the corpus of record",
                       path, store.location)  # fmt: skip
        return
    if file_digest(path) == store.meta("items_digest"):
        logger.info("items file %s was imported already; the item store %s is the corpus of record",
                    path, store.location)  # fmt: skip
        return
    logger.warning(
        "items file %s differs from the one last imported into the item store %s (%s). The store is the "
        "corpus of record and keeps every acknowledged upsert and delete: the file is NOT applied. To "
        "upsert its new and changed items into the store, restart once with --import-items (items that "
        "are not in the file are kept).",
        path, store.location, store.meta("items_file") or "none",
    )  # fmt: skip


def changed_rows(
    current: Items, post_ids: np.ndarray, author_ids: np.ndarray, attributes: list
) -> np.ndarray:
    """Indices of the given rows that are new to `current` (sorted by post id) or differ from it."""
    n = len(post_ids)
    if len(current) == 0:
        return np.arange(n)
    pos = np.minimum(np.searchsorted(current.post_ids, post_ids), len(current) - 1)
    same = (current.post_ids[pos] == post_ids) & (current.author_ids[pos] == author_ids)
    for i in np.flatnonzero(same).tolist():
        if (current.attributes[pos[i]] or None) != (attributes[i] or None):
            same[i] = False
    return np.flatnonzero(~same)


@dataclass
class DerivedEmbeddings:
    embeddings: np.ndarray  # [n, D] float32, row i for the i-th (post id, author id) asked for
    from_cache: int  # rows taken from the model's cache file
    cache_current: bool  # the cache file holds exactly these rows at the version asked for


def derive_embeddings(
    post_ids: np.ndarray,
    author_ids: np.ndarray,
    version: int,
    encoder: ItemEncoder,
    cache_dir: Path,
    stop: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
    source: str = "the item store",
) -> DerivedEmbeddings:
    """The model's embedding of each item: from its cache file where (post id, author id) is there,
    encoded otherwise (a missing, stale or corrupt cache costs encoding time, never an item).
    `progress(done)` counts cached rows as done at once, then encoded rows as they come."""
    fingerprint = encoder.fingerprint
    path = cache_file(cache_dir, fingerprint)
    cached, why = None, "no embeddings cache for this model yet"
    try:
        cached = read_cache(path, fingerprint, encoder.dim)
        why = f"the cache is at version {cached.version}"
    except FileNotFoundError:
        pass
    except CacheError as exc:
        logger.warning("the embeddings cache is unusable (%s): rebuilding it from %s "
                       "(no item is lost: the store is the record)", exc, source)  # fmt: skip
        why = "the cache was unusable"
    n = len(post_ids)
    rows = np.full(n, -1, np.int64)
    if cached is not None:
        rows = reusable_rows(cached, post_ids, author_ids)
    missing = np.flatnonzero(rows < 0)
    current = cached is not None and cached.version == version and len(cached) == n and not missing.size
    if cached is not None and np.array_equal(rows, np.arange(n)):
        embeddings = cached.embeddings  # [n, D], already in this order: no copy
    else:
        embeddings = np.empty((n, encoder.dim), dtype=np.float32)  # [n, D]
        if cached is not None:
            hit = rows >= 0
            embeddings[hit] = cached.embeddings[rows[hit]]
    del cached  # the cache file's copy: freed before the caller copies the rows
    hits = n - missing.size
    if progress is not None:
        progress(hits)
    if missing.size:
        logger.info("encoding %d of %d items with model %s (%s, corpus version %d)",
                    missing.size, n, fingerprint, why, version)  # fmt: skip
        embeddings[missing] = encoder.encode(
            post_ids[missing], author_ids[missing], label=f"corpus ({fingerprint})", stop=stop,
            progress=None if progress is None else (lambda done: progress(hits + done)),
        )  # fmt: skip
    return DerivedEmbeddings(embeddings, hits, current)


def build_corpus(
    store: ItemStore, encoder: ItemEncoder, cache_dir: Path, stop: threading.Event | None = None
) -> tuple[CorpusStore, int]:
    """The in-memory corpus at the store's version, and the version the cache file holds afterwards."""
    items = store.load()
    version, fingerprint = store.version, encoder.fingerprint
    # start-up only: later (a rollout) a cache writer may be filling a temp file in that folder
    remove_stale_temp_files(cache_file(cache_dir, fingerprint).parent)
    derived = derive_embeddings(
        items.post_ids, items.author_ids, version, encoder, cache_dir, stop,
        source=f"the item store {store.location}",
    )  # fmt: skip
    corpus = CorpusStore.from_rows(
        fingerprint, version, items.post_ids, items.author_ids, derived.embeddings, items.attributes
    )
    cache_version = version
    if not derived.cache_current:
        fresh = CachedEmbeddings(version, items.post_ids, items.author_ids, derived.embeddings)
        if not save_cache(cache_file(cache_dir, fingerprint), fingerprint, fresh):
            cache_version = -1
    logger.info(
        "corpus of %d items at version %d from the item store %s; embeddings of model %s: %d from the "
        "cache, %d encoded", len(items), version, store.location, fingerprint,
        derived.from_cache, len(items) - derived.from_cache,
    )  # fmt: skip
    return corpus, cache_version


def save_cache(path: Path, fingerprint: str, cached: CachedEmbeddings) -> bool:
    """Write the cache; a failure (disk full) is only a warning: the cache is an optimisation."""
    try:
        write_cache(path, fingerprint, cached)
    except OSError as exc:
        logger.warning("could not write the embeddings cache %s (%s); the next start encodes more", path, exc)
        return False
    logger.info("embeddings cache %s written at version %d", path, cached.version)
    return True


class CacheRefresher:
    """Rewrites the embeddings cache in the background once `after` changes are not in it, so a restart
    encodes few items. Event loop only; one write at a time; writers never wait for it."""

    def __init__(self, path: Path, fingerprint: str, cache_version: int, after: int) -> None:
        self.path, self.fingerprint, self.after = path, fingerprint, after
        self.cache_version = cache_version  # -1: no usable file (rewritten at the next change)
        self._task: asyncio.Task | None = None
        self._not_before = 0  # after a failed write, wait for `after` more changes before the next try

    @classmethod
    def for_model(cls, cache_dir: Path, fingerprint: str, cache_version: int, after: int) -> CacheRefresher:
        return cls(cache_file(cache_dir, fingerprint), fingerprint, cache_version, after)

    def observe(self, corpus: CorpusStore) -> None:
        """Called after each committed change: starts a rewrite when the cache is far enough behind."""
        behind = corpus.version - self.cache_version if self.cache_version >= 0 else -1
        metrics.CHANGES_SINCE_CACHE.set(behind)
        due = behind < 0 or behind >= self.after
        if due and self._task is None and corpus.version >= self._not_before:
            self._task = asyncio.ensure_future(self._refresh(corpus))

    async def _refresh(self, corpus: CorpusStore) -> None:
        try:
            snap: Snapshot = await asyncio.to_thread(corpus.snapshot)  # consistent: taken under its lock
            cached = CachedEmbeddings(snap.version, snap.post_ids, snap.author_ids, snap.embeddings)
            if await asyncio.to_thread(save_cache, self.path, self.fingerprint, cached):
                self.cache_version = snap.version
                metrics.CHANGES_SINCE_CACHE.set(corpus.version - snap.version)
            else:
                self._not_before = snap.version + self.after
        except Exception:
            logger.exception("refreshing the embeddings cache failed; it is retried after the next change")
        finally:
            self._task = None

    @property
    def busy(self) -> bool:
        return self._task is not None

    async def wait(self) -> None:
        """Shutdown: let a write in progress finish (it runs in a thread and cannot be cancelled)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def warn_about_old_cache_layout(cache_dir: Path) -> None:
    """Directories of the former layout (<fingerprint>-<items digest>/ with a snapshot and a delta log)
    are no longer read; say so once, since their delta logs may hold changes made before the upgrade."""
    root = Path(cache_dir)
    old = sorted(d for d in root.glob("*-*") if d.is_dir() and (d / "snapshot.safetensors").exists())
    if old:
        logger.warning(
            "%s holds %d corpus cache(s) of the former layout (%s): they are not read; the item store "
            "is the corpus of record. Delete them once they are no longer needed.",
            root, len(old), ", ".join(d.name for d in old),
        )  # fmt: skip
