"""Follows candidate_service's WatchCorpus stream and keeps the index in step with it.

Protocol (protos/twotower/v1/candidate_tower.proto): a snapshot in chunks 0..num_chunks-1, then
deltas with consecutive versions. The previous corpus keeps serving until a snapshot is complete.
On a version gap, a delta of another model or malformed data, the stream is dropped and reopened
asking for a fresh snapshot (known_version 0); when candidate_service goes away, it is reopened with
capped, jittered exponential backoff, asking to continue from the version already held.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import grpc
import numpy as np
import torch
from tqdm import tqdm

from retrieval_gateway import metrics
from retrieval_gateway.index import CorpusGap, CorpusIndex
from retrieval_gateway.sharding import ShardFilter
from shared import codec
from shared.channels import balanced_options
from shared.corpus_rows import AttributeColumn, AttributeColumnBuilder, Delta
from shared.errors import InvalidInput
from shared.progress import progress_bar
from shared.tls import ClientTLS, aio_channel
from twotower.v1 import candidate_tower_pb2, candidate_tower_pb2_grpc, common_pb2

logger = logging.getLogger(__name__)
_CANDIDATE_SERVICE = candidate_tower_pb2.DESCRIPTOR.services_by_name["CandidateTower"].full_name

_FLOATS = (common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_BFLOAT16, common_pb2.DTYPE_FLOAT16)
_INT64 = (common_pb2.DTYPE_INT64,)


class SnapshotAssembler:
    """Collects the chunks of one snapshot into preallocated buffers, in the form the index keeps:
    embeddings staged in the index's dtype (a bf16 index never holds an fp32 copy of the corpus) and
    attributes encoded chunk by chunk (never one Python dict per item)."""

    def __init__(
        self, first: candidate_tower_pb2.SnapshotChunk, max_items: int, dtype: torch.dtype = torch.float32,
        shard: ShardFilter | None = None,
    ) -> None:  # fmt: skip
        if first.chunk_index != 0 or first.num_chunks < 1:
            raise CorpusGap(f"snapshot starts at chunk {first.chunk_index} of {first.num_chunks}")
        if first.total_items > max_items:
            raise CorpusGap(f"snapshot of {first.total_items} items exceeds max_corpus_items={max_items}")
        self.head = first
        self.total = first.total_items  # rows on the wire
        self.dtype = dtype
        # A shard keeps only its own rows: how many is known at the end, so rows are kept per chunk and
        # joined once complete (a shard's peak is twice its own share, never the whole corpus).
        self.shard = shard if shard is not None and shard.count > 1 else None
        kept = 0 if self.shard is not None else self.total
        self.filled = 0  # rows received (a shard stores only its own)
        self.next_chunk = 0
        self.post_ids = np.zeros(kept, np.int64)
        self.author_ids = np.zeros(kept, np.int64)
        self._attributes = AttributeColumnBuilder(None if self.shard is not None else self.total)
        self.embeddings: torch.Tensor | None = None  # [kept, D] in `dtype`, allocated from the first rows
        self._parts: list[tuple[np.ndarray, np.ndarray, torch.Tensor]] = []  # a shard's chunks

    def add(self, chunk: candidate_tower_pb2.SnapshotChunk) -> bool:
        """Add the next chunk; True when the snapshot is complete."""
        h = self.head
        if (chunk.chunk_index, chunk.version, chunk.fingerprint, chunk.num_chunks, chunk.total_items) != (
            self.next_chunk, h.version, h.fingerprint, h.num_chunks, h.total_items
        ):  # fmt: skip
            raise CorpusGap(f"snapshot chunk {chunk.chunk_index} (v{chunk.version}) out of sequence")
        posts = codec.decode_numpy(chunk.post_ids, "snapshot.post_ids", _INT64, shape=(None,))
        n = posts.shape[0]
        authors = codec.decode_numpy(chunk.author_ids, "snapshot.author_ids", _INT64, shape=(n,))
        if n == 0 and not chunk.HasField("embeddings"):
            emb = torch.empty(0, self.embeddings.shape[1] if self.embeddings is not None else 0)
        else:
            emb = codec.decode_torch(chunk.embeddings, "snapshot.embeddings", _FLOATS, shape=(n, None))
        if len(chunk.attributes) != n or self.filled + n > self.total:
            raise CorpusGap(f"snapshot chunk {chunk.chunk_index}: {n} rows do not fit the announced total")
        if self.embeddings is None:
            self.embeddings = torch.empty(
                self.total if self.shard is None else 0, emb.shape[1], dtype=self.dtype
            )
        elif emb.shape[1] != self.embeddings.shape[1]:
            raise CorpusGap(f"snapshot chunk {chunk.chunk_index}: width {emb.shape[1]} changed")
        attributes = chunk.attributes
        if self.shard is not None:
            mine = self.shard.mask(posts)
            rows = np.flatnonzero(mine)
            posts, authors, emb = posts[mine], authors[mine], emb[torch.from_numpy(rows)]
            attributes = [attributes[i] for i in rows.tolist()]
            self._parts.append((posts, authors, emb.to(self.dtype)))
        else:
            sl = slice(self.filled, self.filled + n)
            self.post_ids[sl], self.author_ids[sl], self.embeddings[sl] = posts, authors, emb.to(self.dtype)
        self._attributes.extend(dict(a.attributes) if a.attributes else None for a in attributes)
        self.filled += n
        self.next_chunk += 1
        if self.next_chunk == h.num_chunks:
            if self.filled != self.total:
                raise CorpusGap(f"snapshot ended with {self.filled} of {self.total} items")
            if self.shard is not None:
                self._join_parts()
            return True
        return False

    def _join_parts(self) -> None:
        parts, self._parts = self._parts, []
        if parts:
            self.post_ids = np.concatenate([p[0] for p in parts])
            self.author_ids = np.concatenate([p[1] for p in parts])
            self.embeddings = torch.cat([p[2] for p in parts])

    def attributes(self) -> AttributeColumn:
        """The encoded attributes of the complete snapshot (once: the builder lets go of them)."""
        return self._attributes.finish()


def _shard_delta(delta: Delta, shard: ShardFilter) -> Delta:
    """The part of a delta that concerns one shard (its version and fingerprint are the corpus's)."""
    up = shard.mask(delta.upsert_post_ids)
    rows = np.flatnonzero(up).tolist()
    return Delta(
        delta.version, delta.fingerprint, delta.upsert_post_ids[up], delta.upsert_author_ids[up],
        delta.upsert_embeddings[up], [delta.upsert_attributes[i] for i in rows],
        delta.deleted_post_ids[shard.mask(delta.deleted_post_ids)],
    )  # fmt: skip


def _delta_rows(delta: candidate_tower_pb2.CorpusDelta, dim: int) -> Delta:
    """The wire delta as the shared Delta type, embeddings widened to float32; unset tensors (a
    delete-only or upsert-only delta) are empty. Shape and finiteness are checked here; versions and
    ids by CorpusRows.check when it is applied."""
    empty = np.empty(0, np.int64)
    posts = authors = empty
    emb = np.empty((0, dim), np.float32)
    if delta.HasField("upsert_post_ids"):
        posts = codec.decode_numpy(delta.upsert_post_ids, "delta.upsert_post_ids", _INT64, shape=(None,))
        n = posts.shape[0]
        authors = codec.decode_numpy(delta.upsert_author_ids, "delta.upsert_author_ids", _INT64, shape=(n,))
        emb = codec.decode_numpy(delta.upsert_embeddings, "delta.upsert_embeddings", _FLOATS, shape=(n, dim))
        emb = emb.astype(np.float32, copy=False)
    deleted = empty
    if delta.HasField("deleted_post_ids"):
        deleted = codec.decode_numpy(delta.deleted_post_ids, "delta.deleted_post_ids", _INT64, shape=(None,))
    attrs = [dict(a.attributes) for a in delta.upsert_attributes]
    return Delta(delta.version, delta.fingerprint, posts, authors, emb, attrs, deleted)


class CorpusFollower:
    def __init__(
        self,
        address: str,
        index: CorpusIndex,
        channel_options: list[tuple[str, int]],
        *,
        max_corpus_items: int,
        backoff_initial_s: float,
        backoff_max_s: float,
        on_change: Callable[[], None] = lambda: None,
        tls: ClientTLS | None = None,
        shard: ShardFilter | None = None,
    ) -> None:
        self.address = address
        self.shard = shard if shard is not None and shard.count > 1 else None  # None: every item
        self._tls = tls  # None = plaintext
        self.index = index
        # grpc's own reconnect backoff grows to 120 s by default: cap it at ours so that a restarted
        # candidate_service is found within reconnect_max_s, not minutes later.
        cap_ms = int(backoff_max_s * 1000)
        self._options = [
            *channel_options,
            ("grpc.initial_reconnect_backoff_ms", min(1000, cap_ms)),
            ("grpc.min_reconnect_backoff_ms", min(1000, cap_ms)),
            ("grpc.max_reconnect_backoff_ms", cap_ms),
            # the corpus stream is one long call: round_robin only spreads the gateways of a target
            # that names several candidate_service replicas (there is one writer of record)
            *balanced_options(_CANDIDATE_SERVICE, health_check=False),
        ]
        self._max_items = max_corpus_items
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._on_change = on_change
        self.connected = False  # currently receiving a stream
        self.errors = 0  # unexpected failures (not stream breaks or gaps), each followed by a resync
        self.last_error = ""
        self._assembler: SnapshotAssembler | None = None
        self._snapshot_bar: tqdm | None = None  # progress of the snapshot being received and loaded

    async def run(self) -> None:
        """Follow until cancelled. Every failure, expected or not, ends in a resync with backoff: the
        gateway keeps serving its last good corpus meanwhile, and never believes it is connected
        while it is not (a dead stream must never look like a quiet one)."""
        failures = 0
        fresh = False  # True after a gap or an unexpected error: ask for a new snapshot, not deltas
        try:
            async with aio_channel(self.address, self._options, self._tls) as channel:
                stub = candidate_tower_pb2_grpc.CandidateTowerStub(channel)
                while True:
                    ok, fresh, reason = await self._follow_once(stub, fresh)
                    failures = 0 if ok else failures + 1
                    self.disconnected(reason)
                    await asyncio.sleep(self._delay(max(failures, 1)))
        finally:
            self.disconnected(None)

    async def _follow_once(self, stub, fresh: bool) -> tuple[bool, bool, str]:
        """One WatchCorpus stream until it breaks. Returns (received anything, ask fresh, reason)."""
        info = self.index.info()
        request = candidate_tower_pb2.WatchCorpusRequest()
        if info is not None and not fresh:
            request.known_version, request.known_fingerprint = info.version, info.fingerprint
        call = stub.WatchCorpus(request)
        self._assembler = None
        received = False
        try:
            # The server sends its headers as soon as it accepts the stream: connected from here,
            # even when no event follows for a while (a resumed watcher that is up to date). A call
            # that failed first (server down) also returns from initial_metadata(), with no headers:
            # that is not a connection, and the loop below raises its error.
            await call.initial_metadata()
            if not call.done():
                self._connected(request.known_version)
                received = True
            async for event in call:
                await self._handle(event)
            return received, False, "stream ended"
        except (CorpusGap, InvalidInput) as exc:
            logger.warning(
                "corpus stream from %s unusable (%s); asking for a fresh snapshot", self.address, exc
            )
            return received, True, "gap"
        except grpc.aio.AioRpcError as exc:
            log = logger.warning if self.connected else logger.debug
            log("corpus stream from %s: %s %s", self.address, exc.code().name, exc.details())
            return received, False, exc.code().name
        except Exception as exc:  # a bug, a MemoryError, a CUDA OOM while loading: resync, never die
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            metrics.FOLLOWER_ERRORS.labels(type(exc).__name__).inc()
            logger.exception("corpus follower failed on the stream from %s; resyncing", self.address)
            return False, True, "error"
        finally:
            call.cancel()
            self._assembler = None
            self._drop_snapshot_progress()

    def disconnected(self, reason: str | None) -> None:
        """Not receiving a stream (also called by the supervisor when the follower task crashed)."""
        self.connected = False
        metrics.CANDIDATE_CONNECTED.set(0)
        if reason is not None:
            metrics.RECONNECTS.labels(reason).inc()

    def _connected(self, known_version: int) -> None:
        if not self.connected:
            logger.info("watching corpus at %s from v%d", self.address, known_version)
        self.connected = True
        metrics.CANDIDATE_CONNECTED.set(1)

    def _delay(self, failures: int) -> float:
        """Exponential, capped, half-jittered so that many gateways do not reconnect in lockstep."""
        initial, cap = self._backoff
        base = min(cap, initial * 2 ** min(failures - 1, 30))
        return base / 2 + random.uniform(0, base / 2)

    async def _handle(self, event: candidate_tower_pb2.CorpusEvent) -> bool:
        """Apply one event. Returns False (no fresh snapshot needed) or raises CorpusGap."""
        kind = event.WhichOneof("event")
        if kind == "snapshot_chunk":
            chunk = event.snapshot_chunk
            if chunk.chunk_index == 0:
                self._assembler = SnapshotAssembler(chunk, self._max_items, self.index.dtype, self.shard)
                self._start_snapshot_progress(chunk)
            elif self._assembler is None:
                raise CorpusGap(f"snapshot chunk {chunk.chunk_index} without chunk 0")
            a = self._assembler
            # Decoding and copying a chunk (up to the message size) off the loop: Retrieve calls keep
            # being answered from the current corpus while a large snapshot streams in.
            complete = await asyncio.to_thread(a.add, chunk)
            if self._snapshot_bar is not None:
                self._snapshot_bar.update(len(chunk.attributes))  # the chunk's rows, now staged
            if complete:
                self._assembler = None
                h = a.head
                emb = a.embeddings if a.embeddings is not None else torch.empty(0, _dim_of(chunk))
                args = (h.version, h.fingerprint, a.post_ids, a.author_ids, emb, a.attributes())
                del a  # the index adopts the buffers (copy=False): a snapshot is never held twice
                await asyncio.to_thread(self.index.load_snapshot, *args, copy=False)
                self._end_snapshot_progress()
                metrics.SNAPSHOTS.inc()
                self._on_change()
        elif kind == "delta":
            if self._assembler is not None:
                raise CorpusGap("delta in the middle of a snapshot")
            info = self.index.info()
            if info is None:
                raise CorpusGap("delta before any snapshot")
            delta = event.delta
            await asyncio.to_thread(self._apply_delta, delta, info.dim)
            metrics.DELTAS.inc()
            self._on_change()
        else:
            raise CorpusGap(f"unknown corpus event {kind!r}")
        return False

    def _start_snapshot_progress(self, head: candidate_tower_pb2.SnapshotChunk) -> None:
        """A progress line every few seconds while a snapshot streams in (a large one takes a while),
        and one when the index serves it, with the count, rate and time left."""
        self._drop_snapshot_progress()
        self._snapshot_bar = progress_bar(
            head.total_items, f"snapshot v{head.version} ({head.fingerprint})", unit="item", logger=logger,
            live=False,
        )  # fmt: skip

    def _end_snapshot_progress(self) -> None:
        bar, self._snapshot_bar = self._snapshot_bar, None
        if bar is not None:
            bar.set_postfix_str("loaded into the index", refresh=False)
            bar.close()

    def _drop_snapshot_progress(self) -> None:
        """A snapshot given up (a gap, a broken stream, a newer snapshot) ends its progress silently:
        the reason is logged on its own."""
        bar, self._snapshot_bar = self._snapshot_bar, None
        if bar is not None:
            bar.leave = False  # tqdm then clears the bar instead of writing a last line
            bar.close()

    def _apply_delta(self, delta: candidate_tower_pb2.CorpusDelta, dim: int) -> None:
        rows = _delta_rows(delta, dim)
        self.index.apply_delta(rows if self.shard is None else _shard_delta(rows, self.shard))


def _dim_of(chunk: candidate_tower_pb2.SnapshotChunk) -> int:
    """D of an empty snapshot, from its [0, D] embeddings tensor (0 when not even that is sent)."""
    shape = list(chunk.embeddings.shape)
    return int(shape[1]) if len(shape) == 2 else 0
