"""The corpus in memory (no grpc, no disk): ids, author ids, attributes, the embeddings matrix, the live
rows, the version and the model fingerprint. Changes are expressed as Deltas, built then applied, so that
the caller can commit a delta to the item store (the record) before it becomes visible.

Thread-safety: one lock guards the arrays; `snapshot()` returns an immutable copy of the live rows
(shared by every watcher of that version), so streaming never holds the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.corpus_rows import Attrs, Delta, attribute_bytes
from shared.errors import InvalidInput

ROW_OVERHEAD_BYTES = 8  # protobuf tags and lengths per row, counted generously when sizing chunks


@dataclass(frozen=True)
class Snapshot:
    """An immutable copy of the live rows at one version, row order = insertion order."""

    version: int
    fingerprint: str
    post_ids: np.ndarray  # [n] int64
    author_ids: np.ndarray  # [n] int64
    embeddings: np.ndarray  # [n, D] float32
    attributes: list[Attrs]  # [n]
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


class CorpusStore:
    def __init__(self, dim: int, fingerprint: str, version: int) -> None:
        self.dim = dim
        self.fingerprint = fingerprint
        self._version = version
        self._lock = threading.Lock()
        self._size = 0  # rows used (live or dead)
        self._post_ids = np.zeros(0, dtype=np.int64)
        self._author_ids = np.zeros(0, dtype=np.int64)
        self._embeddings = np.zeros((0, dim), dtype=np.float32)
        self._live = np.zeros(0, dtype=bool)
        self._attr_bytes = np.zeros(0, dtype=np.int64)
        self._attributes: list[Attrs] = []
        self._row_of: dict[int, int] = {}
        self._snapshot: Snapshot | None = None

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
        n, dim = embeddings.shape
        if not (len(post_ids) == len(author_ids) == len(attributes) == n):
            raise ValueError("corpus columns have different lengths")
        store = cls(dim, fingerprint, version)
        store._append(post_ids, author_ids, embeddings, list(attributes))
        if len(store._row_of) != n:
            raise ValueError("corpus has duplicate post ids")
        return store

    @property
    def version(self) -> int:
        return self._version

    @property
    def num_items(self) -> int:
        return len(self._row_of)

    def __contains__(self, post_id: int) -> bool:
        return post_id in self._row_of

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
            inserted = sum(1 for p in post_ids.tolist() if p not in self._row_of)
            delta = Delta(
                self._version + 1, self.fingerprint, post_ids, author_ids,
                np.ascontiguousarray(embeddings, dtype=np.float32), attributes, np.zeros(0, dtype=np.int64),
            )  # fmt: skip
        return delta, inserted

    def delete_delta(self, post_ids: np.ndarray) -> tuple[Delta | None, list[int]]:
        """The delta that deletes the known ids (None when none is known), and the unknown ids."""
        with self._lock:
            known = [p for p in post_ids.tolist() if p in self._row_of]
            unknown = [p for p in post_ids.tolist() if p not in self._row_of]
            if not known:
                return None, unknown
            empty = np.zeros(0, dtype=np.int64)
            delta = Delta(
                self._version + 1, self.fingerprint, empty, empty, np.zeros((0, self.dim), np.float32), [],
                np.asarray(known, dtype=np.int64),
            )  # fmt: skip
        return delta, unknown

    # -- changing state ----------------------------------------------------------------------------

    def apply(self, delta: Delta) -> None:
        """Apply the delta that follows the current version (upserts, then deletes)."""
        with self._lock:
            if delta.version != self._version + 1:
                raise ValueError(
                    f"delta version {delta.version} does not follow corpus version {self._version}"
                )
            if delta.fingerprint != self.fingerprint:
                raise ValueError(f"delta fingerprint {delta.fingerprint} != corpus {self.fingerprint}")
            new_rows = []
            for i, post_id in enumerate(delta.upsert_post_ids.tolist()):
                row = self._row_of.get(post_id)
                if row is None:
                    new_rows.append(i)
                    continue
                self._author_ids[row] = delta.upsert_author_ids[i]
                self._embeddings[row] = delta.upsert_embeddings[i]
                self._attributes[row] = delta.upsert_attributes[i]
                self._attr_bytes[row] = attribute_bytes(delta.upsert_attributes[i])
            if new_rows:
                idx = np.asarray(new_rows, dtype=np.int64)
                self._append(
                    delta.upsert_post_ids[idx], delta.upsert_author_ids[idx], delta.upsert_embeddings[idx],
                    [delta.upsert_attributes[i] for i in new_rows],
                )  # fmt: skip
            for post_id in delta.deleted_post_ids.tolist():
                row = self._row_of.pop(post_id, None)
                if row is not None:
                    self._live[row] = False
                    self._attributes[row] = None
            self._version = delta.version
            self._snapshot = None
            if self._size > 1024 and len(self._row_of) < self._size // 2:
                self._compact()

    def snapshot(self) -> Snapshot:
        """The live rows at the current version (copied once per version, then shared)."""
        with self._lock:
            if self._snapshot is None:
                rows = np.flatnonzero(self._live[: self._size])
                whole = len(rows) == self._size
                take = slice(0, self._size) if whole else rows  # a slice copy is faster than a gather
                # a list slice is a new list; the dicts in it are never mutated, only replaced
                attrs = self._attributes[: self._size]
                if not whole:
                    attrs = [attrs[r] for r in rows.tolist()]
                self._snapshot = Snapshot(
                    version=self._version,
                    fingerprint=self.fingerprint,
                    post_ids=self._post_ids[take].copy(),
                    author_ids=self._author_ids[take].copy(),
                    embeddings=self._embeddings[take].copy(),
                    attributes=attrs,
                    attr_bytes=self._attr_bytes[take].copy(),
                )  # fmt: skip
            return self._snapshot

    # -- internals (lock held) ---------------------------------------------------------------------

    def _append(
        self, post_ids: np.ndarray, author_ids: np.ndarray, embeddings: np.ndarray, attributes: list[Attrs]
    ) -> None:
        n = len(post_ids)
        need = self._size + n
        if need > len(self._post_ids):
            self._grow(max(need, 2 * len(self._post_ids), 1024))
        lo, hi = self._size, need
        self._post_ids[lo:hi] = post_ids
        self._author_ids[lo:hi] = author_ids
        self._embeddings[lo:hi] = embeddings
        self._live[lo:hi] = True
        empty = attribute_bytes(None)  # most rows: no call per row (a 1M-item start saves ~1 s)
        self._attr_bytes[lo:hi] = [attribute_bytes(a) if a else empty for a in attributes]
        self._attributes.extend(attributes)
        self._row_of.update(zip(post_ids.tolist(), range(lo, hi), strict=True))
        self._size = hi

    def _grow(self, capacity: int) -> None:
        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros((capacity, *a.shape[1:]), dtype=a.dtype)
            out[: self._size] = a[: self._size]
            return out

        self._post_ids, self._author_ids = grown(self._post_ids), grown(self._author_ids)
        self._embeddings, self._live, self._attr_bytes = (
            grown(self._embeddings),
            grown(self._live),
            grown(self._attr_bytes),
        )

    def _compact(self) -> None:
        """Drop dead rows once they are the majority (deletes would otherwise grow memory forever)."""
        rows = np.flatnonzero(self._live[: self._size])
        post_ids, author_ids = self._post_ids[rows], self._author_ids[rows]
        embeddings, attributes = self._embeddings[rows], [self._attributes[r] for r in rows.tolist()]
        self._size = 0
        self._post_ids = np.zeros(0, dtype=np.int64)
        self._author_ids = np.zeros(0, dtype=np.int64)
        self._embeddings = np.zeros((0, self.dim), dtype=np.float32)
        self._live = np.zeros(0, dtype=bool)
        self._attr_bytes = np.zeros(0, dtype=np.int64)
        self._attributes, self._row_of = [], {}
        self._append(post_ids, author_ids, embeddings, attributes)
