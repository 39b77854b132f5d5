"""retrieval_gateway/router.py with fake shard clients: merge, partial answers vs UNAVAILABLE, model
mismatch, per-shard versions, the deadline handed to the shards, and what info() makes of statuses."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from retrieval_gateway import shard_client
from retrieval_gateway.index import CorpusView, Query, SearchResult
from retrieval_gateway.router import ShardRouter
from retrieval_gateway.shard_client import ShardAnswer, ShardStatus, ShardUnavailable
from retrieval_gateway.sharding import ShardHits, merge_hits
from shared.errors import DeadlineExpired, ModelMismatch, NotReady

MODEL = "model-a"
DEFAULT_TIMEOUT_S = 4.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def hits(post_ids, scores) -> ShardHits:
    p = np.asarray(post_ids, np.int64)
    return ShardHits(p, p * 10, np.asarray(scores, np.float32), [{"p": str(x)} for x in p.tolist()])


class FakeShard:
    """A ShardClient stand-in: answers `lists[q % len(lists)]` for query q, or raises `error`; records
    its calls."""

    def __init__(
        self,
        index: int,
        lists: list[ShardHits],
        version: int = 1,
        error: Exception | None = None,
        status: ShardStatus | None = None,
    ) -> None:
        self.index, self.lists, self.version, self.error = index, lists, version, error
        self.status_reply = status if status is not None else ShardStatus(True, version, MODEL, 10, 4)
        self.score_calls: list[tuple[int, str, float]] = []  # (queries, fingerprint, timeout)
        self.status_calls = 0
        self.closed = False

    async def score(self, queries, fingerprint: str, timeout: float) -> ShardAnswer:
        self.score_calls.append((len(queries), fingerprint, timeout))
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        answer = [self.lists[i % len(self.lists)] for i in range(len(queries))]
        return ShardAnswer(self.index, answer, self.version, fingerprint)

    async def status(self, timeout: float) -> ShardStatus | None:
        self.status_calls += 1
        return self.status_reply

    async def close(self) -> None:
        self.closed = True


def query(k: int = 3, allow_partial: bool = False, deadline: float | None = None) -> Query:
    return Query(torch.zeros(4), MODEL, k, allow_partial=allow_partial, deadline=deadline)


def three_shards(errors: dict[int, Exception] | None = None) -> list[FakeShard]:
    """Shard i holds ids ≡ i (mod 3); two queries with different lists; versions 7, 5, 9."""
    errors = errors or {}
    lists = {
        0: [hits([3, 6, 9], [0.9, 0.5, 0.5]), hits([12], [0.1])],
        1: [hits([1, 4, 7], [0.8, 0.5, 0.2]), hits([], [])],
        2: [hits([2, 5, 8], [0.95, 0.5, 0.3]), hits([5, 2], [0.7, 0.2])],
    }
    versions = {0: 7, 1: 5, 2: 9}
    return [FakeShard(i, lists[i], versions[i], errors.get(i)) for i in range(3)]


def router(shards) -> ShardRouter:
    return ShardRouter(shards, DEFAULT_TIMEOUT_S, status_timeout_s=1.0)


def assert_result(result, expected: ShardHits):
    assert isinstance(result, SearchResult), result
    assert result.post_ids.tolist() == expected.post_ids.tolist()
    assert result.author_ids.tolist() == expected.author_ids.tolist()
    assert result.scores.tolist() == expected.scores.tolist()
    assert result.attributes == expected.attributes


def test_every_shard_answers_exact_merge_with_versions_per_shard_and_the_oldest_as_corpus_version():
    shards = three_shards()
    out = run(router(shards).search([query(k=4), query(k=10)]))
    assert_result(out[0], merge_hits([s.lists[0] for s in shards], 4))
    assert out[0].post_ids.tolist() == [2, 3, 1, 4]  # 0.5 ties: 4 < 5 < 6 by post id; 5 and 6 cut
    assert_result(out[1], merge_hits([s.lists[1] for s in shards], 10))
    assert out[1].post_ids.tolist() == [5, 2, 12]  # k beyond the union: the whole union
    for r in out:
        assert r.shard_versions == (7, 5, 9)
        assert r.version == 5
        assert r.missing_shards == ()
        assert r.fingerprint == MODEL
    assert all(s.score_calls == [(2, MODEL, pytest.approx(DEFAULT_TIMEOUT_S, abs=0.5))] for s in shards)


def test_one_shard_down_fails_strict_queries_unavailable_and_answers_partial_ones():
    down = ShardUnavailable(1, "shard 1 at 127.0.0.1:1 did not answer (UNAVAILABLE: connection refused)")
    shards = three_shards({1: down})
    strict, partial = run(router(shards).search([query(k=4), query(k=4, allow_partial=True)]))
    assert strict is down
    assert isinstance(strict, NotReady)  # NotReady maps to UNAVAILABLE (shared/errors.py)
    assert_result(partial, merge_hits([shards[0].lists[1], shards[2].lists[1]], 4))
    assert partial.post_ids.tolist() == [5, 2, 12]
    assert partial.missing_shards == (1,)
    assert partial.shard_versions == (7, 0, 9)
    assert partial.version == 7  # the oldest among the shards that answered


def test_a_shard_failing_otherwise_is_unavailable_too():
    shards = three_shards({2: RuntimeError("boom")})
    strict, partial = run(router(shards).search([query(), query(allow_partial=True)]))
    assert type(strict) is NotReady and "boom" in str(strict)
    assert partial.missing_shards == (2,)
    shards = three_shards({0: DeadlineExpired("deadline passed while waiting for shard 0")})
    strict, partial = run(router(shards).search([query(), query(allow_partial=True)]))
    assert isinstance(strict, DeadlineExpired)
    assert partial.missing_shards == (0,) and partial.post_ids.tolist() == [5, 2]


def test_every_shard_down_fails_even_partial_queries():
    shards = three_shards({i: ShardUnavailable(i, f"shard {i} down") for i in range(3)})
    out = run(router(shards).search([query(allow_partial=True), query()]))
    assert all(isinstance(r, ShardUnavailable) for r in out)


def test_model_mismatch_from_one_shard_fails_every_query_and_refreshes():
    mismatch = ModelMismatch("shard 2 serves model model-b, not model-a")
    shards = three_shards({2: mismatch})
    shards[2].status_reply = ShardStatus(True, 10, "model-b", 10, 4)
    r = router(shards)
    out = run(r.search([query(), query(allow_partial=True), query(k=1)]))
    assert out == [mismatch] * 3  # never a merge of two models, partial or not
    assert [s.status_calls for s in shards] == [1, 1, 1]  # refresh() asked every shard
    info = r.info()
    assert info is not None and info.fingerprint == "model-b" and info.version == 10


def test_mismatch_wins_over_an_unavailable_shard():
    mismatch = ModelMismatch("shard 0 serves another model")
    shards = three_shards({0: mismatch, 1: ShardUnavailable(1, "down")})
    out = run(router(shards).search([query(allow_partial=True)]))
    assert out == [mismatch]


def test_the_tightest_deadline_of_the_batch_bounds_every_shard_call():
    async def main():
        shards = three_shards()
        r = router(shards)
        now = asyncio.get_running_loop().time()
        out = await r.search([query(deadline=now + 2.0), query(deadline=now + 0.5), query()])
        assert all(isinstance(x, SearchResult) for x in out)
        for s in shards:
            [(n, fingerprint, timeout)] = s.score_calls
            assert n == 3 and fingerprint == MODEL
            assert 0.0 < timeout <= 0.5  # the 0.5 s query's (a lower bound would race a slow machine)
        # none with a deadline: the default; a deadline already past: a tiny positive timeout
        for s in shards:
            s.score_calls.clear()
        await r.search([query()])
        assert all(DEFAULT_TIMEOUT_S / 2 < s.score_calls[0][2] <= DEFAULT_TIMEOUT_S for s in shards)
        for s in shards:
            s.score_calls.clear()
        await r.search([query(deadline=now - 1.0)])
        assert all(0 < s.score_calls[0][2] <= 0.01 for s in shards)

    run(main())


def test_queries_of_two_models_go_to_the_shards_in_separate_calls():
    shards = three_shards()
    out = run(router(shards).search([query(), Query(torch.zeros(4), "model-b", 3), query(k=1)]))
    assert [r.fingerprint for r in out] == [MODEL, "model-b", MODEL]
    for s in shards:
        assert sorted((n, f) for n, f, _ in s.score_calls) == [(1, "model-b"), (2, MODEL)]
    assert out[2].post_ids.tolist() == [5]  # the 2nd query of its group: each shard's 2nd list


def status(version: int, model: str, size: int, ready: bool = True, dim: int = 4) -> ShardStatus:
    return ShardStatus(ready, version, model, size, dim)


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        # one model: the oldest version, the sizes summed
        ([status(7, "a", 10), status(5, "a", 20), status(9, "a", 30)], CorpusView(5, "a", 60, 4)),
        # a rollout half way: the newest shard's model, the oldest version among the shards on it,
        # only their sizes (the shards still on "a" are not counted)
        (
            [status(3, "a", 10), status(12, "b", 20, dim=8), status(11, "b", 30, dim=8), status(4, "a", 5)],
            CorpusView(11, "b", 50, 8),
        ),
        # shards that are not ready, do not answer or have no corpus yet count for nothing
        (
            [status(8, "a", 10), None, status(99, "b", 70, ready=False), status(0, "", 0)],
            CorpusView(8, "a", 10, 4),
        ),
        ([None, status(5, "a", 10, ready=False)], None),
    ],
)
def test_info_from_the_shards_statuses(statuses, expected):
    shards = [FakeShard(i, [], status=s) for i, s in enumerate(statuses)]
    for s, reply in zip(shards, statuses, strict=True):
        s.status_reply = reply
    r = router(shards)
    assert r.info() is None  # nothing known before the first refresh
    run(r.refresh())
    assert r.info() == expected
    assert r.shards_ready() == sum(1 for s in statuses if s is not None and s.ready)
    assert all(s.status_calls == 1 for s in shards)


def test_concurrent_refreshes_share_one_round():
    shards = three_shards()
    r = router(shards)

    async def main():
        await asyncio.gather(*(r.refresh() for _ in range(5)))

    run(main())
    assert [s.status_calls for s in shards] == [1, 1, 1]


def test_settle_waits_until_the_shards_agree_on_a_model():
    shards = three_shards()
    shards[1].status_reply = status(3, "old", 10)
    r = router(shards)

    async def main():
        loop = asyncio.get_running_loop()

        async def finish_rollout():
            await asyncio.sleep(0.05)
            shards[1].status_reply = status(6, MODEL, 10)

        task = asyncio.create_task(finish_rollout())
        await r.settle(loop.time() + 5.0, poll_s=0.01)
        await task
        assert r.info() == CorpusView(6, MODEL, 30, 4)
        assert shards[1].status_calls >= 2
        # never agreeing: settle gives up at the deadline
        shards[1].status_reply = status(7, "other", 10)
        t0 = loop.time()
        await r.settle(t0 + 0.1, poll_s=0.01)
        assert loop.time() - t0 < 1.0

    run(main())


def test_close_closes_every_shard_and_a_router_needs_shards():
    shards = three_shards()
    run(router(shards).close())
    assert all(s.closed for s in shards)
    with pytest.raises(ValueError, match="at least one shard"):
        router([])


def test_a_shard_channel_retries_scoreshard_and_reconnects_within_seconds(monkeypatch):
    """The router's channel to a shard: ScoreShard retried on UNAVAILABLE (another replica of the shard),
    and gRPC's reconnect backoff capped at 2 s (its default grows to 120 s: a shard back after a 30 s
    outage was used again only 17 s after it was serving)."""
    seen: list[list[tuple[str, object]]] = []
    real = shard_client.aio_channel

    def recording(address, options, tls=None):
        seen.append(list(options))
        return real(address, options, tls)

    monkeypatch.setattr(shard_client, "aio_channel", recording)

    async def main():
        client = shard_client.ShardClient(
            1, 2, "ipv4:127.0.0.1:1,127.0.0.1:2", [("grpc.max_send_message_length", 9)]
        )
        await client.close()

    run(main())
    [options] = seen
    opts = dict(options)
    assert opts["grpc.max_send_message_length"] == 9
    assert opts["grpc.max_reconnect_backoff_ms"] <= 2000 and opts["grpc.initial_reconnect_backoff_ms"] <= 1000
    config = json.loads(opts["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = config["methodConfig"]
    assert {(n["service"].rsplit(".", 1)[-1], n["method"]) for n in method["name"]} == {
        ("ShardScorer", "ScoreShard"),
        ("Health", "Check"),  # retried on every balanced channel (shared/channels.py)
    }
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
