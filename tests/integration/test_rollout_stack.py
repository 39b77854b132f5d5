"""The whole stack as real processes, moved A -> B -> A with `twotower rollout` under a load of 8
concurrent clients while writes go on: no Retrieve fails, every response is computed with the user
and item embeddings of the one model it reports (A before, B after, per client), every write
acknowledged during a rollout is in the corpus afterwards (encoded by the model serving), and a
rollout that cannot load its checkpoint leaves A serving everywhere with an error that says why."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from bench.common import free_port, parse_metrics
from shared import codec
from shared.client.rollout import RolloutTargets, run_rollout
from shared.convert import user_context_from_proto
from shared.model.checkpoint import load_checkpoint, random_model, save_checkpoint
from shared.model.features import featurize_items
from tests.reliability.harness import Stack, write_items
from twotower.v1 import (
    candidate_tower_pb2,
    candidate_tower_pb2_grpc,
    common_pb2,
    retrieval_gateway_pb2,
    retrieval_gateway_pb2_grpc,
    user_tower_pb2,
    user_tower_pb2_grpc,
)
from twotower_cli.stack import build as stack_services
from user_service.encoder import UserEncoder

# ~75 s on 2 cores; its own bounds (a rollout's TIMEOUT_S, the whole run's 360 s) must be reachable
# before pyproject's 120 s per test (fixture set-up included) on a slower runner.
pytestmark = pytest.mark.timeout(420)

CLIENTS = 8
ITEMS = 20_000
WRITE_BASE = 100_000  # post ids of the items upserted during the rollouts
TIMEOUT_S = 120.0


@dataclass
class Response:
    start: float
    end: float
    request: int  # index into the request list
    fingerprint: str = ""
    version: int = 0
    items: list[tuple[int, int, float]] = field(default_factory=list)  # (post, author, score)
    error: str = ""


def requests() -> list[retrieval_gateway_pb2.RetrieveRequest]:
    """64 users with 0..4 history events over the first items."""
    out = []
    for i in range(64):
        history = [common_pb2.Engagement(post_id=1 + (i * 7 + j) % 50, author_id=(1 + (i * 7 + j) % 50) % 4,
                                         action_ids=[0]) for j in range(i % 5)]  # fmt: skip
        out.append(
            retrieval_gateway_pb2.RetrieveRequest(
                user=common_pb2.UserContext(user_id=1 + i, history=history), k=10
            )
        )
    return out


async def client(stub, reqs, offset: int, out: list[Response], stop: asyncio.Event) -> None:
    i = offset
    while not stop.is_set():
        r = Response(time.monotonic(), 0.0, i % len(reqs))
        try:
            reply = await stub.Retrieve(reqs[r.request], timeout=10)
            r.fingerprint, r.version = reply.model_fingerprint, reply.corpus_version
            r.items = [(it.post_id, it.author_id, it.score) for it in reply.items]
        except grpc.aio.AioRpcError as exc:
            r.error = f"{exc.code().name}: {exc.details()}"
        r.end = time.monotonic()
        out.append(r)
        i += CLIENTS


@dataclass
class Writes:
    upserted: dict[int, int] = field(default_factory=dict)  # acknowledged: post id -> author id
    deleted: set[int] = field(default_factory=set)
    next_id: int = WRITE_BASE


async def writer(stub, writes: Writes, stop: asyncio.Event) -> None:
    """Upserts (new items and new authors for earlier ones) and deletes, one after another."""
    while not stop.is_set():
        post = writes.next_id
        writes.next_id += 1
        batch = [common_pb2.Item(post_id=post, author_id=post % 7, attributes={"w": str(post)})]
        if post % 5 == 0 and writes.upserted:  # re-author an earlier write
            old = min(writes.upserted)
            batch.append(common_pb2.Item(post_id=old, author_id=writes.upserted[old] + 1,
                                         attributes={"w": str(old)}))  # fmt: skip
        await stub.UpsertItems(candidate_tower_pb2.UpsertItemsRequest(items=batch), timeout=10)
        for item in batch:
            writes.upserted[item.post_id] = item.author_id
        if post % 3 == 0:
            victim = 1 + post % ITEMS
            await stub.DeleteItems(candidate_tower_pb2.DeleteItemsRequest(post_ids=[victim]), timeout=10)
            writes.deleted.add(victim)
        await asyncio.sleep(0.01)


def cli_rollout(stack: Stack, checkpoint: Path) -> subprocess.CompletedProcess:
    """The installed console script, as an operator runs it."""
    script = Path(sys.executable).parent / "twotower"
    command = [str(script)] if script.is_file() else [shutil.which("twotower") or "twotower"]
    return subprocess.run(
        [*command, "--gateway", stack.address("gateway"), "--user-service", stack.address("user"),
         "--candidate", stack.address("candidate"), "rollout", "--checkpoint", str(checkpoint)],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip


def collapse(values: list[str]) -> list[str]:
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


async def snapshot(stub) -> tuple[dict[int, tuple[int, np.ndarray, dict]], int, str]:
    """candidate_service's corpus as a watcher sees it: {post: (author, embedding, attributes)}."""
    stream = stub.WatchCorpus(candidate_tower_pb2.WatchCorpusRequest())
    rows: dict[int, tuple[int, np.ndarray, dict]] = {}
    try:
        while True:
            chunk = (await asyncio.wait_for(stream.read(), 30)).snapshot_chunk
            posts, authors = codec.decode_numpy(chunk.post_ids), codec.decode_numpy(chunk.author_ids)
            emb = codec.decode_numpy(chunk.embeddings)
            for p, a, e, attrs in zip(posts, authors, emb, chunk.attributes, strict=True):
                rows[int(p)] = (int(a), e, dict(attrs.attributes))
            if chunk.chunk_index == chunk.num_chunks - 1:
                return rows, chunk.version, chunk.fingerprint
    finally:
        stream.cancel()


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        return parse_metrics(page.read().decode())


class Models:
    """Both checkpoints in this process, to recompute any response's scores."""

    def __init__(self, *checkpoints: Path) -> None:
        self.loaded = {m.fingerprint: m for m in map(load_checkpoint, checkpoints)}
        self.users = {
            fp: UserEncoder.from_loaded(m, torch.device("cpu"), torch.float32, 1024)
            for fp, m in self.loaded.items()
        }

    def scores(self, fingerprint: str, request, items: list[tuple[int, int, float]]) -> np.ndarray:
        loaded = self.loaded[fingerprint]
        ctx = user_context_from_proto(request.user, loaded.config.num_actions)
        user = self.users[fingerprint].encode([ctx])[0].numpy()  # [D]
        posts = np.asarray([p for p, _, _ in items], np.int64)
        authors = np.asarray([a for _, a, _ in items], np.int64)
        with torch.inference_mode():
            emb = loaded.model.encode_items(featurize_items(posts, authors, loaded.config)).numpy()  # [k, D]
        return emb @ user


def test_rollout_a_to_b_to_a_under_load_fails_no_request_and_keeps_every_write(
    tmp_path, tiny_checkpoint, tiny_config
):
    ckpt_a = tiny_checkpoint
    ckpt_b = tmp_path / "ckpt-b"
    save_checkpoint(random_model(tiny_config, seed=1), ckpt_b)
    models = Models(ckpt_a, ckpt_b)
    fp_a, fp_b = (load_checkpoint(c).fingerprint for c in (ckpt_a, ckpt_b))
    ports = {name: free_port() for name in ("candidate", "user", "gateway")}
    stack = Stack(
        tmp_path, ckpt_a, write_items(tmp_path / "items.jsonl", range(1, ITEMS + 1)),
        candidate_args=["--metrics-port", str(ports["candidate"])],
        user_args=["--state-file", str(tmp_path / "user_state.json"), "--metrics-port", str(ports["user"]),
                   "--cpu-tower", "onnx"],
        gateway_args=["--metrics-port", str(ports["gateway"])],
    )  # fmt: skip
    reqs = requests()
    responses: list[list[Response]] = [[] for _ in range(CLIENTS)]
    writes = Writes()
    marks: dict[str, float] = {}

    async def main() -> None:
        stop_load, stop_writes = asyncio.Event(), asyncio.Event()
        async with (
            grpc.aio.insecure_channel(stack.address("gateway")) as gw_channel,
            grpc.aio.insecure_channel(stack.address("candidate")) as cand_channel,
        ):
            gateway = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(gw_channel)
            candidate = candidate_tower_pb2_grpc.CandidateTowerStub(cand_channel)
            load = [
                asyncio.ensure_future(client(gateway, reqs, i, responses[i], stop_load))
                for i in range(CLIENTS)
            ]

            async def each_client_answered(n: int, since: float) -> None:
                for _ in range(int(TIMEOUT_S / 0.05)):
                    if all(sum(r.start > since for r in rs) >= n for rs in responses):
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError(f"clients did not get {n} responses each")

            await each_client_answered(3, 0.0)

            # An unreadable checkpoint: the driver stops at its first step, A serves everywhere.
            failed = await asyncio.to_thread(cli_rollout, stack, tmp_path / "no-such-checkpoint")
            assert failed.returncode == 1, failed.stdout + failed.stderr
            assert "rollout failed" in failed.stderr and "no-such-checkpoint" in failed.stderr, failed.stderr
            assert "FAILED_PRECONDITION" in failed.stderr and "cannot load" in failed.stderr, failed.stderr

            for name, checkpoint, target in (("to_b", ckpt_b, fp_b), ("to_a", ckpt_a, fp_a)):
                stop_writes.clear()
                writing = asyncio.ensure_future(writer(candidate, writes, stop_writes))
                marks[f"{name}_start"] = time.monotonic()
                if name == "to_b":  # the console script, as an operator runs it
                    done = await asyncio.to_thread(cli_rollout, stack, checkpoint)
                    assert done.returncode == 0, done.stdout + done.stderr
                    assert f"the stack serves model {target}" in done.stdout
                else:  # rollback: the same steps, from the library
                    targets = RolloutTargets([stack.address("user")], stack.address("candidate"),
                                             [stack.address("gateway")])  # fmt: skip
                    lines: list[str] = []
                    assert (
                        await asyncio.to_thread(run_rollout, str(checkpoint), targets, report=lines.append)
                        == target
                    )
                marks[f"{name}_end"] = time.monotonic()
                stop_writes.set()
                await writing
                await each_client_answered(3, marks[f"{name}_end"])
            stop_load.set()
            await asyncio.gather(*load)

            # Every acknowledged write is in the corpus, encoded by the model serving (A again).
            rows, version, fingerprint = await snapshot(candidate)
            assert fingerprint == fp_a
            for post, author in writes.upserted.items():
                assert post in rows and rows[post][0] == author and rows[post][2] == {"w": str(post)}, post
            assert not writes.deleted & set(rows)
            assert len(rows) == ITEMS + len(writes.upserted) - len(writes.deleted)
            posts = sorted(writes.upserted)
            loaded = models.loaded[fp_a]
            with torch.inference_mode():
                want = loaded.model.encode_items(
                    featurize_items(np.asarray(posts), np.asarray([rows[p][0] for p in posts]), loaded.config)
                ).numpy()
            assert np.allclose(np.stack([rows[p][1] for p in posts]), want, atol=1e-5)
            status = await gateway.GetStatus(retrieval_gateway_pb2.GetStatusRequest(), timeout=5)
            for _ in range(200):  # the gateway follows the corpus (its stream is asynchronous)
                if status.corpus_version == version:
                    break
                await asyncio.sleep(0.05)
                status = await gateway.GetStatus(retrieval_gateway_pb2.GetStatusRequest(), timeout=5)
            assert (status.model_fingerprint, status.corpus_version, status.corpus_size) == (
                fp_a,
                version,
                len(rows),
            )

        async with grpc.aio.insecure_channel(stack.address("user")) as channel:
            held = await user_tower_pb2_grpc.UserTowerStub(channel).GetModels(
                user_tower_pb2.GetModelsRequest(), timeout=5
            )
        assert [m.fingerprint for m in held.models] == [fp_a] and held.default_fingerprint == fp_a

    stack.start_all()
    try:
        asyncio.run(asyncio.wait_for(main(), TIMEOUT_S * 3))
        scraped = {name: metrics(port) for name, port in ports.items()}
    finally:
        stack.stop_all()

    # No request failed, and each client saw A, then B, then A again: never back and forth.
    every = [r for rs in responses for r in rs]
    assert [r.error for r in every if r.error] == []
    assert len(every) > 100
    for rs in responses:
        assert collapse([r.fingerprint for r in rs]) == [fp_a, fp_b, fp_a]
    for r in every:
        if r.end < marks["to_b_start"] or r.start > marks["to_a_end"]:
            assert r.fingerprint == fp_a
        if marks["to_b_end"] < r.start and r.end < marks["to_a_start"]:
            assert r.fingerprint == fp_b
    # Each response's scores are those of the model it names, user and items alike, and not the other's.
    by_fp = {fp: [r for r in every if r.fingerprint == fp and r.items] for fp in (fp_a, fp_b)}
    for fp, other in ((fp_a, fp_b), (fp_b, fp_a)):
        sample = by_fp[fp][:: max(1, len(by_fp[fp]) // 40)]
        assert sample
        for r in sample:
            got = np.asarray([s for _, _, s in r.items])
            assert np.allclose(models.scores(fp, reqs[r.request], r.items), got, atol=1e-4)
            assert not np.allclose(models.scores(other, reqs[r.request], r.items), got, atol=1e-4)

    # Prometheus shows the model each service holds.
    assert scraped["candidate"][f'candidate_model_info{{fingerprint="{fp_a}",role="active"}}'] == 1
    assert scraped["gateway"][f'twotower_gateway_model_info{{fingerprint="{fp_a}"}}'] == 1
    held = 'twotower_user_model_info{{default="{}",fingerprint="{}",runtime="onnx"}}'  # the cpu default
    assert scraped["user"][held.format("true", fp_a)] == 1
    assert held.format("false", fp_b) not in scraped["user"]
    assert scraped["candidate"]['candidate_rollouts_total{outcome="done"}'] == 2


def test_run_stack_gives_user_service_a_state_file(tmp_path):
    """`make run-stack`: user_service records its models, so `twotower rollout` works on that stack."""
    from argparse import Namespace

    from user_service.__main__ import config_from_args, parse_args

    args = Namespace(
        log_dir=str(tmp_path / "logs"), log_level="INFO", candidate_port=1, user_port=2, gateway_port=3,
        checkpoint="ckpt", items="items.jsonl", cache_dir=str(tmp_path / "cache"), device="cpu",
    )  # fmt: skip
    user = next(s for s in stack_services(args) if s.name == "user_service")
    config = config_from_args(parse_args(user.argv[3:]))
    assert config.state_file == tmp_path / "cache" / "user_service" / "state.json"
