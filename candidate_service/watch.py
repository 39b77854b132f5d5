"""The WatchCorpus stream (no grpc): fan-out of corpus deltas to a bounded number of watchers.
Event-loop only: no locks.

The hub keeps a bounded ring of recent deltas (so a watcher that was briefly away resumes with deltas
instead of a snapshot) and one bounded queue per watcher. Publishing never waits: a watcher whose queue
is full is marked overflowed and its queue dropped; it then needs a fresh snapshot. A slow watcher
therefore costs the writers and the other watchers nothing. Each stream may cost a full snapshot, so
their number is bounded (`max_watchers`): past it a new stream is refused with Overloaded.

A model rollout `switch`es the hub to the new model's corpus: the ring (deltas of the old model) is
dropped and every open stream gets a snapshot of the new corpus next, then its deltas: watchers
follow the switch on the stream they have, without reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from candidate_service import metrics
from candidate_service.store import CorpusStore, Delta, Snapshot
from shared.errors import Overloaded

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotPart:
    """Rows [lo, hi) of `snapshot`, chunk `index` of `num_chunks`."""

    snapshot: Snapshot
    index: int
    num_chunks: int
    lo: int
    hi: int


@dataclass(frozen=True)
class WatchLimits:
    max_watchers: int  # open streams; one more is refused
    max_queued: int  # deltas queued per watcher before it gets a fresh snapshot instead
    max_resyncs: int  # consecutive fresh snapshots a watcher may need before it is cut off
    chunk_bytes: int  # payload bytes per snapshot chunk


class Watcher:
    def __init__(self, max_queued: int) -> None:
        self._queue: deque[Delta] = deque()
        self._max = max_queued
        self._wakeup = asyncio.Event()
        self.overflowed = False
        self.switched = False  # the corpus changed model: a snapshot of the new one is due
        self.closed = False

    def offer(self, delta: Delta) -> None:
        if self.overflowed:
            return
        if len(self._queue) >= self._max:
            self.overflowed = True
            self._queue.clear()  # everything it would need is in the next snapshot
        else:
            self._queue.append(delta)
        self._wakeup.set()

    def pending(self) -> int:
        return len(self._queue)

    async def next(self) -> Delta | None:
        """The next delta; None once overflowed or switched (the caller sends a fresh snapshot and
        resets) or closed."""
        while not self._queue and not self.overflowed and not self.switched and not self.closed:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self.overflowed or self.switched or self.closed:
            return None
        return self._queue.popleft()

    def switch(self) -> None:
        """The corpus now has another model: the queued deltas (of the old one) are dropped."""
        self._queue.clear()
        self.switched = True
        self._wakeup.set()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()

    def reset(self) -> None:
        """Start over after a fresh snapshot: deltas queued from now on are kept (those the snapshot
        already contains are skipped by version)."""
        self.overflowed = False
        self.switched = False


class WatchHub:
    def __init__(self, corpus: CorpusStore, ring_size: int, limits: WatchLimits) -> None:
        self.corpus = corpus  # what snapshots are taken of (replaced by `switch`)
        self.version = corpus.version  # last published version
        self.limits = limits
        self._ring: deque[Delta] = deque(maxlen=ring_size)
        self._watchers: set[Watcher] = set()

    @property
    def num_watchers(self) -> int:
        return len(self._watchers)

    def publish(self, delta: Delta) -> None:
        if delta.version != self.version + 1:
            raise ValueError(f"delta {delta.version} published after version {self.version}")
        self._ring.append(delta)
        self.version = delta.version
        for watcher in self._watchers:
            watcher.offer(delta)

    def switch(self, corpus: CorpusStore) -> None:
        """Serve another model's corpus from now on (a rollout): every open stream gets its snapshot
        next, then its deltas. The old model's deltas are dropped, so no stream can resume with them."""
        self.corpus = corpus
        self.version = corpus.version
        self._ring.clear()
        for watcher in self._watchers:
            watcher.switch()

    def deltas_after(self, version: int) -> list[Delta] | None:
        """Every delta after `version` if the ring still has them all, else None (a snapshot is needed)."""
        if version == self.version:
            return []
        if version > self.version or not self._ring or self._ring[0].version > version + 1:
            return None
        return [d for d in self._ring if d.version > version]

    def register(self) -> Watcher:
        if len(self._watchers) >= self.limits.max_watchers:
            metrics.WATCHERS_REFUSED.inc()
            raise Overloaded(
                f"{len(self._watchers)} WatchCorpus streams are open, the limit of this candidate_service "
                f"(--max-watchers {self.limits.max_watchers}); retry later"
            )
        watcher = Watcher(self.limits.max_queued)
        self._watchers.add(watcher)
        metrics.WATCHERS.set(len(self._watchers))
        return watcher

    def unregister(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)
        metrics.WATCHERS.set(len(self._watchers))

    def close(self) -> None:
        """End every watch stream (shutdown): they finish cleanly instead of waiting out the grace period."""
        for watcher in self._watchers:
            watcher.close()

    @contextlib.contextmanager
    def watch(
        self, known_version: int, known_fingerprint: str
    ) -> Iterator[AsyncIterator[SnapshotPart | Delta]]:
        """Register a watcher now (Overloaded past the limit, before the caller sends anything) and give
        its events: a snapshot unless the watcher can continue with deltas, then every delta. The
        watcher is unregistered when the block exits, whether or not the events were read."""
        watcher = self.register()  # before deciding, so no delta published from now on is missed
        try:
            yield self._events(watcher, known_version, known_fingerprint)
        finally:
            self.unregister(watcher)

    async def _events(
        self, watcher: Watcher, known_version: int, known_fingerprint: str
    ) -> AsyncIterator[SnapshotPart | Delta]:
        same_model = known_fingerprint == self.corpus.fingerprint
        backlog = self.deltas_after(known_version) if same_model else None
        sent: int | None = None
        if backlog is not None:
            for delta in backlog:
                yield delta
            sent = backlog[-1].version if backlog else known_version
        resyncs = 0
        while True:
            if sent is None:  # a fresh snapshot; deltas queued meanwhile follow it
                if resyncs > self.limits.max_resyncs:
                    raise Overloaded(
                        f"watcher fell behind {resyncs} times in a row; reconnect with known_version"
                    )
                watcher.reset()  # then, with no await between, the corpus of the model serving now
                snap = await asyncio.to_thread(self.corpus.snapshot)
                for part in snapshot_parts(snap, self.limits.chunk_bytes):
                    yield part
                metrics.SNAPSHOTS_SENT.inc()
                sent = snap.version
            delta = await watcher.next()
            if watcher.closed:
                return
            if delta is None:
                if watcher.switched and not watcher.overflowed:  # a rollout, not a slow watcher
                    sent = None
                    continue
                metrics.WATCHER_RESYNCS.inc()
                resyncs, sent = resyncs + 1, None
                continue
            if delta.version <= sent:
                continue  # already in the snapshot
            if delta.version != sent + 1:  # cannot happen by construction; never send a gap
                logger.error("watcher would skip from version %d to %d; resyncing", sent, delta.version)
                sent = None
                continue
            if watcher.pending() == 0:
                resyncs = 0  # caught up
            yield delta
            sent = delta.version


def snapshot_parts(snap: Snapshot, chunk_bytes: int) -> Iterator[SnapshotPart]:
    bounds = snap.chunk_bounds(chunk_bytes)
    for index, (lo, hi) in enumerate(bounds):
        yield SnapshotPart(snap, index, len(bounds), lo, hi)
