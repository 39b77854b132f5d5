"""The corpus's rows, shared by candidate_service (which produces changes) and the gateway (which
follows them): one `Delta` type for a change, one owner of the rows (`CorpusRows`) with one apply
order. No grpc, no torch.

Apply order of a delta: upserts first, then deletes (an id both upserted and deleted in one delta ends
up deleted). Both owners keep a `CorpusRows` and apply every delta through `CorpusRows.apply`:
candidate_service's `CorpusStore` (candidate_service/store.py) and the gateway's `CorpusIndex`
(retrieval_gateway/index.py). From the same start and the same deltas they reach the same rows, row
numbers included (tests/unit/test_candidate_store.py checks it), until one of them compacts:
candidate_service's store does once free rows are the majority (past 1024 rows); from then on both
hold the same items, but not at the same row numbers (nor in the same order once rows are reused).

`CorpusRows` keeps everything about the rows except their embeddings, which stay with the owner (the
gateway's device matrix, candidate_service's float32 array, each under its owner's lock) at the same
row numbers:

    rows = CorpusRows.from_columns(version, fingerprint, dim, post_ids, author_ids, attributes)
    rows.check(delta)                      # CorpusGap (a ValueError) unless the delta continues rows
    needed = rows.rows_needed(delta)       # grow the owner's matrix to this many rows first
    upsert_rows = rows.apply(delta)        # then write delta.upsert_embeddings at these rows
    rows.rows_of(post_ids)                 # vectorised id -> row, -1 where absent
    rows.attributes(row_numbers)           # decoded maps, for the few rows a response returns
    rows.free_rows()                       # rows [0, used) that hold no item: mask them out of a search
    kept = rows.compact()                  # optional: drop free rows; owner does matrix = matrix[kept]
    rows.columns()                         # (post ids, author ids, AttributeColumn) of the live rows
    rows.attribute_column(row_numbers)     # encoded, not decoded: what a shard passes on to its router

A free row (deleted, not yet reused) has post id 0 and no attributes; later upserts reuse free rows
before growing, so row order is not insertion order. `version` moves only through `apply`.

Memory (why not dicts): a Python dict id -> row plus one dict per item's attributes cost ~525 bytes
per item beyond the matrix (1.32 GiB for 2M items with a 0.24 GiB bf16 matrix). Here an item costs
44 bytes plus its encoded attributes: post id, author id (8 + 8), attribute offset and length (8 + 4),
and the lookup's sorted id and row (8 + 8). bench/memory_bench.py, 10M x 64 bf16 with short titles:
75 bytes of RSS per item beyond the matrix, 30 of them the encoded titles (the dict design: 476).

- id -> row is a sorted base (ids, rows), searched with np.searchsorted, plus a small sorted overlay
  of the ids changed since (row -1 = deleted). A delta touches only the overlay (O(overlay) memmove);
  the overlay is merged into the base in O(n) once it outgrows ~8 sqrt(n) entries, which balances the
  per-delta cost against the merges. Chosen over a numpy open-addressing table: lookups and merges are
  plain vectorised numpy, with no probe loops, tombstones or resize thresholds to get wrong, and
  sorted ids make the duplicate check of a snapshot free.
- Attributes are UTF-8 JSON objects in one byte arena with an offset and a length per row (an empty
  map is 0 bytes). A response decodes only its hits, all at once: their bytes are gathered with numpy
  into one JSON array and parsed by one C call (~10x faster than one json.loads per row). Replaced
  and deleted attributes leave garbage in the arena; it is compacted once garbage exceeds a quarter
  of the live bytes (and 1 MiB).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

Attrs = dict[str, str] | None

_EMPTY_I64 = np.zeros(0, np.int64)
_EMPTY_I64.flags.writeable = False  # shared by every empty column: a write to it is a bug
_COMMA, _OPEN, _CLOSE = ord(","), ord("["), ord("]")
_GATHER_ROWS = 1 << 16  # rows gathered per numpy pass (bounds the int64 index temporaries)
_BLOCK_BYTES = 64 << 20  # AttributeColumnBuilder's blocks: above glibc's largest mmap threshold (32 MiB)
_ARENA_GARBAGE_FLOOR = 1 << 20
# Growth by a quarter, not doubling: appends stay amortised O(1), and one upsert past a snapshot's
# exact size costs 7 bytes per item of slack instead of 28 (the 64-byte budget holds after growth).
_GROWTH = 4
_OVERLAY_MIN = 4096
_OVERLAY_PER_SQRT = 8  # the overlay is merged past max(_OVERLAY_MIN, this * sqrt(n)) entries


class CorpusGap(ValueError):
    """Rows or a delta that cannot be applied to this corpus (version gap, other model, misaligned or
    invalid rows). Nothing was changed; a follower must resync from a fresh snapshot."""


def attribute_bytes(attrs: Attrs) -> int:
    """Serialized size bound of one row's attributes (an empty map still costs a tag and a length)."""
    if not attrs:
        return 2
    return 4 + sum(len(k.encode()) + len(v.encode()) + 8 for k, v in attrs.items())


@dataclass(frozen=True)
class Delta:
    """The change that took the corpus from `version - 1` to `version` (one upsert or delete call)."""

    version: int
    fingerprint: str
    upsert_post_ids: np.ndarray  # [u] int64
    upsert_author_ids: np.ndarray  # [u] int64
    upsert_embeddings: np.ndarray  # [u, D] float32
    upsert_attributes: list[Attrs]  # [u]
    deleted_post_ids: np.ndarray  # [d] int64

    @property
    def nbytes(self) -> int:
        attrs = sum(attribute_bytes(a) for a in self.upsert_attributes)
        return (
            int(
                self.upsert_embeddings.nbytes
                + 16 * len(self.upsert_post_ids)
                + 8 * len(self.deleted_post_ids)
            )
            + attrs
        )


# ---- attributes: UTF-8 JSON objects in one arena -------------------------------------------------

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)


def encode_attributes(attrs: Attrs) -> bytes:
    """One row's attributes (str -> str) as stored: compact UTF-8 JSON, b"" for none."""
    return _ENCODER.encode(attrs).encode() if attrs else b""


def _gather(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, sep: bool) -> np.ndarray:
    """The byte ranges data[starts[i] : starts[i] + lengths[i]] concatenated (all lengths > 0); with
    `sep`, as the text of a JSON array: "[" row "," row ... "]"."""
    total = int(lengths.sum())
    at = np.cumsum(lengths) - lengths  # where each range starts in the plain concatenation
    pos = np.arange(total)
    src = pos + np.repeat(starts - at, lengths)
    if not sep:
        return data[src]
    out = np.full(total + len(lengths) + 1, _COMMA, np.uint8)
    out[0], out[-1] = _OPEN, _CLOSE
    out[pos + np.repeat(np.arange(1, len(lengths) + 1), lengths)] = data[src]
    return out


# The map of every row without attributes: one shared read-only mapping, so that 32 x 1,000 hits of a
# corpus without attributes cost one list, not 32,000 dicts (~3 ms).
NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})


def _decode(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[Mapping[str, str]]:
    """Decoded maps of the given byte ranges (length 0 = NO_ATTRIBUTES), parsed a block of rows at a
    time. Read-only for the caller: copy a map before changing it."""
    out: list[Mapping[str, str]] = [NO_ATTRIBUTES] * len(lengths)
    filled = np.flatnonzero(lengths)
    for lo in range(0, len(filled), _GATHER_ROWS):
        which = filled[lo : lo + _GATHER_ROWS]
        text = _gather(data, starts[which], lengths[which].astype(np.int64), sep=True).tobytes()
        for i, attrs in zip(which.tolist(), json.loads(text), strict=True):
            out[i] = attrs
    return out


@dataclass(frozen=True)
class AttributeColumn:
    """n rows of encoded attributes: row i is data[offsets[i] : offsets[i + 1]] (empty = none)."""

    data: np.ndarray  # [bytes] uint8
    offsets: np.ndarray  # [n + 1] int64, offsets[0] == 0

    @classmethod
    def encode(cls, attributes: Iterable[Attrs]) -> AttributeColumn:
        builder = AttributeColumnBuilder()
        builder.extend(attributes)
        return builder.finish()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def decode(self) -> list[Mapping[str, str]]:
        return _decode(self.data, self.offsets[:-1], np.diff(self.offsets))

    def rows(self, start: int, stop: int) -> AttributeColumn:
        """Rows [start, stop): views of this column's bytes, no copy."""
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        return AttributeColumn(self.data[a:b], self.offsets[start : stop + 1] - a)

    @classmethod
    def concat(cls, columns: Sequence[AttributeColumn]) -> AttributeColumn:
        if len(columns) == 1:
            return columns[0]
        data = np.concatenate([c.data for c in columns]) if columns else np.zeros(0, np.uint8)
        lengths = np.concatenate([np.diff(c.offsets) for c in columns]) if columns else _EMPTY_I64
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(data, offsets)

    def json_array(self) -> tuple[np.ndarray, bytes]:
        """(the rows that have attributes [m] ascending, their attributes as the text of one JSON array
        of m objects; b"" when m = 0), gathered from the encoded bytes without decoding them: how a
        shard sends its hits' attributes on."""
        lengths = np.diff(self.offsets)
        filled = np.flatnonzero(lengths)
        if not len(filled):
            return filled, b""
        starts = self.offsets[filled]
        parts = [
            _gather(
                self.data, starts[lo : lo + _GATHER_ROWS], lengths[filled[lo : lo + _GATHER_ROWS]], sep=True
            )
            for lo in range(0, len(filled), _GATHER_ROWS)
        ]
        if len(parts) == 1:
            return filled, parts[0].tobytes()
        return filled, b"[" + b",".join(part[1:-1].tobytes() for part in parts) + b"]"


class AttributeColumnBuilder:
    """Encodes attributes a batch at a time (e.g. one snapshot chunk), so that a large snapshot never
    exists as one Python dict per item. `rows`, when known (a snapshot announces its total), sizes the
    offsets once instead of concatenating them at the end.

    The bytes go into blocks of _BLOCK_BYTES: each is its own memory mapping (above glibc's largest
    mmap threshold), committed as it is written and returned to the system when freed. `finish`
    copies the blocks into one arena, freeing each once copied (or hands back the only block as it
    is), so the arena is never held twice, nor left behind in the allocator's free lists."""

    def __init__(self, rows: int | None = None) -> None:
        self._offsets = None if rows is None else np.zeros(rows + 1, np.int64)
        self._lengths: list[np.ndarray] = []  # per batch, when `rows` is not known
        self._n = 0
        self._blocks: list[np.ndarray] = []  # the last one is being filled
        self._block_used = 0
        self._total = 0

    def extend(self, attributes: Iterable[Attrs]) -> None:
        encoded = [encode_attributes(a) for a in attributes]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        if self._offsets is None:
            self._lengths.append(lengths)
        else:
            if self._n + len(lengths) >= len(self._offsets):
                raise ValueError(f"more than the {len(self._offsets) - 1} rows announced")
            ends = self._offsets[self._n + 1 : self._n + 1 + len(lengths)]
            np.cumsum(lengths, out=ends)
            ends += self._total
        self._n += len(lengths)
        self._write(b"".join(encoded))

    def _write(self, blob: bytes) -> None:
        if not blob:
            return
        if not self._blocks or self._block_used + len(blob) > len(self._blocks[-1]):
            if self._blocks:  # the unused tail of a full block was never committed
                self._blocks[-1] = self._blocks[-1][: self._block_used]
            self._blocks.append(np.empty(max(_BLOCK_BYTES, len(blob)), np.uint8))
            self._block_used = 0
        self._blocks[-1][self._block_used : self._block_used + len(blob)] = np.frombuffer(blob, np.uint8)
        self._block_used += len(blob)
        self._total += len(blob)

    def finish(self) -> AttributeColumn:
        if self._offsets is None:
            lengths = np.concatenate(self._lengths) if self._lengths else _EMPTY_I64
            offsets = np.zeros(len(lengths) + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
        elif self._n != len(self._offsets) - 1:
            raise ValueError(f"{self._n} rows of the {len(self._offsets) - 1} announced")
        else:
            offsets = self._offsets
        blocks = self._blocks
        if blocks:
            blocks[-1] = blocks[-1][: self._block_used]
        if not blocks:
            data = np.zeros(0, np.uint8)
        elif len(blocks) == 1:
            data = blocks[0]
        else:
            data = np.empty(self._total, np.uint8)
            at = 0
            for i in range(len(blocks)):
                block, blocks[i] = blocks[i], None
                data[at : at + len(block)] = block
                at += len(block)
                del block
        self._offsets, self._lengths, self._n = None, [], 0  # let go of everything
        self._blocks, self._block_used, self._total = [], 0, 0
        return AttributeColumn(data, offsets)


# ---- id -> row -------------------------------------------------------------------------------------


class _IdLookup:
    """post id -> row: a sorted base plus a sorted overlay of later changes (row -1 = deleted)."""

    def __init__(self, base_ids: np.ndarray, base_rows: np.ndarray) -> None:
        self.base_ids, self.base_rows = base_ids, base_rows  # [n] int64 sorted, [n] int64
        self.ov_ids, self.ov_rows = _EMPTY_I64, _EMPTY_I64

    @property
    def nbytes(self) -> int:
        return self.base_ids.nbytes + self.base_rows.nbytes + self.ov_ids.nbytes + self.ov_rows.nbytes

    def get(self, ids: np.ndarray) -> np.ndarray:
        out = np.full(len(ids), -1, np.int64)
        for keys, rows in ((self.base_ids, self.base_rows), (self.ov_ids, self.ov_rows)):
            if len(keys) and len(ids):
                pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
                found = keys[pos] == ids
                out[found] = rows[pos[found]]  # the overlay, read second, wins (also with -1)
        return out

    def set(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """ids (unique) now map to rows (-1 = gone)."""
        order = np.argsort(ids)  # unique ids: no stability needed
        ids, rows = ids[order], rows[order]
        pos = np.searchsorted(self.ov_ids, ids)
        known = pos < len(self.ov_ids)
        known[known] = self.ov_ids[pos[known]] == ids[known]
        if known.any():
            self.ov_rows[pos[known]] = rows[known]
        new = ~known
        if new.any():  # ids are sorted, so the inserts keep the overlay sorted
            self.ov_ids = np.insert(self.ov_ids, pos[new], ids[new])
            self.ov_rows = np.insert(self.ov_rows, pos[new], rows[new])
        if len(self.ov_ids) > max(_OVERLAY_MIN, _OVERLAY_PER_SQRT * math.isqrt(len(self.base_ids))):
            self.merge()

    def merge(self) -> None:
        """Fold the overlay into the base: O(n) (drop the shadowed entries, insert the live ones)."""
        if not len(self.ov_ids):
            return
        base_ids, base_rows = self.base_ids, self.base_rows
        pos = np.minimum(np.searchsorted(base_ids, self.ov_ids), max(len(base_ids) - 1, 0))
        shadowed = pos[base_ids[pos] == self.ov_ids] if len(base_ids) else _EMPTY_I64
        keep = np.ones(len(base_ids), bool)
        keep[shadowed] = False
        base_ids, base_rows = base_ids[keep], base_rows[keep]
        live = self.ov_rows >= 0
        at = np.searchsorted(base_ids, self.ov_ids[live])
        self.base_ids = np.insert(base_ids, at, self.ov_ids[live])
        self.base_rows = np.insert(base_rows, at, self.ov_rows[live])
        self.ov_ids, self.ov_rows = _EMPTY_I64, _EMPTY_I64


# ---- the rows ----------------------------------------------------------------------------------------


def _column(values: np.ndarray, copy: bool) -> np.ndarray:
    """A writable, contiguous int64 column; `values` itself when allowed and already one."""
    if copy:
        return np.array(values, dtype=np.int64, copy=True, order="C")
    return np.require(values, np.int64, ["C_CONTIGUOUS", "WRITEABLE"])


def _check_ids(post_ids: np.ndarray, what: str) -> None:
    if post_ids.size and int(post_ids.min()) <= 0:
        raise CorpusGap(f"post id <= 0 in {what}")


class CorpusRows:
    """Ids, authors and attributes of the corpus's rows, the id -> row map, the free rows, and the
    version and model fingerprint that deltas are checked against. Not thread-safe: the owner
    serialises changes against reads (the gateway under its index lock)."""

    def __init__(self, version: int, fingerprint: str, dim: int) -> None:
        self.version = version
        self.fingerprint = fingerprint
        self.dim = dim  # width of the embeddings the owner keeps (checked on every delta)
        self._used = 0  # rows [0, used) are allocated (live or free)
        self._live = 0
        self._post_ids = _EMPTY_I64  # [capacity]; 0 on a free row
        self._author_ids = _EMPTY_I64
        self._attr_start = _EMPTY_I64  # [capacity] offset of the row's attributes in the arena
        self._attr_len = np.zeros(0, np.int32)  # [capacity] bytes (0 = no attributes)
        self._arena = np.zeros(0, np.uint8)
        self._arena_used = 0
        self._arena_garbage = 0  # bytes of replaced or deleted attributes
        self._free = _EMPTY_I64  # stack of free rows (its first `_n_free` entries)
        self._n_free = 0
        self._lookup = _IdLookup(_EMPTY_I64, _EMPTY_I64)

    @classmethod
    def from_columns(
        cls,
        version: int,
        fingerprint: str,
        dim: int,
        post_ids: np.ndarray,  # [n] int64, > 0, unique
        author_ids: np.ndarray,  # [n] int64
        attributes: AttributeColumn | Sequence[Attrs],  # n rows
        *,
        copy: bool = True,
    ) -> CorpusRows:
        """Rows 0..n-1 in the given order (a snapshot). copy=False adopts the arrays where it can (the
        caller hands them over). Raises CorpusGap for misaligned, non-positive or duplicate ids."""
        n = post_ids.shape[0] if post_ids.ndim == 1 else -1
        if n < 0 or author_ids.shape != (n,) or len(attributes) != n:
            raise CorpusGap(
                f"misaligned rows: post ids {tuple(post_ids.shape)}, author ids "
                f"{tuple(author_ids.shape)}, {len(attributes)} attribute maps"
            )
        _check_ids(post_ids, "corpus rows")
        ids = _column(post_ids, copy)
        order = np.argsort(ids)  # quicksort: in place, no n/2 temporary as a stable sort would need
        sorted_ids = ids[order]
        if n > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
            first = int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])
            raise CorpusGap(f"duplicate post ids in corpus rows (e.g. {first})")
        if not isinstance(attributes, AttributeColumn):
            column = AttributeColumn.encode(attributes)
        elif copy:
            column = AttributeColumn(attributes.data.copy(), attributes.offsets.copy())
        else:
            column = attributes
        rows = cls(version, fingerprint, dim)
        rows._post_ids, rows._author_ids = ids, _column(author_ids, copy)
        rows._attr_start = column.offsets[:-1]  # a view: the column's offsets are ours now
        rows._attr_len = np.empty(n, np.int32)  # no int64 temporary of n lengths
        np.subtract(column.offsets[1:], column.offsets[:-1], out=rows._attr_len, casting="unsafe")
        rows._arena, rows._arena_used = column.data, len(column.data)
        rows._used = rows._live = n
        rows._lookup = _IdLookup(sorted_ids, order)
        return rows

    # ---- reading --------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Live items."""
        return self._live

    @property
    def used(self) -> int:
        """Rows [0, used) are allocated: live items and free rows."""
        return self._used

    @property
    def capacity(self) -> int:
        return len(self._post_ids)

    @property
    def post_ids(self) -> np.ndarray:
        """[used] int64 view, 0 on free rows; valid until the next change."""
        return self._post_ids[: self._used]

    @property
    def author_ids(self) -> np.ndarray:
        """[used] int64 view; valid until the next change."""
        return self._author_ids[: self._used]

    @property
    def nbytes(self) -> int:
        """Bytes held (capacity, not only what is used), the lookup and the arena included."""
        arrays = (self._post_ids, self._author_ids, self._attr_start, self._attr_len, self._arena, self._free)
        return sum(a.nbytes for a in arrays) + self._lookup.nbytes

    @property
    def attribute_bytes_used(self) -> int:
        """Encoded attribute bytes of the live rows (the arena less its garbage and free space)."""
        return self._arena_used - self._arena_garbage

    @property
    def attribute_bytes_held(self) -> int:
        """Bytes of the attribute arena: live attributes, garbage and room to append."""
        return self._arena.nbytes

    def __contains__(self, post_id: int) -> bool:
        return bool(self._lookup.get(np.array([post_id], np.int64))[0] >= 0)

    def rows_of(self, post_ids: np.ndarray) -> np.ndarray:
        """[m] int64 rows of the given ids, -1 where an id is not in the corpus."""
        return self._lookup.get(np.asarray(post_ids, np.int64).reshape(-1))

    def attributes(self, rows: np.ndarray) -> list[Mapping[str, str]]:
        """Decoded attributes of the given rows (read-only; NO_ATTRIBUTES for none or a free row)."""
        rows = np.asarray(rows, np.int64)
        if not self.attribute_bytes_used:  # no row has attributes: not even one gather
            return [NO_ATTRIBUTES] * len(rows)
        lengths = self._attr_len[rows]
        if not lengths.any():  # none of these rows has attributes: no second gather
            return [NO_ATTRIBUTES] * len(rows)
        return _decode(self._arena, self._attr_start[rows], lengths)

    def free_rows(self) -> np.ndarray:
        """[f] int64 rows in [0, used) that hold no item (a copy)."""
        return self._free[: self._n_free].copy()

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.post_ids)

    def columns(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, AttributeColumn]:
        """Copies of (post ids, author ids, attributes) of `rows` (default: the live rows, in row order),
        e.g. to stream a snapshot."""
        rows = self.live_rows() if rows is None else np.asarray(rows, np.int64)
        return self._post_ids[rows], self._author_ids[rows], self.attribute_column(rows)

    def attribute_column(self, rows: np.ndarray) -> AttributeColumn:
        """The encoded attributes of `rows` (a copy; nothing decoded), e.g. a shard's hits."""
        rows = np.asarray(rows, np.int64)
        lengths = self._attr_len[rows].astype(np.int64)
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.zeros(int(offsets[-1]), np.uint8)
        filled = np.flatnonzero(lengths)
        for lo in range(0, len(filled), _GATHER_ROWS):
            which = filled[lo : lo + _GATHER_ROWS]
            block = _gather(self._arena, self._attr_start[rows[which]], lengths[which], sep=False)
            first = int(offsets[which[0]])
            data[first : first + len(block)] = block  # rows without attributes add no bytes in between
        return AttributeColumn(data, offsets)

    # ---- changing --------------------------------------------------------------------------------
    def check(self, delta: Delta) -> None:
        """Raise CorpusGap unless `delta` continues these rows: version + 1, same model, aligned
        columns, upsert ids > 0 and unique."""
        if delta.version != self.version + 1:
            raise CorpusGap(f"delta to version {delta.version} does not follow corpus version {self.version}")
        if delta.fingerprint != self.fingerprint:
            raise CorpusGap(
                f"delta of model {delta.fingerprint!r} for a corpus of model {self.fingerprint!r}"
            )
        ups = delta.upsert_post_ids
        u = ups.shape[0] if ups.ndim == 1 else -1
        if (
            u < 0
            or delta.upsert_author_ids.shape != (u,)
            or delta.upsert_embeddings.shape != (u, self.dim)
            or len(delta.upsert_attributes) != u
            or delta.deleted_post_ids.ndim != 1
        ):
            raise CorpusGap(
                f"misaligned delta rows: post ids {tuple(ups.shape)}, author ids "
                f"{tuple(delta.upsert_author_ids.shape)}, embeddings {tuple(delta.upsert_embeddings.shape)} "
                f"(D={self.dim}), {len(delta.upsert_attributes)} attribute maps, deleted ids "
                f"{tuple(delta.deleted_post_ids.shape)}"
            )
        _check_ids(ups, "delta upserts")
        if u > 1 and len(np.unique(ups)) != u:
            raise CorpusGap("duplicate post ids in delta upserts")

    def rows_needed(self, delta: Delta) -> int:
        """`used` after applying `delta` (the owner grows its embeddings to this many rows first)."""
        new = int((self.rows_of(delta.upsert_post_ids) < 0).sum())
        return self._used + max(0, new - self._n_free)

    def apply(self, delta: Delta) -> np.ndarray:
        """Apply `delta` (upserts, then deletes) and return the rows of its upserts, aligned with
        delta.upsert_post_ids: the owner writes delta.upsert_embeddings there. An existing id keeps
        its row; a new one takes a free row, else a new one at the end. Raises CorpusGap, changing
        nothing, when the delta does not continue these rows."""
        self.check(delta)
        ups = np.asarray(delta.upsert_post_ids, np.int64)
        rows = self.rows_of(ups)
        new = np.flatnonzero(rows < 0)
        reused = min(len(new), self._n_free)
        fresh = len(new) - reused
        deleted = np.unique(np.asarray(delta.deleted_post_ids, np.int64))
        encoded = [encode_attributes(a) for a in delta.upsert_attributes]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        # Everything that allocates comes before the first change.
        self._reserve_rows(self._used + fresh)
        self._reserve_free(self._n_free - reused + len(deleted))
        self._reserve_arena(int(lengths.sum()))

        if reused:
            rows[new[:reused]] = self._free[self._n_free - reused : self._n_free][::-1]
            self._n_free -= reused
        rows[new[reused:]] = np.arange(self._used, self._used + fresh)
        self._used += fresh
        self._post_ids[rows] = ups
        self._author_ids[rows] = delta.upsert_author_ids
        self._write_attributes(rows, encoded, lengths)
        self._live += len(new)
        if len(new):
            self._lookup.set(ups[new], rows[new])

        gone = self.rows_of(deleted)
        found = gone >= 0
        if found.any():
            gone = gone[found]
            self._post_ids[gone] = 0
            self._author_ids[gone] = 0
            self._arena_garbage += int(self._attr_len[gone].sum())
            self._attr_len[gone] = 0
            self._free[self._n_free : self._n_free + len(gone)] = gone
            self._n_free += len(gone)
            self._live -= len(gone)
            self._lookup.set(deleted[found], np.full(len(gone), -1, np.int64))
        self.version = delta.version
        if self._arena_garbage > max(_ARENA_GARBAGE_FLOOR, self.attribute_bytes_used // 4):
            self._compact_arena()
        return rows

    def compact(self) -> np.ndarray:
        """Drop the free rows: live rows move to [0, size) in their order. Returns the old row of each
        new row; the owner does `matrix = matrix[kept]`."""
        kept = self.live_rows()
        post_ids, author_ids, column = self.columns(kept)
        fresh = CorpusRows.from_columns(
            self.version, self.fingerprint, self.dim, post_ids, author_ids, column, copy=False
        )
        self.__dict__.update(fresh.__dict__)
        return kept

    # ---- internals ---------------------------------------------------------------------------------
    def _reserve_rows(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = max(needed, self.capacity + self.capacity // _GROWTH, 16)

        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros(cap, a.dtype)
            out[: self._used] = a[: self._used]
            return out

        self._post_ids, self._author_ids = grown(self._post_ids), grown(self._author_ids)
        self._attr_start, self._attr_len = grown(self._attr_start), grown(self._attr_len)

    def _reserve_free(self, needed: int) -> None:
        if needed > len(self._free):
            out = np.zeros(max(needed, len(self._free) + len(self._free) // _GROWTH, 16), np.int64)
            out[: self._n_free] = self._free[: self._n_free]
            self._free = out

    def _reserve_arena(self, extra: int) -> None:
        needed = self._arena_used + extra
        if needed > len(self._arena) or (extra and not self._arena.flags.writeable):
            out = np.zeros(max(needed, len(self._arena) + len(self._arena) // _GROWTH, 1 << 16), np.uint8)
            out[: self._arena_used] = self._arena[: self._arena_used]
            self._arena = out

    def _write_attributes(self, rows: np.ndarray, encoded: list[bytes], lengths: np.ndarray) -> None:
        self._arena_garbage += int(self._attr_len[rows].sum())
        blob = b"".join(encoded)
        at = self._arena_used
        self._arena[at : at + len(blob)] = np.frombuffer(blob, np.uint8)
        self._attr_start[rows] = at + np.cumsum(lengths) - lengths
        self._attr_len[rows] = lengths
        self._arena_used += len(blob)

    def _compact_arena(self) -> None:
        """Rewrite the arena with the live attributes only, in row order."""
        lengths = self._attr_len[: self._used].astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        arena = np.zeros(max(int(lengths.sum()), 1 << 16), np.uint8)
        filled = np.flatnonzero(lengths)
        for lo in range(0, len(filled), _GATHER_ROWS):
            which = filled[lo : lo + _GATHER_ROWS]
            block = _gather(self._arena, self._attr_start[which], lengths[which], sep=False)
            arena[int(starts[which[0]]) : int(starts[which[0]]) + len(block)] = block
        self._attr_start[: self._used] = starts
        self._arena, self._arena_used, self._arena_garbage = arena, int(lengths.sum()), 0
