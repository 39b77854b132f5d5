"""The follower's snapshot progress: a snapshot streamed in chunks logs tqdm progress lines through the
gateway's logger, the last when the index serves it; a snapshot given up (a gap, a broken stream)
ends its progress without a last line claiming it was loaded."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import torch

from retrieval_gateway.follower import CorpusFollower
from retrieval_gateway.index import CorpusIndex
from shared import codec
from twotower.v1 import candidate_tower_pb2 as pb

LOGGER = "retrieval_gateway.follower"
FP = "f" * 16
D = 4


def snapshot_chunk(index: int, num_chunks: int, posts: list[int], total: int) -> pb.CorpusEvent:
    msg = pb.SnapshotChunk(
        version=3, fingerprint=FP, chunk_index=index, num_chunks=num_chunks, total_items=total
    )
    msg.post_ids.CopyFrom(codec.encode(np.asarray(posts, np.int64)))
    msg.author_ids.CopyFrom(codec.encode(np.asarray(posts, np.int64) % 7))
    msg.embeddings.CopyFrom(codec.encode(torch.ones(len(posts), D)))
    for _ in posts:
        msg.attributes.add()
    return pb.CorpusEvent(snapshot_chunk=msg)


class _Call:
    """A WatchCorpus call that yields `events` and then ends."""

    def __init__(self, events: list[pb.CorpusEvent]) -> None:
        self._events = events

    async def initial_metadata(self):
        return ()

    def done(self) -> bool:
        return False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for event in self._events:
            yield event

    def cancel(self) -> None:
        pass


class _Stub:
    def __init__(self, events: list[pb.CorpusEvent]) -> None:
        self.events = events

    def WatchCorpus(self, request):
        return _Call(self.events)


def follow_once(events: list[pb.CorpusEvent]) -> tuple[CorpusFollower, tuple[bool, bool, str]]:
    follower = CorpusFollower(
        "candidate:0", CorpusIndex("cpu", "fp32"), [], max_corpus_items=100, backoff_initial_s=0.1,
        backoff_max_s=1.0,
    )  # fmt: skip
    return follower, asyncio.run(follower._follow_once(_Stub(events), False))


def _lines(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("snapshot")
    ]


def test_a_snapshot_in_chunks_logs_its_progress_until_the_index_serves_it(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    follower, (ok, fresh, _) = follow_once(
        [snapshot_chunk(0, 2, [1, 2, 3], 5), snapshot_chunk(1, 2, [4, 5], 5)]
    )
    assert ok and not fresh and follower.index.info().size == 5
    (last,) = _lines(caplog)  # shorter than an interval: only the last line
    assert last.startswith(f"snapshot v3 ({FP}): 5/5 (100%) in ")
    assert "item/s" in last and last.endswith(" left, loaded into the index")


def test_a_snapshot_given_up_ends_its_progress_without_a_last_line(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    delta = pb.CorpusEvent(delta=pb.CorpusDelta(version=4, fingerprint=FP))
    follower, (_, fresh, reason) = follow_once([snapshot_chunk(0, 2, [1, 2, 3], 5), delta])
    assert fresh and reason == "gap" and follower.index.info() is None
    assert _lines(caplog) == [] and follower._snapshot_bar is None


def test_a_server_that_is_down_never_counts_as_connected():
    # grpc.aio's initial_metadata() returns (empty) when the call failed before any header: taken for
    # the server's headers, it made the gateway report "connected" on every retry against a dead
    # candidate_service, for as long as the failed call took to raise (seen once in a fault test).
    import socket

    import grpc

    from twotower.v1 import candidate_tower_pb2_grpc as pb_grpc

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    follower = CorpusFollower(
        f"127.0.0.1:{port}", CorpusIndex("cpu", "fp32"), [], max_corpus_items=100, backoff_initial_s=0.1,
        backoff_max_s=1.0,
    )  # fmt: skip
    seen = []
    follower._connected = lambda version: seen.append(version)

    async def once():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await asyncio.wait_for(
                follower._follow_once(pb_grpc.CandidateTowerStub(channel), False), 10
            )

    received, fresh, reason = asyncio.run(once())
    assert (received, fresh, reason) == (False, False, "UNAVAILABLE")
    assert seen == [] and not follower.connected
