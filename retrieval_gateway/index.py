"""The device-resident corpus: matrix, ids, attributes, deleted rows; upserts, deletes, snapshot
swaps, and batched exact search. No grpc import.

Consistency model: one lock guards the current `_Corpus`. A search batch holds it from the
fingerprint check to the last id lookup, so a response is computed on exactly one version. Deltas are
applied in place under the lock (they wait for the batch in flight, a few ms). A new snapshot is
built aside, without the lock, and swapped in by reference (double buffer): the batch in flight
finishes on the old corpus, the next one sees the new one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from retrieval_gateway.topk import DEFAULT_MAX_SCORE_ELEMENTS, exact_topk
from shared.errors import ModelMismatch, NotReady

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Attributes = Mapping[str, str]
_EMPTY: Attributes = {}


class CorpusGap(Exception):
    """A delta cannot be applied to the current corpus (version gap, other model, bad rows): the
    follower must ask for a fresh snapshot."""


def model_mismatch(user_fingerprint: str, corpus_fingerprint: str) -> ModelMismatch:
    return ModelMismatch(
        f"user embedding comes from model {user_fingerprint!r} but the corpus was encoded by "
        f"{corpus_fingerprint!r}: user_service and candidate_service must load the same checkpoint"
    )


def pick_device(name: str) -> torch.device:
    """'auto' = cuda when present, else cpu; 'cuda' without a GPU is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


@dataclass(frozen=True)
class Query:
    """One user's search: embedding [D] fp32 and what must not come back."""

    embedding: torch.Tensor  # [D] float32
    fingerprint: str  # model that produced the embedding
    k: int
    exclude_post_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # unknown: ignored
    exclude_author_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


@dataclass(frozen=True)
class Hit:
    post_id: int
    author_id: int
    score: float
    attributes: Attributes


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]  # descending score, ties by ascending post_id
    version: int
    fingerprint: str


@dataclass(frozen=True)
class CorpusInfo:
    version: int
    fingerprint: str
    size: int  # live items
    dim: int


class _Corpus:
    """One corpus state. Rows [0, used) are allocated; deleted rows (`free`, reused by later upserts)
    are masked out of every search."""

    def __init__(self, version: int, fingerprint: str, dim: int, capacity: int, device, dtype) -> None:
        self.version = version
        self.fingerprint = fingerprint
        self.dim = dim
        self.matrix = torch.zeros(capacity, dim, dtype=dtype, device=device)  # [cap, D]
        self.post_ids_dev = torch.zeros(capacity, dtype=torch.long, device=device)  # tie order
        self.post_ids = np.zeros(capacity, np.int64)
        self.author_ids = np.zeros(capacity, np.int64)
        self.attributes: list[Attributes] = [_EMPTY] * capacity
        self.row_of: dict[int, int] = {}
        self.free: list[int] = []  # deleted rows, reused before growing
        self._masked: torch.Tensor | None = None  # `free` on the device, rebuilt after a change
        self.used = 0

    @property
    def capacity(self) -> int:
        return self.matrix.shape[0]

    def grow(self, needed: int) -> None:
        """Double the capacity until `needed` rows fit (copy: upserts past capacity are rare)."""
        cap = max(self.capacity, 1)
        while cap < needed:
            cap *= 2
        if cap == self.capacity:
            return
        extra = cap - self.capacity
        self.matrix = torch.cat([self.matrix, self.matrix.new_zeros(extra, self.dim)])
        self.post_ids_dev = torch.cat([self.post_ids_dev, self.post_ids_dev.new_zeros(extra)])
        self.post_ids = np.concatenate([self.post_ids, np.zeros(extra, np.int64)])
        self.author_ids = np.concatenate([self.author_ids, np.zeros(extra, np.int64)])
        self.attributes.extend([_EMPTY] * extra)

    def masked_rows(self) -> torch.Tensor | None:
        if self._masked is None and self.free:
            self._masked = torch.tensor(self.free, dtype=torch.long, device=self.matrix.device)
        return self._masked if self.free else None

    def allocate(self) -> int:
        if self.free:
            return self.free.pop()
        if self.used == self.capacity:
            self.grow(self.used + 1)
        self.used += 1
        return self.used - 1


def _check_rows(
    post_ids: np.ndarray, author_ids: np.ndarray, embeddings: torch.Tensor, n_attrs: int, dim: int
):
    n = post_ids.shape[0]
    if author_ids.shape != (n,) or embeddings.shape != (n, dim) or n_attrs != n:
        raise CorpusGap(
            f"misaligned rows: {n} post ids, {author_ids.shape[0]} author ids, "
            f"embeddings {tuple(embeddings.shape)} (D={dim}), {n_attrs} attribute maps"
        )
    if n and (post_ids <= 0).any():
        raise CorpusGap("post id <= 0 in corpus rows")
    if np.unique(post_ids).shape[0] != n:
        raise CorpusGap("duplicate post ids in corpus rows")


class CorpusIndex:
    def __init__(
        self,
        device: torch.device | str = "cpu",
        dtype: str = "fp32",
        max_score_elements: int = DEFAULT_MAX_SCORE_ELEMENTS,
        fused_gemv: bool = False,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.max_score_elements = max_score_elements
        self.fused_gemv = fused_gemv and self.device.type == "cpu"
        self._lock = threading.Lock()
        self._corpus: _Corpus | None = None

    # ---- reading -------------------------------------------------------------------------------
    def info(self) -> CorpusInfo | None:
        with self._lock:
            c = self._corpus
            return None if c is None else CorpusInfo(c.version, c.fingerprint, len(c.row_of), c.dim)

    def search(self, queries: Sequence[Query]) -> list[SearchResult | Exception]:
        """Score all queries in one [B, D] @ [D, N] pass against one corpus version. A query whose
        fingerprint differs from the corpus's gets ModelMismatch (only that query)."""
        with self._lock:
            c = self._corpus
            if c is None:
                raise NotReady("no corpus yet: waiting for the first snapshot from candidate_service")
            if not c.row_of:
                raise NotReady(f"the corpus is empty (version {c.version}): nothing to retrieve")
            results: list[SearchResult | Exception] = [
                model_mismatch(q.fingerprint, c.fingerprint) for q in queries
            ]  # replaced below for every query of the corpus's model
            todo = [i for i, q in enumerate(queries) if q.fingerprint == c.fingerprint]
            if not todo:
                return results
            batch = [queries[i] for i in todo]
            emb = torch.stack([q.embedding for q in batch]).to(self.device, torch.float32)  # [B, D]
            scores, rows = exact_topk(
                emb,
                c.matrix[: c.used],
                max(q.k for q in batch),
                masked_rows=c.masked_rows(),
                exclude=self._exclusions(c, batch),
                tie_ids=c.post_ids_dev[: c.used],
                max_score_elements=self.max_score_elements,
                fused_gemv=self.fused_gemv,
            )
            scores, rows = scores.cpu().numpy(), rows.cpu().numpy()
            for b, i in enumerate(todo):
                keep = rows[b, : batch[b].k]
                keep = keep[keep >= 0]
                hits = [
                    Hit(int(c.post_ids[r]), int(c.author_ids[r]), float(s), c.attributes[r])
                    for r, s in zip(keep.tolist(), scores[b, : keep.shape[0]].tolist(), strict=True)
                ]
                results[i] = SearchResult(hits, c.version, c.fingerprint)
            return results

    def _exclusions(self, c: _Corpus, batch: Sequence[Query]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(query index, row) pairs to mask: excluded posts that exist and rows of excluded authors."""
        qi: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        for b, q in enumerate(batch):
            found = [c.row_of[p] for p in q.exclude_post_ids.tolist() if p in c.row_of]
            if q.exclude_author_ids.size:
                by_author = np.flatnonzero(np.isin(c.author_ids[: c.used], q.exclude_author_ids))
                found.extend(by_author.tolist())
            if found:
                rows.append(np.asarray(found, np.int64))
                qi.append(np.full(len(found), b, np.int64))
        if not rows:
            return None
        return (
            torch.from_numpy(np.concatenate(qi)).to(self.device),
            torch.from_numpy(np.concatenate(rows)).to(self.device),
        )

    # ---- writing -------------------------------------------------------------------------------
    def load_snapshot(
        self,
        version: int,
        fingerprint: str,
        post_ids: np.ndarray,  # [n] int64
        author_ids: np.ndarray,  # [n] int64
        embeddings: torch.Tensor,  # [n, D] float
        attributes: Sequence[Attributes],  # n maps
    ) -> None:
        """Build a new corpus aside (no lock held) and swap it in atomically."""
        n = post_ids.shape[0]
        dim = embeddings.shape[1] if embeddings.dim() == 2 else -1
        _check_rows(post_ids, author_ids, embeddings, len(attributes), dim)
        c = _Corpus(version, fingerprint, dim, max(n, 1), self.device, self.dtype)
        c.matrix[:n] = embeddings.to(self.device, self.dtype)
        c.post_ids_dev[:n] = torch.from_numpy(post_ids).to(self.device)
        c.post_ids[:n] = post_ids
        c.author_ids[:n] = author_ids
        c.attributes[:n] = list(attributes)
        c.row_of = dict(zip(post_ids.tolist(), range(n), strict=True))
        c.used = n
        if self.fused_gemv and n:  # compile before serving, not on the first request
            try:
                exact_topk(torch.zeros(1, dim), c.matrix[:n], 1, fused_gemv=True)
            except Exception:  # no C++ compiler, unsupported platform: the matmul path still works
                logger.exception("fused gemv kernel unavailable; single queries use torch.mm")
                self.fused_gemv = False
        with self._lock:
            old, self._corpus = self._corpus, c
        logger.info(
            "corpus snapshot v%d (%s): %d items x %d on %s %s (was %s)", version, fingerprint, n, dim,
            self.device, self.dtype_name, "none" if old is None else f"v{old.version}",
        )  # fmt: skip

    def apply_delta(
        self,
        version: int,
        fingerprint: str,
        upsert_post_ids: np.ndarray,  # [u] int64
        upsert_author_ids: np.ndarray,  # [u] int64
        upsert_embeddings: torch.Tensor,  # [u, D]
        upsert_attributes: Sequence[Attributes],  # u maps
        deleted_post_ids: np.ndarray,  # [d] int64
    ) -> None:
        """Apply one delta (version - 1 -> version) in place: deletes first, then upserts. Raises
        CorpusGap, changing nothing, when the delta does not continue the current corpus."""
        with self._lock:
            c = self._corpus
            if c is None:
                raise CorpusGap("delta before any snapshot")
            if version != c.version + 1:
                raise CorpusGap(f"delta to version {version} does not follow corpus version {c.version}")
            if fingerprint != c.fingerprint:
                raise CorpusGap(f"delta of model {fingerprint!r} for a corpus of model {c.fingerprint!r}")
            _check_rows(upsert_post_ids, upsert_author_ids, upsert_embeddings, len(upsert_attributes), c.dim)
            for pid in deleted_post_ids.tolist():
                row = c.row_of.pop(pid, None)
                if row is not None:  # deleting an unknown id is a no-op, as in candidate_service
                    c.attributes[row] = _EMPTY
                    c.free.append(row)
            if upsert_post_ids.size:
                rows = [c.row_of[p] if p in c.row_of else c.allocate() for p in upsert_post_ids.tolist()]
                idx = torch.tensor(rows, dtype=torch.long, device=self.device)
                c.matrix[idx] = upsert_embeddings.to(self.device, self.dtype)
                c.post_ids_dev[idx] = torch.from_numpy(upsert_post_ids).to(self.device)
                c.post_ids[rows] = upsert_post_ids
                c.author_ids[rows] = upsert_author_ids
                for row, pid, attrs in zip(rows, upsert_post_ids.tolist(), upsert_attributes, strict=True):
                    c.attributes[row] = attrs
                    c.row_of[pid] = row
            c._masked = None
            c.version = version
