"""The corpus in memory (no grpc, no disk): the rows (ids, author ids, attributes, id -> row, version,
model fingerprint) kept by shared.corpus_rows.CorpusRows, the same owner and apply order as the
gateway's index, and the float32 embeddings matrix at the same row numbers. Changes are expressed as
Deltas, built then applied, so that the caller can commit a delta to the item store (the record)
before it becomes visible.

Thread-safety: one lock guards the rows and the matrix; `snapshot()` returns an immutable copy of the
live rows (made once per version and shared by every watcher of it), so streaming never holds the
lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.corpus_rows import AttributeColumn, Attrs, CorpusRows, Delta, attribute_bytes
from shared.errors import InvalidInput

logger = logging.getLogger(__name__)

ROW_OVERHEAD_BYTES = 8  # protobuf tags and lengths per row, counted generously when sizing chunks
_EMPTY_ATTR_BYTES = attribute_bytes(None)
_COMPACT_MIN_ROWS = 1024  # below this, free rows are left for later upserts to reuse


@dataclass(frozen=True)
class Snapshot:
    """An immutable copy of the live rows at one version, in row order. Row order is not insertion
    order: an upsert of a new id may take the row of a deleted one."""

    version: int
    fingerprint: str
    post_ids: np.ndarray  # [n] int64
    author_ids: np.ndarray  # [n] int64
    embeddings: np.ndarray  # [n, D] float32
    attributes: list[Attrs]  # [n], None for a row without attributes
    attr_bytes: np.ndarray  # [n] int64, attribute_bytes of each row

    def __len__(self) -> int:
        return len(self.post_ids)

    def chunk_bounds(self, max_bytes: int) -> list[tuple[int, int]]:
        """Row ranges [lo, hi) whose payload stays within `max_bytes` (at least one row each).
        An empty corpus is one empty chunk."""
        n = len(self.post_ids)
        if n == 0:
            return [(0, 0)]
        row_bytes = self.attr_bytes + (16 + self.embeddings.shape[1] * 4 + ROW_OVERHEAD_BYTES)
        ends = np.cumsum(row_bytes)  # ends[i] = bytes of rows [0, i]
        bounds, lo = [], 0
        while lo < n:
            base = int(ends[lo - 1]) if lo else 0
            hi = max(lo + 1, int(np.searchsorted(ends, base + max_bytes, side="right")))
            bounds.append((lo, min(hi, n)))
            lo = hi
        return bounds


def _attr_bytes_of(attributes: Sequence[Attrs]) -> np.ndarray:
    # most rows have no attributes: no call for those (a 1M-item start saves ~1 s)
    return np.fromiter(
        (attribute_bytes(a) if a else _EMPTY_ATTR_BYTES for a in attributes), np.int64, len(attributes)
    )


class CorpusStore:
    def __init__(self, dim: int, fingerprint: str, version: int) -> None:
        self.dim = dim
        self._lock = threading.Lock()
        self._rows = CorpusRows(version, fingerprint, dim)
        # At the rows' row numbers, [capacity >= rows.used]: what the rows do not keep.
        self._embeddings = np.zeros((0, dim), dtype=np.float32)
        self._attr_bytes = np.zeros(0, dtype=np.int64)  # attribute_bytes of each row, for chunk sizing
        self._snapshot: Snapshot | None = None
        self._building: threading.Event | None = None  # set when the snapshot in progress is done

    @classmethod
    def from_rows(
        cls,
        fingerprint: str,
        version: int,
        post_ids: np.ndarray,
        author_ids: np.ndarray,
        embeddings: np.ndarray,
        attributes: Sequence[Attrs],
    ) -> CorpusStore:
        """Rows 0..n-1 in the given order. Raises ValueError (CorpusGap) for misaligned columns,
        duplicate or non-positive post ids."""
        n, dim = embeddings.shape
        if not (len(post_ids) == len(author_ids) == len(attributes) == n):
            raise ValueError("corpus columns have different lengths")
        store = cls(dim, fingerprint, version)
        store._rows = CorpusRows.from_columns(version, fingerprint, dim, post_ids, author_ids, attributes)
        store._embeddings = np.array(embeddings, dtype=np.float32, copy=True, order="C")
        store._attr_bytes = _attr_bytes_of(attributes)
        return store

    @property
    def version(self) -> int:
        return self._rows.version

    @property
    def fingerprint(self) -> str:
        return self._rows.fingerprint

    @property
    def num_items(self) -> int:
        return self._rows.size

    def __contains__(self, post_id: int) -> bool:
        with self._lock:
            return post_id in self._rows

    # -- building deltas (read-only) -------------------------------------------------------------

    def upsert_delta(
        self,
        post_ids: np.ndarray,
        author_ids: np.ndarray,
        embeddings: np.ndarray,
        attributes: list[Attrs],
    ) -> tuple[Delta, int]:
        """The delta that upserts these rows, and how many of them are new."""
        if embeddings.shape != (len(post_ids), self.dim):
            raise InvalidInput(
                f"embeddings of shape {embeddings.shape}, expected [{len(post_ids)}, {self.dim}]"
            )
        with self._lock:
            inserted = int((self._rows.rows_of(post_ids) < 0).sum())
            delta = Delta(
                self._rows.version + 1, self._rows.fingerprint, post_ids, author_ids,
                np.ascontiguousarray(embeddings, dtype=np.float32), attributes, np.zeros(0, dtype=np.int64),
            )  # fmt: skip
        return delta, inserted

    def delete_delta(self, post_ids: np.ndarray) -> tuple[Delta | None, list[int]]:
        """The delta that deletes the known ids (None when none is known), and the unknown ids."""
        ids = np.asarray(post_ids, dtype=np.int64).reshape(-1)
        with self._lock:
            found = self._rows.rows_of(ids) >= 0
            unknown = ids[~found].tolist()
            if not found.any():
                return None, unknown
            empty = np.zeros(0, dtype=np.int64)
            delta = Delta(
                self._rows.version + 1, self._rows.fingerprint, empty, empty,
                np.zeros((0, self.dim), np.float32), [], ids[found],
            )  # fmt: skip
        return delta, unknown

    # -- changing state ----------------------------------------------------------------------------

    def apply(self, delta: Delta) -> None:
        """Apply the delta that follows the current version, in CorpusRows' order (upserts, then
        deletes). Raises ValueError (CorpusGap), changing nothing, when it does not continue the
        corpus (version, model, shapes, ids)."""
        with self._lock:
            rows = self._rows
            rows.check(delta)
            # Everything that allocates comes before the first change.
            self._reserve(rows.rows_needed(delta))
            attr_bytes = _attr_bytes_of(delta.upsert_attributes)
            written = rows.apply(delta)
            self._embeddings[written] = delta.upsert_embeddings
            self._attr_bytes[written] = attr_bytes
            stale, self._snapshot = self._snapshot, None
            if rows.used > _COMPACT_MIN_ROWS and rows.size < rows.used // 2:
                self._compact()
        # Freed outside the lock (when no watcher holds it): its decoded attributes are one dict per
        # item, ~0.1 s for 1M items.
        del stale

    def snapshot(self) -> Snapshot:
        """The live rows at the current version, in row order (copied once per version, then shared).
        The arrays are copied under the lock; the attributes are decoded after it is released (one
        dict per item: most of the time), so a snapshot holds up writes only for the copy.
        Concurrent callers wait for the copy in progress instead of making another."""
        while True:
            with self._lock:
                if self._snapshot is not None:
                    return self._snapshot
                building = self._building
                if building is None:
                    parts = self._copy_live_rows()  # raising here, it marks nothing as in progress
                    building = self._building = threading.Event()
                    break
            building.wait()  # then look again: that copy, or a newer version to copy
        snap = None
        try:
            version, fingerprint, post_ids, author_ids, embeddings, column, attr_bytes = parts
            del parts
            if len(column.data):
                attributes: list[Attrs] = [a or None for a in column.decode()]
            else:
                attributes = [None] * len(post_ids)
            del column
            snap = Snapshot(version, fingerprint, post_ids, author_ids, embeddings, attributes, attr_bytes)
        finally:  # a failed decode (out of memory) leaves the next caller to try again
            with self._lock:
                self._building = None
                if snap is not None and self._snapshot is None and self._rows.version == snap.version:
                    self._snapshot = snap
            building.set()
        return snap

    # -- internals (lock held) ---------------------------------------------------------------------

    def _copy_live_rows(
        self,
    ) -> tuple[int, str, np.ndarray, np.ndarray, np.ndarray, AttributeColumn, np.ndarray]:
        """(version, fingerprint, post ids, author ids, embeddings, encoded attributes, attr_bytes) of
        the live rows, copied: the rows may change as soon as the lock is released."""
        rows = self._rows
        used = rows.used
        whole = rows.size == used  # no free row: a slice copy is faster than a gather
        live = rows.live_rows()
        take = slice(0, used) if whole else live
        post_ids, author_ids, column = rows.columns(live)
        embeddings, attr_bytes = self._embeddings[take].copy(), self._attr_bytes[take].copy()
        return rows.version, rows.fingerprint, post_ids, author_ids, embeddings, column, attr_bytes

    def _reserve(self, needed: int) -> None:
        """Room for `needed` rows in the matrix, growing by at least a quarter (as CorpusRows does)."""
        cap = len(self._embeddings)
        if needed <= cap:
            return
        cap = max(needed, cap + cap // 4, 16)
        used = self._rows.used
        embeddings = np.zeros((cap, self.dim), dtype=np.float32)
        embeddings[:used] = self._embeddings[:used]
        attr_bytes = np.zeros(cap, dtype=np.int64)
        attr_bytes[:used] = self._attr_bytes[:used]
        self._embeddings, self._attr_bytes = embeddings, attr_bytes

    def _compact(self) -> None:
        """Drop the free rows once they are the majority (a mass delete would otherwise keep its
        memory). Optional: the delta is applied already, so running out of memory here skips it."""
        try:
            kept = self._rows.live_rows()
            embeddings, attr_bytes = self._embeddings[kept], self._attr_bytes[kept]
            self._rows.compact()  # keeps the live rows in their order: row i is kept[i]
        except MemoryError:
            logger.warning("corpus compaction skipped: out of memory (%d live of %d rows)",
                           self._rows.size, self._rows.used)  # fmt: skip
            return
        self._embeddings, self._attr_bytes = embeddings, attr_bytes
