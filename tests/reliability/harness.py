"""The real stack as subprocesses plus a steady load that records every request, for fault tests.

`Stack` starts candidate_service, user_service and retrieval_gateway on loopback (port 0 on the first
start; a restart keeps the port so the gateway's address for it stays valid) and can kill, restart and
signal each. `Recorder` wraps a Retrieve call for `bench.loadgen.run_load` and keeps, per request, its
start/end times, status code, corpus version and post ids, so a test can count failures per phase.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from shared.tls import ClientTLS, aio_channel
from tests.support import ServiceProcess, health_status
from twotower.v1 import common_pb2, retrieval_gateway_pb2, retrieval_gateway_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
START_S = 120.0  # bound on any service start (torch import on a busy 2-core machine)


def write_items(path: Path, post_ids: range, authors: int = 4) -> Path:
    with path.open("w") as f:
        for i in post_ids:
            f.write(json.dumps({"post_id": i, "author_id": i % authors, "attributes": {"n": str(i)}}) + "\n")
    return path


def wait_until(predicate: Callable[[], bool], what: str, timeout: float) -> float:
    """Poll until true; returns the seconds it took. Raises AssertionError naming `what` on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout}s")


def rss_kib(pid: int) -> int:
    """Resident set size of a live process (VmRSS from /proc), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Stack:
    tmp: Path
    checkpoint: Path
    items: Path
    candidate_args: list[str] = field(default_factory=list)
    user_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    tls_flags: list[str] = field(default_factory=list)  # server flags for every service (TLS tests)
    upstream_flags: list[str] = field(default_factory=list)  # the gateway's client flags
    tls: ClientTLS | None = None  # what the test (and health probes) use as a client
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)

    def _argv(self, name: str) -> list[str]:
        if name == "candidate":
            return ["--checkpoint", str(self.checkpoint), "--items", str(self.items),
                    "--cache-dir", str(self.tmp / "cache"), *self.candidate_args]  # fmt: skip
        if name == "user":
            return ["--checkpoint", str(self.checkpoint), *self.user_args]
        return ["--user-service", self.address("user"), "--candidate-service", self.address("candidate"),
                "--device", "cpu", "--reconnect-max-s", "1", *self.upstream_flags,
                *self.gateway_args]  # fmt: skip

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start(self, name: str, wait: bool = True) -> ServiceProcess:
        module = {"candidate": "candidate_service", "user": "user_service", "gateway": "retrieval_gateway"}
        self.starts[name] = self.starts.get(name, 0) + 1
        fixed = ["--port", str(self.ports[name])] if name in self.ports else []
        proc = ServiceProcess(module[name], [*self._argv(name), *self.tls_flags, *fixed], self.tmp,
                              f"{name}-{self.starts[name]}", tls=self.tls)  # fmt: skip
        self.procs[name] = proc
        if wait:
            self.ports[name] = proc.wait_serving(START_S).port
        return proc

    def start_all(self) -> Stack:
        self.start("candidate", wait=False)
        self.start("user", wait=False)
        for name in ("candidate", "user"):
            self.ports[name] = self.procs[name].wait_serving(START_S).port
        self.start("gateway")
        return self

    def serving(self, name: str) -> bool:
        return health_status(self.address(name), timeout=0.5, tls=self.tls) == SERVING

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


@dataclass
class Outcome:
    start: float
    end: float
    code: str  # "OK" or the status code name
    version: int = 0
    post_ids: tuple[int, ...] = ()


class Recorder:
    """`call(i)` for run_load: one Retrieve on a shared channel, every outcome kept in `outcomes`."""

    def __init__(self, address: str, k: int = 10, deadline_s: float = 2.0, tls: ClientTLS | None = None):
        self.channel = aio_channel(address, (), tls)
        self.stub = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(self.channel)
        self.k, self.deadline_s = k, deadline_s
        self.outcomes: list[Outcome] = []

    def request(self, i: int) -> retrieval_gateway_pb2.RetrieveRequest:
        history = [common_pb2.Engagement(post_id=1 + (i * 7 + j) % 50, author_id=j % 4, action_ids=[0])
                   for j in range(i % 5)]  # fmt: skip
        user = common_pb2.UserContext(user_id=1 + i % 997, history=history)
        return retrieval_gateway_pb2.RetrieveRequest(user=user, k=self.k)

    async def call(self, i: int) -> None:
        t0 = time.monotonic()
        try:
            reply = await self.stub.Retrieve(self.request(i), timeout=self.deadline_s)
        except grpc.aio.AioRpcError as exc:
            self.outcomes.append(Outcome(t0, time.monotonic(), exc.code().name))
            raise
        ids = tuple(it.post_id for it in reply.items)
        self.outcomes.append(Outcome(t0, time.monotonic(), "OK", reply.corpus_version, ids))

    async def close(self) -> None:
        await self.channel.close()

    def codes(self, where: Callable[[Outcome], bool] = lambda o: True) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            if where(o):
                counts[o.code] = counts.get(o.code, 0) + 1
        return counts


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
