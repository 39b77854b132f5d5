"""Fan-out of corpus deltas to any number of watchers (no grpc). Event-loop only: no locks.

The hub keeps a bounded ring of recent deltas (so a watcher that was briefly away resumes with deltas
instead of a snapshot) and one bounded queue per watcher. Publishing never waits: a watcher whose queue
is full is marked overflowed and its queue dropped; it then needs a fresh snapshot. A slow watcher
therefore costs the writers and the other watchers nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque

from candidate_service.store import Delta


class Watcher:
    def __init__(self, max_queued: int) -> None:
        self._queue: deque[Delta] = deque()
        self._max = max_queued
        self._wakeup = asyncio.Event()
        self.overflowed = False
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
        """The next delta; None once overflowed (the caller sends a fresh snapshot and resets) or closed."""
        while not self._queue and not self.overflowed and not self.closed:
            self._wakeup.clear()
            await self._wakeup.wait()
        return None if self.overflowed or self.closed else self._queue.popleft()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()

    def reset(self) -> None:
        """Start over after a fresh snapshot: deltas queued from now on are kept (those the snapshot
        already contains are skipped by version)."""
        self.overflowed = False


class WatchHub:
    def __init__(self, version: int, ring_size: int, max_queued: int) -> None:
        self.version = version  # last published version
        self._ring: deque[Delta] = deque(maxlen=ring_size)
        self._watchers: set[Watcher] = set()
        self._max_queued = max_queued

    @property
    def num_watchers(self) -> int:
        return len(self._watchers)

    def seed(self, deltas: list[Delta]) -> None:
        """Deltas replayed from the log at start, so watchers can resume across a restart."""
        for delta in deltas:
            self._ring.append(delta)
            self.version = delta.version

    def publish(self, delta: Delta) -> None:
        if delta.version != self.version + 1:
            raise ValueError(f"delta {delta.version} published after version {self.version}")
        self._ring.append(delta)
        self.version = delta.version
        for watcher in self._watchers:
            watcher.offer(delta)

    def deltas_after(self, version: int) -> list[Delta] | None:
        """Every delta after `version` if the ring still has them all, else None (a snapshot is needed)."""
        if version == self.version:
            return []
        if version > self.version or not self._ring or self._ring[0].version > version + 1:
            return None
        return [d for d in self._ring if d.version > version]

    def register(self) -> Watcher:
        watcher = Watcher(self._max_queued)
        self._watchers.add(watcher)
        return watcher

    def unregister(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def close(self) -> None:
        """End every watch stream (shutdown): they finish cleanly instead of waiting out the grace period."""
        for watcher in self._watchers:
            watcher.close()
