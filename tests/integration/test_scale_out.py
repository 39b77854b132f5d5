"""Scale-out on loopback (issue #15), every service a real process: gateway shards (S = 2 and S = 4)
behind a router answer what one unsharded gateway answers, before and after corpus changes; a stopped
shard fails a Retrieve UNAVAILABLE, or with allow_partial answers the exact merge of the others; and
two replicas of user_service and of the gateway behind one multi-address target lose no request when
one of each is killed under load.

Router and unsharded answers are compared exactly: post ids, order, author ids, attributes and scores
bit for bit. That needs the same floats on both paths: user_service runs --max-batch-size 1 (its user
tower, like any CPU GEMM, gives one user ulp-different embeddings in batches of different sizes), each
client thread sends one request at a time (a scoring batch of one query), and every service runs torch
on one thread; see assert_same_answer for why, and for what a failure caused by rounding would say.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.common import free_ports
from retrieval_gateway.sharding import shard_of
from retrieval_gateway.user_client import UserServiceClient
from shared.channels import balanced_options
from shared.client import HistoryEvent, TwoTowerClient
from shared.model.checkpoint import random_model, save_checkpoint
from shared.model.config import TowerConfig
from tests.conftest import TINY
from tests.support import ServiceProcess
from twotower.v1 import common_pb2, retrieval_gateway_pb2, retrieval_gateway_pb2_grpc

# ~80 s on 2 cores (20 s of it the module's 12 processes importing torch), against pyproject's 120 s per
# test, set-up included: room for a runner twice as slow, within the bounds below (START_S, CALL_S, ...).
pytestmark = pytest.mark.timeout(420)

N_ITEMS = 3000
N_AUTHORS = 40
N_REQUESTS = 1000  # random requests compared before the corpus changes ...
N_REQUESTS_AFTER = 200  # ... and after
MAX_K = 2048  # the gateway's default --max-k
START_S = 120.0  # bound on any service start (torch import on a busy 2-core machine)
BOUND_S = 20.0  # bound on a corpus change reaching every gateway and shard
CALL_S = 10.0  # bound on one Retrieve
# Not a tolerance of the comparison (it is exact): what a failure's message calls float rounding.
FP_TOLERANCE = 1e-6
FP_NOTE = "all scores within 1e-6: float rounding of the GEMM, see assert_same_answer"

GATEWAY = "retrieval_gateway"


# ---- processes ------------------------------------------------------------------------------------------
class Fleet:
    """Service processes started by one fixture or test; `stop()` stops them all (SIGTERM to every one
    first, so that their grace periods run at the same time)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[ServiceProcess] = []

    def start(self, module: str, args: list[str], name: str) -> ServiceProcess:
        proc = ServiceProcess(module, args, self.tmp, name)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:  # all at once: each has up to its grace period to drain
            proc.signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            proc.stop()


@contextlib.contextmanager
def fleet(tmp: Path) -> Iterator[Fleet]:
    f = Fleet(tmp)
    try:
        yield f
    finally:
        f.stop()


def serving(*procs: ServiceProcess) -> None:
    for proc in procs:
        proc.wait_serving(START_S)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread_per_service() -> Iterator[None]:
    """Every service started here runs torch on one intra-op thread (OMP_NUM_THREADS, read by each
    child at start): a dozen processes on two cores, each with an OpenMP pool spinning for work, make
    the tiny model's forward pass ten times slower (30 ms instead of 3 ms)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


def at(port: int) -> str:
    return f"127.0.0.1:{port}"


@dataclass
class Stack:
    tmp: Path
    checkpoint: Path
    post_ids: list[int]  # the corpus at start
    candidate: ServiceProcess
    users: list[ServiceProcess]  # two user_service replicas, behind `user_target`
    user_target: str
    single: ServiceProcess  # the unsharded gateway
    shards: dict[int, list[ServiceProcess]]  # S -> shard i at [i]
    routers: dict[int, ServiceProcess]  # S -> the router over those shards


def gateway_args(user_target: str, candidate: str) -> list[str]:
    return ["--user-service", user_target, "--candidate-service", candidate, "--device", "cpu",
            "--reconnect-max-s", "1"]  # fmt: skip


def shard_args(user_target: str, candidate: str, index: int, count: int) -> list[str]:
    return [*gateway_args(user_target, candidate), "--role", "shard", "--shard-index", str(index),
            "--num-shards", str(count)]  # fmt: skip


def router_args(user_target: str, shards: list[str]) -> list[str]:
    return ["--role", "router", "--user-service", user_target, "--shard-addresses", *shards]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """On a tiny random-init checkpoint: candidate_service (N_ITEMS items, random sparse post ids), two
    user_service replicas (one user per forward pass), one unsharded gateway, and for S = 2 and S = 4
    S shard gateways and a router over them; every gateway asks both user_service replicas."""
    tmp = tmp_path_factory.mktemp("scale_out")
    checkpoint = tmp / "ckpt"
    save_checkpoint(random_model(TowerConfig(**TINY), seed=0), checkpoint)
    rng = np.random.default_rng(15)
    post_ids = sorted(int(p) for p in rng.choice(10**12, N_ITEMS, replace=False) + 1)
    items = tmp / "items.jsonl"
    with items.open("w") as f:
        for p in post_ids:
            author = int(rng.integers(0, N_AUTHORS))
            f.write(
                json.dumps({"post_id": p, "author_id": author, "attributes": {"n": str(p), "a": str(author)}})
            )
            f.write("\n")
    ports = iter(free_ports(12))
    fixed = {
        name: next(ports) for name in ["candidate", "user-0", "user-1", "single", "router-2", "router-4"]
    }
    fixed |= {f"shard-{i}-of-{s}": next(ports) for s in (2, 4) for i in range(s)}
    cand, user_target = at(fixed["candidate"]), "ipv4:" + ",".join(at(fixed[f"user-{i}"]) for i in range(2))
    with fleet(tmp) as f:

        def start(module: str, name: str, args: list[str]) -> ServiceProcess:
            return f.start(module, [*args, "--port", str(fixed[name])], name)

        ckpt = ["--checkpoint", str(checkpoint)]
        candidate = start(
            "candidate_service",
            "candidate",
            [*ckpt, "--items", str(items), "--cache-dir", str(tmp / "cache")],
        )
        users = [start("user_service", f"user-{i}", [*ckpt, "--max-batch-size", "1"]) for i in range(2)]
        single = start(GATEWAY, "single", gateway_args(user_target, cand))
        shards = {
            s: [start(GATEWAY, f"shard-{i}-of-{s}", shard_args(user_target, cand, i, s)) for i in range(s)]
            for s in (2, 4)
        }
        routers = {
            s: start(
                GATEWAY,
                f"router-{s}",
                router_args(user_target, [at(fixed[f"shard-{i}-of-{s}"]) for i in range(s)]),
            )
            for s in (2, 4)
        }
        serving(candidate, *users, single, *(p for g in shards.values() for p in g), *routers.values())
        for router in routers.values():
            wait_until_router_sees_every_shard(router, N_ITEMS)
        yield Stack(tmp, checkpoint, post_ids, candidate, users, user_target, single, shards, routers)


# ---- requests and answers -------------------------------------------------------------------------------
def random_k(rng: np.random.Generator) -> int:
    """Mostly the k of a feed (<= 100), sometimes hundreds, now and then thousands up to max_k: every
    size is exercised, and the large answers (all hits serialised on every hop) stay a small share."""
    kind = rng.random()
    if kind < 0.03:
        return MAX_K
    if kind < 0.08:
        return int(rng.integers(1000, MAX_K + 1))
    if kind < 0.2:
        return int(rng.integers(100, 1000))
    return int(rng.integers(1, 101))


def random_requests(rng: np.random.Generator, post_ids: list[int], n: int) -> list:
    """Random users with random histories (mostly corpus posts, some unknown), random k (small ones,
    large ones, max_k), random exclusions of posts, authors and the history."""
    corpus = np.asarray(post_ids)
    requests = []
    for _ in range(n):
        h = int(rng.integers(0, 16))
        posts = rng.choice(corpus, h).tolist()
        if h and rng.random() < 0.3:
            posts[0] = int(rng.integers(1, 10**12))  # not in the corpus
        history = [
            common_pb2.Engagement(
                post_id=int(p), author_id=int(rng.integers(0, N_AUTHORS)),
                action_ids=sorted({int(a) for a in rng.integers(0, 19, int(rng.integers(1, 3)))}),
            )
            for p in posts
        ]  # fmt: skip
        k = random_k(rng)
        excluded = rng.choice(corpus, int(rng.integers(0, 40))).tolist() if rng.random() < 0.5 else []
        authors = (
            rng.choice(N_AUTHORS, int(rng.integers(1, 4)), replace=False).tolist()
            if rng.random() < 0.3
            else []
        )
        requests.append(
            retrieval_gateway_pb2.RetrieveRequest(
                user=common_pb2.UserContext(user_id=int(rng.integers(1, 10**9)), history=history),
                k=k, exclude_post_ids=[int(p) for p in excluded],
                exclude_author_ids=[int(a) for a in authors],
                exclude_history=bool(rng.random() < 0.4),
            )
        )  # fmt: skip
    return requests


def retrieve_all(address: str, requests: list) -> list[retrieval_gateway_pb2.RetrieveResponse]:
    """One request at a time: every scoring batch holds one query (see the module docstring)."""
    with grpc.insecure_channel(address) as channel:
        stub = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(channel)
        return [stub.Retrieve(r, timeout=CALL_S) for r in requests]


def answers(addresses: list[str], requests: list) -> list[list[retrieval_gateway_pb2.RetrieveResponse]]:
    """Each address's answers to every request; the addresses are asked concurrently."""
    with ThreadPoolExecutor(len(addresses)) as pool:
        return list(pool.map(lambda a: retrieve_all(a, requests), addresses))


def rows(response: retrieval_gateway_pb2.RetrieveResponse) -> list[tuple]:
    return [(it.post_id, it.author_id, it.score, dict(it.attributes)) for it in response.items]


def assert_same_answer(want, got, request) -> None:
    """`got` (a router) answers exactly what `want` (the unsharded gateway) answers: the same items in
    the same order with the same author ids, attributes and scores, bit for bit.

    Exact because every product here is one query against the rows it scores (B = 1: each client sends
    one request at a time), a BLAS gemv that computes every row alike wherever it sits (topk_cpu pads
    the few last rows that BLAS would round with another kernel): a row's score is then the same float
    in the whole corpus and in a shard's slice. It would not be in general: CPU GEMM kernels round
    differently for B = 1, 2 and >= 4 queries, so with concurrent clients a score may move by an ulp
    and two near-equal items may swap. Such a failure is reported as what it is (FP_NOTE), not hidden
    by a tolerance."""
    a, b = rows(want), rows(got)
    if a == b:
        return
    context = f"request k={request.k} user={request.user.user_id}: "
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    detail = f"position {first}: unsharded {a[first : first + 2]} vs router {b[first : first + 2]}"
    close = len(a) == len(b) and all(abs(x[2] - y[2]) <= FP_TOLERANCE for x, y in zip(a, b, strict=True))
    note = f" ({FP_NOTE})" if close else ""
    raise AssertionError(f"{context}{len(a)} vs {len(b)} items, first difference at {detail}{note}")


def assert_routers_agree(single_answers, router_answers: dict[int, list], requests, version: int) -> None:
    for s, got in router_answers.items():
        for want, answer, request in zip(single_answers, got, requests, strict=True):
            assert_same_answer(want, answer, request)
            assert answer.model_fingerprint == want.model_fingerprint
            assert not answer.partial and list(answer.missing_shards) == []
            assert list(answer.shard_corpus_versions) == [version] * s
            assert answer.corpus_version == want.corpus_version == version


def status(address: str) -> retrieval_gateway_pb2.GatewayStatus:
    with grpc.insecure_channel(address) as channel:
        stub = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(channel)
        return stub.GetStatus(retrieval_gateway_pb2.GetStatusRequest(), timeout=5)


def wait_until_router_sees_every_shard(router: ServiceProcess, size: int) -> None:
    """A router is SERVING once one shard answers its GetStatus poll (every second); one that started
    before its shards listened also waits out gRPC's reconnect backoff to them (up to 2 s)."""
    wait_until(lambda: status(router.address).corpus_size == size, f"{router.name} serving {size} items")


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout}s")


# ---- 2a: sharded == unsharded ---------------------------------------------------------------------------
@pytest.mark.slow  # ~60 s on 2 cores: 1,300 requests, each through 3 gateways, 6 shards, user_service
def test_sharded_routers_answer_what_one_unsharded_gateway_answers_before_and_after_changes(
    stack,
):
    up = gw = stack
    routers = {s: r.address for s, r in gw.routers.items()}
    version = status(gw.single.address).corpus_version
    for s, group in gw.shards.items():  # every item on exactly one shard, the one its hash names
        sizes = [status(p.address).corpus_size for p in group]
        counts = np.bincount(shard_of(np.asarray(up.post_ids), s), minlength=s)
        assert sizes == counts.tolist() and sum(sizes) == N_ITEMS
        assert status(routers[s]).corpus_size == N_ITEMS
        assert {status(p.address).role for p in group} == {"shard"} and status(routers[s]).role == "router"

    rng = np.random.default_rng(2)
    requests = random_requests(rng, up.post_ids, N_REQUESTS)
    single, *by_router = answers([gw.single.address, *routers.values()], requests)
    assert any(len(r.items) == MAX_K for r in single) and any(len(r.items) == 1 for r in single)
    assert_routers_agree(single, dict(zip(routers, by_router, strict=True)), requests, version)

    # Corpus changes through candidate_service: new items, changed items (new author: new embedding),
    # deleted items, among them every item of shard 3 of 4 (a shard with nothing left answers nothing,
    # not an error); then every gateway and shard on the new version, and the same comparison.
    live = set(up.post_ids)
    new = [int(p) for p in rng.choice(10**12, 200, replace=False) + 10**12]
    changed = rng.choice(up.post_ids, 100, replace=False).tolist()
    deleted = rng.choice(sorted(live - set(changed)), 150, replace=False).tolist()
    emptied = [p for p in sorted(live | set(new)) if shard_of(np.array([p]), 4)[0] == 3]
    with TwoTowerClient(gateway=None, candidate=up.candidate.address) as client:
        client.upsert({"post_id": p, "author_id": p % N_AUTHORS, "attributes": {"new": "1"}} for p in new)
        client.upsert(
            {"post_id": p, "author_id": (p + 1) % N_AUTHORS, "attributes": {"v": "2"}} for p in changed
        )
        client.delete(deleted)
        version = client.delete(emptied).version
    deleted = set(deleted) | set(emptied)
    live = (live | set(new)) - deleted
    targets = [gw.single, *(p for g in gw.shards.values() for p in g), *gw.routers.values()]
    wait_until(
        lambda: all(status(p.address).corpus_version >= version for p in targets),
        f"corpus version {version} on every gateway, shard and router",
    )
    assert status(gw.single.address).corpus_size == len(live)
    for s, group in gw.shards.items():
        counts = np.bincount(shard_of(np.asarray(sorted(live)), s), minlength=s)
        assert [status(p.address).corpus_size for p in group] == counts.tolist()
    assert status(gw.shards[4][3].address).corpus_size == 0

    requests = random_requests(rng, sorted(live), N_REQUESTS_AFTER)
    single, *by_router = answers([gw.single.address, *routers.values()], requests)
    returned = {it.post_id for r in single for it in r.items}
    assert returned & set(new) and not returned & deleted
    assert_routers_agree(single, dict(zip(routers, by_router, strict=True)), requests, version)


# ---- 2b: a stopped shard ---------------------------------------------------------------------------------
def test_a_stopped_shard_fails_retrieve_unavailable_or_allows_a_partial_exact_merge(stack):
    """A router over the stack's S=4 shards but its own shard 2 (the same slice), which is SIGKILLed."""
    with fleet(stack.tmp) as f:
        [port] = free_ports(1)
        victim_args = [*shard_args(stack.user_target, stack.candidate.address, 2, 4), "--port", str(port)]
        victim = f.start(GATEWAY, victim_args, "shard-2-of-4-victim")
        addresses = [p.address for p in stack.shards[4]]
        addresses[2] = at(port)
        router = f.start(GATEWAY, router_args(stack.user_target, addresses), "router-4-victim")
        serving(victim, router)
        wait_until_router_sees_every_shard(router, status(stack.single.address).corpus_size)
        # k <= 300: the survivors' exact top k is read from the unsharded top MAX_K (~1,500 of theirs)
        requests = [
            with_fields(r, k=min(r.k, 300))
            for r in random_requests(np.random.default_rng(3), stack.post_ids, 40)
        ]
        [whole] = retrieve_all(router.address, requests[:1])
        assert not whole.partial and len(whole.shard_corpus_versions) == 4
        assert_same_answer(retrieve_all(stack.single.address, requests[:1])[0], whole, requests[0])

        victim.kill()
        with grpc.insecure_channel(router.address) as channel:
            stub = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(channel)
            for r in requests[:5]:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Retrieve(r, timeout=CALL_S)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                assert "shard 2" in err.value.details()
        partial = retrieve_all(router.address, [with_fields(r, allow_partial=True) for r in requests])

        # The shard back (same address): whole answers again within the reconnect backoff's cap (2 s).
        f.start(GATEWAY, victim_args, "shard-2-of-4-restarted").wait_serving(START_S)
        back = with_fields(requests[0], allow_partial=True)
        wait_until(lambda: not retrieve_all(router.address, [back])[0].partial, "whole answers again", 5.0)
        assert_same_answer(whole, retrieve_all(router.address, requests[:1])[0], requests[0])

    deep = retrieve_all(stack.single.address, [with_fields(r, k=MAX_K) for r in requests])
    for request, answer, full in zip(requests, partial, deep, strict=True):
        assert answer.partial and list(answer.missing_shards) == [2]
        versions = list(answer.shard_corpus_versions)
        assert versions[2] == 0 and all(v > 0 for i, v in enumerate(versions) if i != 2)
        assert answer.corpus_version == min(v for i, v in enumerate(versions) if i != 2)
        # The exact merge of shards 0, 1 and 3 = the unsharded answer without shard 2's items.
        survivors = [it for it in full.items if shard_of(np.array([it.post_id]), 4)[0] != 2]
        assert len(survivors) >= request.k or len(full.items) < MAX_K
        want = retrieval_gateway_pb2.RetrieveResponse(items=survivors[: request.k])
        assert_same_answer(want, answer, request)


def with_fields(
    request: retrieval_gateway_pb2.RetrieveRequest, **fields
) -> retrieval_gateway_pb2.RetrieveRequest:
    copy = retrieval_gateway_pb2.RetrieveRequest()
    copy.CopyFrom(request)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy


# ---- 2c: replicas --------------------------------------------------------------------------------------
def metrics_port(proc: ServiceProcess) -> int:
    found = re.search(r"\(metrics port (\d+)\)", proc.log())
    assert found, proc.log()
    return int(found.group(1))


def counter(port: int, name: str, **labels: str) -> float:
    """A Prometheus counter of the service whose metrics are on `port` (summed over other labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def requests_answered(port: int) -> float:
    return counter(port, "twotower_gateway_requests_total", outcome="ok")


def probe_while(target: str, stop: threading.Event, counts: dict[str, int], probers: int = 8) -> None:
    """A gateway's readiness probe of user_service (UserServiceClient.probe: grpc.health.v1 Check through
    its balanced channel to `target`), `probers` at a time, back to back until `stop`; counts outcomes."""

    async def main() -> None:
        users = UserServiceClient(target, [])

        async def probe() -> None:
            while not stop.is_set():
                counts["serving" if await users.probe(timeout=CALL_S) else "failed"] += 1

        try:
            await asyncio.gather(*(probe() for _ in range(probers)))
        finally:
            await users.close()

    asyncio.run(main())


def test_replicas_behind_one_target_lose_no_request_when_one_of_each_is_killed(stack):
    """Two gateways, each asking two user_service replicas (the stack's first and one of its own), behind
    `ipv4:g0,g1` in the client library; 6 clients; the own user_service replica, then gateway 0 are
    SIGKILLed: the retry policy resends the calls caught by a kill, and no request fails."""
    with fleet(stack.tmp) as f:
        user_port, *gw_ports = free_ports(3)
        user = f.start("user_service", ["--checkpoint", str(stack.checkpoint), "--port", str(user_port),
                                        "--metrics-port", "0"], "user-replica-extra")  # fmt: skip
        user_target = f"ipv4:{stack.users[0].address},{at(user_port)}"
        gws = [f.start(GATEWAY, [*gateway_args(user_target, stack.candidate.address), "--metrics-port", "0",
                                 "--port", str(port)], f"gateway-replica-{i}")
               for i, port in enumerate(gw_ports)]  # fmt: skip
        serving(user, *gws)
        ports = [metrics_port(g) for g in gws]
        target = "ipv4:" + ",".join(g.address for g in gws)

        rng = np.random.default_rng(4)
        requests = random_requests(rng, stack.post_ids, 64)
        stop = threading.Event()
        ok = [0] * 6
        failures: list[str] = []

        def client(c: int) -> None:
            with TwoTowerClient(gateway=target, timeout=CALL_S) as tt:
                i = c
                while not stop.is_set():
                    r = requests[i % len(requests)]
                    try:
                        tt.retrieve(
                            r.user.user_id,
                            [HistoryEvent(e.post_id, e.author_id, e.action_ids) for e in r.user.history],
                            k=min(r.k, 100),
                            exclude_post_ids=r.exclude_post_ids,
                            exclude_history=r.exclude_history,
                            exclude_author_ids=r.exclude_author_ids,
                        )
                        ok[c] += 1
                    except grpc.RpcError as exc:
                        failures.append(f"client {c}: {exc.code().name}: {exc.details()}")
                    i += len(ok)

        with ThreadPoolExecutor(len(ok) + 1) as pool:
            running = [pool.submit(client, c) for c in range(len(ok))]
            try:
                wait_until(lambda: sum(ok) >= 100, "100 answers before the kills")
                encoded_by_victim = counter(metrics_port(user), "twotower_user_encode_users_total")
                # Readiness probes of the same target in flight at the kill (with 8 back to back, a few
                # are; each failure would turn a gateway NOT_SERVING for a poll period).
                probes_done, probes = threading.Event(), {"serving": 0, "failed": 0}
                prober = pool.submit(probe_while, user_target, probes_done, probes)
                wait_until(lambda: probes["serving"] >= 50, "50 readiness probes before the kill")
                user.kill()
                time.sleep(0.5)
                probes_done.set()
                prober.result(timeout=CALL_S * 2)
                before = sum(ok)
                wait_until(lambda: sum(ok) >= before + 100, "100 answers after a user_service replica died")
                served_by_victim = requests_answered(ports[0])
                gws[0].kill()
                before = sum(ok)
                wait_until(lambda: sum(ok) >= before + 150, "150 answers after gateway replica 0 died")
            finally:
                stop.set()
                for fut in running:
                    fut.result(timeout=CALL_S * 2)
        served_by_survivor = requests_answered(ports[1])
        print(
            f"answered: {sum(ok)} (clients {ok}); gateway 0 {served_by_victim:.0f} before its kill, "
            f"gateway 1 {served_by_survivor:.0f}; the killed user_service replica {encoded_by_victim:.0f}; "
            f"readiness probes across its kill {probes}"
        )
        assert failures == []
        assert served_by_victim > 0 and served_by_survivor > 0 and encoded_by_victim > 0
        assert all(n > 0 for n in ok)
        assert probes["failed"] == 0, probes
        for g in gws:  # never NOT_SERVING once SERVING: one user_service replica is enough
            assert "NOT_SERVING" not in g.log(), g.log()


# A plain grpc channel with the same options as the client library's, for callers that do not use it.
def test_balanced_options_spread_a_plain_channel_over_every_gateway(stack):
    gw = stack
    target = "ipv4:" + ",".join([gw.single.address, gw.routers[2].address, gw.routers[4].address])
    service = retrieval_gateway_pb2.DESCRIPTOR.services_by_name["RetrievalGateway"].full_name
    with grpc.insecure_channel(target, options=balanced_options(service, ["GetStatus"])) as channel:
        stub = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(channel)
        roles = [stub.GetStatus(retrieval_gateway_pb2.GetStatusRequest(), timeout=5).role for _ in range(30)]
    assert set(roles) == {"single", "router"} and roles.count("router") >= 10
