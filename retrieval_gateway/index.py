"""The device-resident corpus: the matrix (and its tie ids) on the device, and the rows' bookkeeping
(ids, authors, attributes, id -> row, free rows, version checks) in shared.corpus_rows.CorpusRows;
deltas, snapshot swaps and batched exact search. No grpc import.

Consistency model: one lock guards the current `_Corpus`. A search batch holds it from the
fingerprint check to the last attribute lookup, so a response is computed on exactly one version.
Deltas are applied in place under the lock (they wait for the batch in flight, a few ms). A new
snapshot is built aside, without the lock, and swapped in by reference (double buffer): the batch in
flight finishes on the old corpus, the next one sees the new one.

`info()` never takes the lock: after each snapshot swap and delta the index publishes an immutable
CorpusView by replacing one attribute (atomic in Python), so the event loop, the follower and the
readiness loop never wait for a scoring batch.

Memory: beyond the matrix an item costs CorpusRows' ~44 bytes plus its encoded attributes; on the
CPU the tie ids are the rows' own post-id column (no copy), on a GPU an int64 copy sits beside the
matrix. A snapshot's arrays are adopted, not copied, when the caller hands them over (the follower
stages embeddings in the index's dtype), so a swap holds the old corpus and the new one, no more.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from retrieval_gateway.topk import exact_topk, prepare
from shared.corpus_rows import AttributeColumn, CorpusGap, CorpusRows, Delta
from shared.errors import ModelMismatch, NotReady
from shared.threads import INTRA_OP

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_dtype(device: torch.device) -> str:
    """The corpus storage of `--dtype auto`: bf16 on cuda (half the memory and, at B=1, the faster
    scan: cuBLAS multiplies bf16 rows with fp32 accumulation), fp32 on cpu (a CPU without bf16 dot
    products pays for widening every row; measured in docs/decisions.md)."""
    return "bf16" if device.type == "cuda" else "fp32"


Attributes = Mapping[str, str]


def model_mismatch(user_fingerprint: str, corpus_fingerprint: str) -> ModelMismatch:
    return ModelMismatch(
        f"user embedding comes from model {user_fingerprint!r} but the corpus was encoded by "
        f"{corpus_fingerprint!r}: user_service and candidate_service must load the same checkpoint"
    )


@dataclass(frozen=True)
class Query:
    """One user's search: embedding [D] fp32 and what must not come back."""

    embedding: torch.Tensor  # [D] float32
    fingerprint: str  # model that produced the embedding
    k: int
    exclude_post_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # unknown: ignored
    exclude_author_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    # A router's query (sharded gateways): may it be answered by the shards that answer? And by when
    # (loop.time() seconds; None = the gateway's default timeout) must the shards have answered?
    allow_partial: bool = False
    deadline: float | None = None


@dataclass(frozen=True)
class Hit:
    post_id: int
    author_id: int
    score: float
    attributes: Attributes


@dataclass(frozen=True)
class SearchResult:
    """One query's hits as columns (descending score, ties by ascending post id): no object per hit,
    so a batch of 32 x k=1000 costs array slices, not 32,000 allocations."""

    post_ids: np.ndarray  # [n] int64
    author_ids: np.ndarray  # [n] int64
    scores: np.ndarray  # [n] float32
    # [n]: decoded maps, or (a shard's search, see CorpusIndex.search) still encoded
    attributes: list[Attributes] | AttributeColumn
    version: int
    fingerprint: str
    # A router's result: shards that did not answer (allow_partial only) and each shard's version
    # (shard 0 first, 0 = missing); `version` is then the oldest version among them.
    missing_shards: tuple[int, ...] = ()
    shard_versions: tuple[int, ...] = ()

    @property
    def hits(self) -> list[Hit]:
        """Row objects, for callers that want them (tests, tools); the serving path reads columns."""
        attributes = self.attributes
        if isinstance(attributes, AttributeColumn):
            attributes = attributes.decode()
        return [
            Hit(p, a, s, attrs)
            for p, a, s, attrs in zip(
                self.post_ids.tolist(), self.author_ids.tolist(), self.scores.tolist(), attributes,
                strict=True,
            )
        ]  # fmt: skip


@dataclass(frozen=True)
class CorpusView:
    """What readers may know about the current corpus without waiting for a search (published)."""

    version: int
    fingerprint: str
    size: int  # live items
    dim: int


class _Corpus:
    """One corpus state: the rows' bookkeeping and the matrix whose row r holds row r's embedding.
    Rows past `rows.used`, and free rows, are never scored."""

    def __init__(self, rows: CorpusRows, matrix: torch.Tensor) -> None:
        self.rows = rows
        self.matrix = matrix  # [capacity >= rows.used, D] on the device
        # Ties rank by post id. On the CPU that is the rows' own column (viewed, not copied); a GPU
        # needs a copy on the device, kept in step with the matrix.
        self.tie_ids_dev: torch.Tensor | None = None
        if matrix.device.type != "cpu":
            self.tie_ids_dev = torch.zeros(matrix.shape[0], dtype=torch.long, device=matrix.device)
            self.tie_ids_dev[: rows.used] = torch.from_numpy(rows.post_ids).to(matrix.device)
        self._masked: torch.Tensor | None = None  # free rows on the device, rebuilt after a change

    def info(self) -> CorpusView:
        r = self.rows
        return CorpusView(r.version, r.fingerprint, r.size, r.dim)

    def tie_ids(self) -> torch.Tensor:
        if self.tie_ids_dev is None:
            return torch.from_numpy(self.rows.post_ids)
        return self.tie_ids_dev[: self.rows.used]

    def masked_rows(self) -> torch.Tensor | None:
        if self._masked is None:
            # on the host: exact_topk splits it by chunk there (a device copy would cost a sync)
            self._masked = torch.from_numpy(self.rows.free_rows())
        return self._masked if self._masked.numel() else None

    def reserve(self, needed: int) -> None:
        """Room for `needed` rows, growing by at least a quarter (copy: growth is rare; a quarter, not
        double, so that one upsert past a 10M-row snapshot does not cost another matrix)."""
        cap = self.matrix.shape[0]
        if needed > cap:
            cap = max(needed, cap + cap // 4, 16)
        extra = cap - self.matrix.shape[0]
        if extra <= 0:
            return
        self.matrix = torch.cat([self.matrix, self.matrix.new_zeros(extra, self.matrix.shape[1])])
        if self.tie_ids_dev is not None:
            self.tie_ids_dev = torch.cat([self.tie_ids_dev, self.tie_ids_dev.new_zeros(extra)])

    def changed(self) -> None:
        self._masked = None


class CorpusIndex:
    def __init__(
        self,
        device: torch.device | str = "cpu",
        dtype: str = "fp32",
        max_score_elements: int | None = None,  # None: per device (topk.DEVICE_MAX_SCORE_ELEMENTS)
        fused_gemv: bool = False,
    ) -> None:
        self.device = torch.device(device)
        dtype = default_dtype(self.device) if dtype == "auto" else dtype
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.max_score_elements = max_score_elements
        self.fused_gemv = fused_gemv and self.device.type == "cpu"
        self._lock = threading.Lock()
        self._corpus: _Corpus | None = None
        self._info: CorpusView | None = None  # published after every change, read without the lock

    # ---- reading -------------------------------------------------------------------------------
    def info(self) -> CorpusView | None:
        """The current corpus's version, fingerprint, size and dim; never waits for a search."""
        return self._info

    def search(self, queries: Sequence[Query], *, encoded: bool = False) -> list[SearchResult | Exception]:
        """Score all queries in one [B, D] @ [D, N] pass against one corpus version. A query whose
        fingerprint differs from the corpus's gets ModelMismatch (only that query). encoded: the
        results' attributes as AttributeColumns, the stored bytes not decoded (a shard passes them on
        to its router as they are)."""
        with self._lock:
            c = self._corpus
            if c is None:
                raise NotReady("no corpus yet: waiting for the first snapshot from candidate_service")
            rows = c.rows
            if not rows.size:
                raise NotReady(f"the corpus is empty (version {rows.version}): nothing to retrieve")
            results: list[SearchResult | Exception] = [
                model_mismatch(q.fingerprint, rows.fingerprint) for q in queries
            ]  # replaced below for every query of the corpus's model
            todo = [i for i, q in enumerate(queries) if q.fingerprint == rows.fingerprint]
            if not todo:
                return results
            batch = [queries[i] for i in todo]
            emb = torch.stack([q.embedding for q in batch]).to(self.device, torch.float32)  # [B, D]
            if self.device.type == "cpu":  # threads for the product [B, D] @ [D, N] (shared/threads.py)
                INTRA_OP.use_for(len(batch) * rows.used * rows.dim)
            scores, top = exact_topk(
                emb,
                c.matrix[: rows.used],
                max(q.k for q in batch),
                masked_rows=c.masked_rows(),
                exclude=self._exclusions(rows, batch),
                tie_ids=c.tie_ids(),
                max_score_elements=self.max_score_elements,
                fused_gemv=self.fused_gemv,
            )
            scores, top = scores.cpu().numpy(), top.cpu().numpy()  # (on the host already from a device)
            # Each query's hits: its first k columns that hold a row (eligible rows come first).
            ks = np.fromiter((q.k for q in batch), np.int64, len(batch))
            full = np.minimum((top >= 0).sum(1), ks)
            counts = full.tolist()
            if (full == top.shape[1]).all():  # every query has all its columns: no mask to apply
                hit_rows = top.reshape(-1)
            else:
                hit_rows = top[np.arange(top.shape[1]) < full[:, None]]  # row-major: query by query
            post_ids, author_ids = rows.post_ids[hit_rows], rows.author_ids[hit_rows]
            # decoded (or gathered, still encoded) only for the hits, in one pass
            column = rows.attribute_column(hit_rows) if encoded else None
            maps = rows.attributes(hit_rows) if column is None else []
            at = 0
            for b, i in enumerate(todo):
                n = counts[b]
                results[i] = SearchResult(
                    post_ids[at : at + n], author_ids[at : at + n], scores[b, :n],
                    maps[at : at + n] if column is None else column.rows(at, at + n),
                    rows.version, rows.fingerprint,
                )  # fmt: skip
                at += n
            return results

    def _exclusions(
        self, rows: CorpusRows, batch: Sequence[Query]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(query index, row) pairs to mask: excluded posts that exist and rows of excluded authors."""
        qi: list[np.ndarray] = []
        found: list[np.ndarray] = []
        counts = [q.exclude_post_ids.size for q in batch]
        if any(counts):  # one vectorised lookup for the whole batch
            by_post = rows.rows_of(np.concatenate([q.exclude_post_ids for q in batch]))
            owner = np.repeat(np.arange(len(batch)), counts)
            hit = by_post >= 0
            qi.append(owner[hit])
            found.append(by_post[hit])
        for b, q in enumerate(batch):
            if q.exclude_author_ids.size:
                by_author = np.flatnonzero(np.isin(rows.author_ids, q.exclude_author_ids))
                qi.append(np.full(by_author.size, b, np.int64))
                found.append(by_author)
        if not found or not sum(f.size for f in found):
            return None
        return (  # on the host, like masked_rows
            torch.from_numpy(np.concatenate(qi)),
            torch.from_numpy(np.concatenate(found)),
        )

    # ---- writing -------------------------------------------------------------------------------
    def load_snapshot(
        self,
        version: int,
        fingerprint: str,
        post_ids: np.ndarray,  # [n] int64
        author_ids: np.ndarray,  # [n] int64
        embeddings: torch.Tensor,  # [n, D] float
        attributes: AttributeColumn | Sequence[Attributes],  # n rows
        *,
        copy: bool = True,
    ) -> None:
        """Build a new corpus aside (no lock held) and swap it in atomically. copy=False hands the
        arrays over: the index keeps them as they are when it can (embeddings already in the index's
        dtype and on its device), so a snapshot is never held twice. Raises CorpusGap for bad rows."""
        n = post_ids.shape[0] if post_ids.ndim == 1 else -1
        dim = embeddings.shape[1] if embeddings.dim() == 2 else -1
        if embeddings.shape[0] != n or dim < 0:
            raise CorpusGap(f"misaligned rows: {n} post ids, embeddings {tuple(embeddings.shape)}")
        rows = CorpusRows.from_columns(version, fingerprint, dim, post_ids, author_ids, attributes, copy=copy)
        del post_ids, author_ids, attributes  # adopted or copied: the rows own them now
        matrix = embeddings.to(self.device, self.dtype, copy=copy).contiguous()
        del embeddings
        c = _Corpus(rows, matrix)
        if self.fused_gemv and n:  # compile before serving, not on the first request
            try:
                exact_topk(torch.zeros(1, dim), matrix[:n], 1, fused_gemv=True)
            except Exception:  # no C++ compiler, unsupported platform: the matmul path still works
                logger.exception("fused gemv kernel unavailable; single queries use torch.mm")
                self.fused_gemv = False
        prepare(matrix)
        with self._lock:
            old, self._corpus = self._corpus, c
            self._info = c.info()
        was = "none" if old is None else f"v{old.rows.version}"
        del old  # freed now, unless a batch in flight still holds it
        logger.info(
            "corpus snapshot v%d (%s): %d items x %d on %s %s (was %s)", version, fingerprint, n, dim,
            self.device, self.dtype_name, was,
        )  # fmt: skip

    def apply_delta(self, delta: Delta) -> None:
        """Apply one delta (version - 1 -> version) in place, in CorpusRows' order (upserts, then
        deletes). Raises CorpusGap, changing nothing, when it does not continue the current corpus."""
        with self._lock:
            c = self._corpus
            if c is None:
                raise CorpusGap("delta before any snapshot")
            c.rows.check(delta)
            c.reserve(c.rows.rows_needed(delta))  # may allocate: before anything changes
            upsert_emb = torch.tensor(
                np.asarray(delta.upsert_embeddings), dtype=self.dtype, device=self.device
            )  # a copy: the delta's array may be read-only
            written = c.rows.apply(delta)
            if written.size:
                idx = torch.from_numpy(written).to(self.device)
                c.matrix[idx] = upsert_emb
                if c.tie_ids_dev is not None:
                    c.tie_ids_dev[idx] = torch.from_numpy(c.rows.post_ids[written]).to(self.device)
            c.changed()
            self._info = c.info()
