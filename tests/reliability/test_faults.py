"""Faults under a steady load (bench.loadgen), every request counted: a tower killed with SIGKILL and
restarted, a new corpus snapshot swapped in, the gateway stopped with SIGTERM.

Each test starts the real services as subprocesses on loopback and drives the gateway with a
closed-loop load while it injects the fault from a worker thread; the outcome of every request is kept
(`harness.Recorder`) and classified by when it ran relative to the fault.
"""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from bench.loadgen import run_load
from tests.reliability.harness import Outcome, Recorder, Stack, pid_alive, wait_until, write_items
from tests.support import health_status
from twotower.v1 import candidate_tower_pb2, candidate_tower_pb2_grpc, common_pb2, retrieval_gateway_pb2
from twotower.v1 import retrieval_gateway_pb2_grpc as gw_grpc

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

CONCURRENCY = 4
# Each call's deadline: long enough that a stall of a busy 2-core runner is not counted as a failure
# (the tests assert zero failures, or UNAVAILABLE only); an outage must fail faster than FAIL_FAST_S.
DEADLINE_S = 10.0
FAIL_FAST_S = 5.0
RECOVER_S = 20.0  # bound on noticing a fault / recovering from it


def _run(coro, timeout: float = 180.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _gateway_status(stack: Stack) -> retrieval_gateway_pb2.GatewayStatus:
    with grpc.insecure_channel(stack.address("gateway")) as ch:
        return gw_grpc.RetrievalGatewayStub(ch).GetStatus(retrieval_gateway_pb2.GetStatusRequest(), timeout=2)


def _all_post_ids(stack: Stack, k: int) -> set[int]:
    with grpc.insecure_channel(stack.address("gateway")) as ch:
        user = common_pb2.UserContext(user_id=5)
        reply = gw_grpc.RetrievalGatewayStub(ch).Retrieve(
            retrieval_gateway_pb2.RetrieveRequest(user=user, k=k), timeout=5
        )
    return {it.post_id for it in reply.items}


def test_user_service_sigkill_unavailable_then_recovers_without_gateway_restart(tmp_path, tiny_checkpoint):
    stack = Stack(tmp_path, tiny_checkpoint, write_items(tmp_path / "items.jsonl", range(1, 201)))
    try:
        stack.start_all()
        gateway_pid = stack.procs["gateway"].pid
        events: dict[str, float] = {}

        def fault() -> None:
            time.sleep(1.0)
            events["kill"] = time.monotonic()
            stack.procs["user"].kill()
            wait_until(lambda: not stack.serving("gateway"), "gateway NOT_SERVING", RECOVER_S)
            events["not_serving"] = time.monotonic()
            time.sleep(1.0)  # stay down a while under load
            events["restart"] = time.monotonic()
            stack.start("user")
            wait_until(lambda: stack.serving("gateway"), "gateway SERVING again", RECOVER_S)
            events["serving"] = time.monotonic()

        async def main() -> Recorder:
            rec = Recorder(stack.address("gateway"), deadline_s=DEADLINE_S)
            try:
                load = asyncio.create_task(
                    run_load(rec.call, concurrency=CONCURRENCY, max_requests=1_000_000, max_seconds=60)
                )
                await asyncio.to_thread(fault)
                load.cancel()  # the phases of interest are over; measure the recovered state below
                await asyncio.gather(load, return_exceptions=True)
                rec.outcomes = [o for o in rec.outcomes if o.end <= time.monotonic()]
                after = await run_load(rec.call, concurrency=CONCURRENCY, max_requests=200, max_seconds=60)
                assert after.errors == {} and after.ok == 200, after.errors
            finally:
                await rec.close()
            return rec

        rec = _run(main())
        before = rec.codes(lambda o: o.end < events["kill"])
        down = rec.codes(lambda o: events["kill"] <= o.start and o.end <= events["restart"])
        failed = [o for o in rec.outcomes if o.code != "OK"]
        print(f"\nuser_service SIGKILL: before {before}, while down {down}, all {rec.codes()}")
        assert set(before) == {"OK"} and before["OK"] > 0
        assert down.get("UNAVAILABLE", 0) > 0  # the outage was seen ...
        assert {o.code for o in failed} == {"UNAVAILABLE"}  # ... as UNAVAILABLE only, never INTERNAL
        assert all(o.end - o.start < FAIL_FAST_S for o in failed)  # fast, not at the deadline
        assert pid_alive(gateway_pid) and stack.procs["gateway"].proc.poll() is None  # never restarted
    finally:
        stack.stop_all()


def _snapshot_versions(rec: Recorder, generations: dict[str, set[int]]) -> dict[int, str]:
    """The generation of every OK response's items, keyed by the version it reported; a response whose
    items come from more than one generation, or a version seen with two generations, fails."""
    seen: dict[int, str] = {}
    for o in rec.outcomes:
        if o.code != "OK":
            continue
        gens = {g for g, ids in generations.items() if set(o.post_ids) <= ids}
        assert gens, f"response at v{o.version} mixes corpora: {o.post_ids}"
        gen = sorted(gens)[0]
        assert seen.setdefault(o.version, gen) == gen, f"v{o.version} answered from two corpora"
    return seen


def test_candidate_sigkill_keeps_serving_resyncs_keeps_acked_upserts_and_swaps_snapshot_under_load(
    tmp_path, tiny_checkpoint
):
    corpus_a = range(1, 201)
    upserted = range(1001, 1006)
    corpus_b = range(5001, 5201)  # another item store: a new corpus, a fresh snapshot to the gateway
    stack = Stack(tmp_path, tiny_checkpoint, write_items(tmp_path / "a.jsonl", corpus_a))
    try:
        stack.start_all()
        events: dict[str, float] = {}
        acked: list[int] = []

        def fault() -> None:
            time.sleep(0.5)
            with grpc.insecure_channel(stack.address("candidate")) as ch:
                stub = candidate_tower_pb2_grpc.CandidateTowerStub(ch)
                for post in upserted:  # acknowledged before the kill
                    item = common_pb2.Item(post_id=post, author_id=1)
                    reply = stub.UpsertItems(candidate_tower_pb2.UpsertItemsRequest(items=[item]), timeout=5)
                    acked.append(reply.version)
            events["kill"] = time.monotonic()
            stack.procs["candidate"].kill()
            time.sleep(2.0)  # the gateway serves the last corpus meanwhile
            wait_until(
                lambda: not _gateway_status(stack).candidate_service_connected, "disconnect seen", RECOVER_S
            )
            stack.start("candidate")  # same items, same cache: resumes from the version the gateway holds
            wait_until(lambda: _gateway_status(stack).candidate_service_connected, "resync", RECOVER_S)
            events["resynced"] = time.monotonic()
            stack.procs["candidate"].kill()
            # A new corpus of record: the item store is the record, so a new items file alone changes
            # nothing (it is imported only into a new store)
            stack.items = write_items(tmp_path / "b.jsonl", corpus_b)
            stack.candidate_args = ["--item-store", str(tmp_path / "b.sqlite3")]
            stack.start("candidate")
            events["swap_sent"] = time.monotonic()
            b_version = _gateway_status_version_of_candidate(stack)
            wait_until(lambda: _gateway_status(stack).corpus_version == b_version, "swap", RECOVER_S)
            events["swapped"] = time.monotonic()
            time.sleep(1.0)  # keep loading the new corpus

        async def main() -> Recorder:
            rec = Recorder(stack.address("gateway"), deadline_s=DEADLINE_S)
            try:
                load = asyncio.create_task(
                    run_load(rec.call, concurrency=CONCURRENCY, max_requests=1_000_000, max_seconds=90)
                )
                await asyncio.to_thread(fault)
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)
            finally:
                await rec.close()
            return rec

        rec = _run(main())
        rec.outcomes = [o for o in rec.outcomes if o.end <= events["swapped"] + 1.0]
        print(f"\ncandidate SIGKILL + restart + snapshot swap: {rec.codes()}, acked versions {acked}")
        assert rec.codes() == {"OK": len(rec.outcomes)} and len(rec.outcomes) > 50  # zero failures
        versions = _snapshot_versions(
            rec, {"a": set(corpus_a) | set(upserted), "b": set(corpus_b)}
        )  # no response mixes versions
        assert set(versions.values()) == {"a", "b"}  # the swap happened while the load ran
        down = [o for o in rec.outcomes if events["kill"] <= o.start and o.end <= events["resynced"]]
        assert down and all(o.code == "OK" for o in down)
        assert max(v for v, g in versions.items() if g == "a") >= acked[-1]
    finally:
        stack.stop_all()


def _gateway_status_version_of_candidate(stack: Stack) -> int:
    with grpc.insecure_channel(stack.address("candidate")) as ch:
        info = candidate_tower_pb2_grpc.CandidateTowerStub(ch).GetCorpusInfo(
            candidate_tower_pb2.GetCorpusInfoRequest(), timeout=5
        )
    return info.version


def test_acked_upserts_survive_a_candidate_restart_and_reach_the_gateway(tmp_path, tiny_checkpoint):
    stack = Stack(tmp_path, tiny_checkpoint, write_items(tmp_path / "a.jsonl", range(1, 41)))
    try:
        stack.start_all()
        with grpc.insecure_channel(stack.address("candidate")) as ch:
            stub = candidate_tower_pb2_grpc.CandidateTowerStub(ch)
            for post in range(2001, 2011):
                item = common_pb2.Item(post_id=post, author_id=2)
                stub.UpsertItems(candidate_tower_pb2.UpsertItemsRequest(items=[item]), timeout=5)
            stub.DeleteItems(candidate_tower_pb2.DeleteItemsRequest(post_ids=[1, 2]), timeout=5)
        stack.procs["candidate"].kill()
        stack.procs["gateway"].stop()
        stack.start("candidate")
        stack.start("gateway")  # a fresh gateway gets everything from the restarted candidate_service
        ids = _all_post_ids(stack, k=100)
        assert ids == (set(range(3, 41)) | set(range(2001, 2011)))
    finally:
        stack.stop_all()


def test_gateway_sigterm_completes_in_flight_requests_and_refuses_new_ones(tmp_path, tiny_checkpoint):
    stack = Stack(
        tmp_path, tiny_checkpoint, write_items(tmp_path / "items.jsonl", range(1, 101)),
        # Each user encode waits ~400 ms for its batch to fill: many requests are in flight at any time.
        user_args=["--max-wait-ms", "400", "--max-batch-size", "64"],
        gateway_args=["--grace-seconds", "10"],
    )  # fmt: skip
    try:
        stack.start_all()
        gateway = stack.procs["gateway"]
        events: dict[str, float] = {}

        def fault() -> None:
            time.sleep(1.5)
            events["sigterm"] = time.monotonic()
            gateway.signal(signal.SIGTERM)
            events["exit_code"] = gateway.proc.wait(30)
            events["exited"] = time.monotonic()
            time.sleep(0.5)

        async def main() -> Recorder:
            rec = Recorder(stack.address("gateway"), deadline_s=5.0)
            try:
                load = asyncio.create_task(
                    run_load(rec.call, concurrency=8, max_requests=1_000_000, max_seconds=60)
                )
                await asyncio.to_thread(fault)
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)
            finally:
                await rec.close()
            return rec

        rec = _run(main())
        t = events["sigterm"]
        in_flight = [o for o in rec.outcomes if o.start < t < o.end]
        after: list[Outcome] = [o for o in rec.outcomes if o.start > events["exited"]]
        print(f"\ngateway SIGTERM: in flight {len(in_flight)} -> {rec.codes(lambda o: o.start < t < o.end)}, "
              f"sent after exit {len(after)} -> {rec.codes(lambda o: o.start > events['exited'])}, "
              f"all {rec.codes()}")  # fmt: skip
        assert events["exit_code"] == 0
        assert len(in_flight) >= 4 and all(o.code == "OK" for o in in_flight)
        assert after and all(o.code == "UNAVAILABLE" for o in after)
        assert {o.code for o in rec.outcomes} <= {"OK", "UNAVAILABLE"}
        assert health_status(stack.address("gateway")) is None
        assert health_status(stack.address("user")) == health_pb2.HealthCheckResponse.SERVING
    finally:
        stack.stop_all()
