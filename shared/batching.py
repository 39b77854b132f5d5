"""Dynamic micro-batching: coalesce concurrent requests into one call of a batch function.

Callers `await batcher.submit(item, deadline)`; a single worker collects up to `max_batch_size` items,
waiting at most `max_wait_s` after the first, drops items whose deadline passed or whose caller left,
and runs `process(items)` on a worker thread (off the event loop), or awaits it when `process` is a
coroutine function (I/O such as one RPC for the whole batch). With `max_wait_s = 0` batches still form
under load: requests queue while the previous batch computes, and the next batch takes them all.
The queue is bounded: when full, `submit` raises Overloaded at once instead of letting latency and
memory grow without bound.

`max_in_flight` batches may be processed at once (default 1). For an I/O batch function (one RPC per
batch) more than one lets the next batch leave while a slow or stalled peer still holds the previous
one, and lets one caller keep several replicas busy; the worker collects the next batch only once a
slot is free, so batches grow while every slot is busy.

`linger()` (optional) says how long a batch may stay open, beyond `max_wait_s`, for work known to be
on its way: the gateway's scorer waits a little for requests still in the user-encoding stage, so that
concurrent requests do not split into cohorts that alternate small batches on an expensive matmul.
No grpc import: services map the errors through the interceptor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shared.errors import DeadlineExpired, NotReady, Overloaded

logger = logging.getLogger(__name__)

LINGER_POLL_S = 0.002  # how often a lingering batch re-reads linger()

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchReport:
    size: int  # items computed together
    queue_wait_s: float  # oldest item's wait before compute started
    compute_s: float  # time in `process`


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    expired: int = 0
    rejected: int = 0
    sizes: list[int] = field(default_factory=list, repr=False)  # last 1024 batch sizes

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued: float
    deadline: float | None  # loop.time() after which the result is useless


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R | BaseException] | Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch_size: int = 64,
        max_wait_s: float = 0.002,
        max_queue: int = 1024,
        on_batch: Callable[[BatchReport], None] | None = None,
        name: str = "batcher",
        max_in_flight: int = 1,
        linger: Callable[[], float] | None = None,
    ) -> None:
        """`process` gets 1..max_batch_size items and returns one result per item, in order; a result
        that is an exception instance fails only that item's caller."""
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0 or max_in_flight < 1:
            raise ValueError("max_batch_size, max_queue and max_in_flight must be >= 1, max_wait_s >= 0")
        self._process = process
        self._process_is_async = inspect.iscoroutinefunction(process)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._name = name
        self.max_in_flight = max_in_flight
        self._linger = linger  # seconds a batch may stay open beyond max_wait_s (see _collect)
        self._queue: asyncio.Queue[_Pending[T]] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()  # batches being processed (failed if stopped mid-way)
        self._inflight: dict[asyncio.Task, list[_Pending[T]]] = {}
        self._collecting: list[_Pending[T]] = []
        self.worker_restarts = 0  # the collecting loop hit an unexpected error and was restarted
        self.stats = BatchStats()

    @property
    def batches_in_flight(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue else 0

    def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._worker is not None:
            return
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_in_flight, thread_name_prefix=self._name
        )
        self._worker = asyncio.get_running_loop().create_task(self._supervise(), name=self._name)

    async def stop(self) -> None:
        """Stop the worker; queued callers get NotReady."""
        if self._worker is None:
            return
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None
        # before done callbacks run; with the batch being collected, if any
        leftovers = [*self._collecting, *(p for batch in self._inflight.values() for p in batch)]
        self._collecting = []
        running = list(self._running)
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert self._queue is not None
        while not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
        for pending in leftovers:
            if not pending.future.done():
                pending.future.set_exception(NotReady(f"{self._name} is shutting down"))
        self._inflight = {}
        self._running = set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)  # never block the event loop
            self._executor = None

    async def submit(self, item: T, deadline: float | None = None) -> R:
        """Queue `item` and wait for its result. `deadline` is in `loop.time()` seconds."""
        if self._queue is None or self._worker is None:
            raise NotReady(f"{self._name} is not running")
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future(), loop.time(), deadline)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            self.stats.rejected += 1
            raise Overloaded(f"{self._name}: {self.max_queue} requests already queued; retry later") from None
        return await pending.future  # cancelled by the caller: the worker skips it

    async def _collect(self) -> list[_Pending[T]]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        # Taken off the queue but not yet a batch: kept where stop() and a restart can fail them
        # (a cancelled or failed collection must not leave its callers waiting for ever).
        batch = self._collecting = [await self._queue.get()]
        opened = loop.time()
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            # `linger` may hold the batch open longer while more work is known to be on its way (e.g.
            # requests still in the stage before this one); it is re-read after every arrival and every
            # LINGER_POLL_S, since what is on its way changes while the batch waits.
            lingering = self._linger() if self._linger is not None else 0.0
            remaining = opened + max(self.max_wait_s, lingering) - loop.time()
            if remaining <= 0:
                break
            step = remaining if lingering <= self.max_wait_s else min(remaining, LINGER_POLL_S)
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), step))
            except TimeoutError:
                if step >= remaining:
                    break
        return batch

    def _live(self, batch: list[_Pending[T]], now: float) -> list[_Pending[T]]:
        live = []
        for pending in batch:
            if pending.future.done():  # caller cancelled (e.g. client went away)
                continue
            if pending.deadline is not None and now >= pending.deadline:
                self.stats.expired += 1
                pending.future.set_exception(DeadlineExpired("deadline passed while queued; not computed"))
                continue
            live.append(pending)
        return live

    async def _supervise(self) -> None:
        """The collecting loop, restarted if it ever fails (a bug must not silently stop all batching)."""
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.worker_restarts += 1
                logger.exception("%s: batching loop failed; restarting it", self._name)
                for pending in self._collecting:  # their batch never formed: fail them, not hang
                    if not pending.future.done():
                        pending.future.set_exception(NotReady(f"{self._name} failed ({exc!r}); retry"))
                self._collecting = []
                await asyncio.sleep(0.01)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._slots is not None
        while True:
            # Take a slot first: while every slot is busy, arrivals wait in the queue and form the
            # next (larger) batch instead of a queue of small ones.
            await self._slots.acquire()
            try:
                collected = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            batch = self._live(collected, loop.time())
            if not batch:
                self._collecting = []
                self._slots.release()
                continue
            task = loop.create_task(self._execute(batch), name=f"{self._name}-batch")
            self._running.add(task)
            self._inflight[task] = batch  # from here stop() finds them there
            self._collecting = []
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._inflight.pop(task, None)
        if self._slots is not None:
            self._slots.release()
        if not task.cancelled() and task.exception() is not None:  # _execute catches; belt and braces
            logger.error("%s: batch task failed: %r", self._name, task.exception())

    async def _execute(self, batch: list[_Pending[T]]) -> None:
        loop = asyncio.get_running_loop()
        items = [p.item for p in batch]
        started = loop.time()
        t0 = time.perf_counter()
        try:
            if self._process_is_async:
                results = await self._process(items)
            else:
                results = await loop.run_in_executor(self._executor, self._process, items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as exc:  # the whole batch failed: every caller gets the error
            logger.exception("%s: batch of %d failed", self._name, len(items))
            results = [exc] * len(items)
        compute_s = time.perf_counter() - t0
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
        self.stats.batches += 1
        self.stats.items += len(items)
        self.stats.sizes = [*self.stats.sizes[-1023:], len(items)]
        if self._on_batch is not None:
            self._on_batch(BatchReport(len(items), started - batch[0].enqueued, compute_s))
