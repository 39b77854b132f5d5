import asyncio
import threading
import time

import pytest

from shared.batching import MicroBatcher
from shared.errors import DeadlineExpired, InvalidInput, NotReady, Overloaded


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_concurrent_calls_are_coalesced_and_each_gets_its_row():
    seen = []

    def process(items):
        seen.append(len(items))
        time.sleep(0.01)
        return [x * 10 for x in items]

    async def main():
        batcher = MicroBatcher(process, max_batch_size=16, max_wait_s=0.05)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(40)))
        await batcher.stop()
        return results, batcher.stats

    results, stats = run(main())
    assert results == [i * 10 for i in range(40)]
    assert max(seen) == 16 and sum(seen) == 40 and stats.mean_batch_size > 1


def test_work_runs_off_the_event_loop():
    loop_threads = []

    def process(items):
        loop_threads.append(threading.current_thread().name)
        return items

    async def main():
        batcher = MicroBatcher(process, name="probe")
        batcher.start()
        await batcher.submit(1)
        await batcher.stop()

    run(main())
    assert loop_threads[0].startswith("probe")


def test_bad_item_fails_only_its_caller():
    def process(items):
        return [InvalidInput(f"bad {x}") if x < 0 else x for x in items]

    async def main():
        batcher = MicroBatcher(process, max_wait_s=0.02)
        batcher.start()
        out = await asyncio.gather(
            batcher.submit(1), batcher.submit(-1), batcher.submit(2), return_exceptions=True
        )
        await batcher.stop()
        return out

    ok1, bad, ok2 = run(main())
    assert (ok1, ok2) == (1, 2) and isinstance(bad, InvalidInput)


def test_whole_batch_failure_reaches_every_caller():
    def process(items):
        raise RuntimeError("boom")

    async def main():
        batcher = MicroBatcher(process, max_wait_s=0.02)
        batcher.start()
        out = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        await batcher.stop()
        return out

    assert all(isinstance(e, RuntimeError) for e in run(main()))


def test_full_queue_rejects_at_once():
    release = threading.Event()

    def process(items):
        release.wait(5)
        return items

    async def main():
        batcher = MicroBatcher(process, max_batch_size=1, max_wait_s=0, max_queue=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # worker is now blocked on item 0
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        with pytest.raises(Overloaded, match="2 requests already queued"):
            await batcher.submit(3)
        assert time.perf_counter() - t0 < 0.5
        release.set()
        assert await asyncio.gather(first, *queued) == [0, 1, 2]
        assert batcher.stats.rejected == 1
        await batcher.stop()

    run(main())


def test_expired_deadline_is_dropped_before_compute():
    computed = []
    release = threading.Event()

    def process(items):
        release.wait(5)
        computed.extend(items)
        return items

    async def main():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(process, max_batch_size=1, max_wait_s=0)
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit("blocker"))
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(batcher.submit("late", deadline=loop.time() + 0.05))
        await asyncio.sleep(0.1)  # its deadline passes while the worker is busy
        release.set()
        await blocker
        with pytest.raises(DeadlineExpired):
            await late
        await batcher.stop()
        return batcher.stats

    stats = run(main())
    assert computed == ["blocker"] and stats.expired == 1


def test_not_started_and_stopped_raise_not_ready():
    async def main():
        batcher = MicroBatcher(lambda items: items)
        with pytest.raises(NotReady):
            await batcher.submit(1)
        batcher.start()
        await batcher.stop()
        with pytest.raises(NotReady):
            await batcher.submit(1)

    run(main())


def test_stop_mid_batch_fails_waiting_callers_instead_of_hanging():
    release = threading.Event()

    def process(items):
        release.wait(2)
        return items

    async def main():
        batcher = MicroBatcher(process, max_batch_size=1, max_wait_s=0)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(1))
        queued = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.05)
        release.set()
        await stopping
        out = await asyncio.gather(running, queued, return_exceptions=True)
        assert all(isinstance(e, NotReady) for e in out)

    run(main())


def test_async_batch_function_is_awaited_on_the_loop():
    calls = []

    async def process(items):
        calls.append((len(items), threading.current_thread() is threading.main_thread()))
        await asyncio.sleep(0.01)
        return [x + 1 for x in items]

    async def main():
        batcher = MicroBatcher(process, max_batch_size=8, max_wait_s=0)
        batcher.start()
        first = await batcher.submit(0)  # alone: nothing else queued
        rest = await asyncio.gather(*(batcher.submit(i) for i in range(1, 9)))
        await batcher.stop()
        return first, rest

    first, rest = run(main())
    assert first == 1 and rest == list(range(2, 10))
    assert all(on_main for _, on_main in calls) and max(n for n, _ in calls) > 1


def test_with_two_batches_in_flight_a_stalled_batch_does_not_block_the_next():
    stall = asyncio.Event()

    async def process(items):
        if "stalled" in items:
            await stall.wait()
        return [f"{x}!" for x in items]

    async def main():
        batcher = MicroBatcher(process, max_batch_size=4, max_wait_s=0, max_in_flight=2)
        batcher.start()
        stuck = asyncio.ensure_future(batcher.submit("stalled"))
        await asyncio.sleep(0.01)
        assert await asyncio.wait_for(batcher.submit("next"), 2) == "next!"
        assert batcher.batches_in_flight == 1 and not stuck.done()
        stall.set()
        assert await stuck == "stalled!"
        await batcher.stop()

    run(main())


def test_with_every_slot_busy_arrivals_form_one_batch():
    gate = asyncio.Event()
    sizes = []

    async def process(items):
        sizes.append(len(items))
        await gate.wait()
        return items

    async def main():
        batcher = MicroBatcher(process, max_batch_size=8, max_wait_s=0, max_in_flight=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        gate.set()
        assert await asyncio.gather(first, *rest) == list(range(6))
        await batcher.stop()

    run(main())
    assert sizes == [1, 5]


def test_linger_holds_a_batch_open_while_more_work_is_on_its_way():
    upstream = {"busy": True}
    sizes = []

    def process(items):
        sizes.append(len(items))
        return items

    async def main():
        batcher = MicroBatcher(
            process, max_batch_size=8, max_wait_s=0, linger=lambda: 5.0 if upstream["busy"] else 0.0
        )
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # without linger, 0 would be computed alone by now
        late = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        assert not first.done()
        last = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0.05)  # 3 joins the open batch (setting busy first would race its arrival
        assert not first.done()  # against the batcher's next re-read of linger, every LINGER_POLL_S)
        upstream["busy"] = False  # nothing more on its way: the batch closes at the next re-read
        assert await asyncio.wait_for(asyncio.gather(first, *late, last), 2) == [0, 1, 2, 3]
        alone = await asyncio.wait_for(batcher.submit(4), 2)  # nothing upstream: no wait at all
        await batcher.stop()
        return alone

    assert run(main()) == 4
    assert sizes == [4, 1]


def test_stop_while_a_batch_is_lingering_fails_its_callers_instead_of_leaving_them_waiting():
    def process(items):
        return items

    async def main():
        batcher = MicroBatcher(process, max_batch_size=8, max_wait_s=0, linger=lambda: 30.0)
        batcher.start()
        waiting = asyncio.ensure_future(batcher.submit(1))  # taken off the queue, batch held open
        await asyncio.sleep(0.05)
        await batcher.stop()
        return await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 2)

    (outcome,) = run(main())
    assert isinstance(outcome, NotReady)


def test_a_failing_collection_fails_its_callers_and_the_loop_goes_on():
    calls = {"n": 0}

    def linger():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("bug in linger")
        return 0.0

    async def main():
        batcher = MicroBatcher(lambda items: items, max_batch_size=8, max_wait_s=0, linger=linger)
        batcher.start()
        first = await asyncio.wait_for(asyncio.gather(batcher.submit(1), return_exceptions=True), 2)
        second = await asyncio.wait_for(batcher.submit(2), 2)  # the restarted loop serves the next
        await batcher.stop()
        return first[0], second, batcher.worker_restarts

    failed, second, restarts = run(main())
    assert isinstance(failed, NotReady) and second == 2 and restarts == 1
