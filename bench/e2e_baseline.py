"""The in-process floor: the same user tower and index calls the stack makes, in one process, no gRPC.

The corpus is loaded exactly as the gateway loads it (a CorpusFollower streaming candidate_service's
snapshot into a CorpusIndex); the user tower is user_service's own UserEncoder. One step of the
baseline at batch sizes (Bu, Bg) is what the stack does for a batch of requests: the gateway's request
checks (retrieve_spec_from_proto), user_service's proto conversion and validation, one forward pass of
Bu users, and one CorpusIndex.search of Bg queries. The batch sizes are the mean batch sizes the
services reported at the same concurrency, so the comparison is like for like.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from bench.loadgen import percentile
from retrieval_gateway.config import GatewayConfig
from retrieval_gateway.convert import retrieve_spec_from_proto
from retrieval_gateway.follower import CorpusFollower
from retrieval_gateway.index import CorpusIndex, Query
from shared.convert import user_context_from_proto
from shared.device import resolve_device
from shared.model.features import validate_user
from twotower.v1 import retrieval_gateway_pb2
from user_service.config import UserServiceConfig
from user_service.encoder import UserEncoder, load_encoder

SNAPSHOT_TIMEOUT_S = 300.0


class Baseline:
    def __init__(self, encoder: UserEncoder, index: CorpusIndex) -> None:
        self.encoder, self.index = encoder, index
        self.gw = GatewayConfig(user_service="-:0", candidate_service="-:0")  # the gateway's limits
        info = index.info()
        assert info is not None
        self.fingerprint = info.fingerprint

    @classmethod
    async def load(
        cls, checkpoint: str, candidate_address: str, device: str, cpu_tower: str = "eager",
        tower_cache_dir: Path | None = None,
    ) -> Baseline:  # fmt: skip
        # the same tower as the served one: CUDA graphs on cuda, as user_service captures them, and
        # on cpu the same runtime (ONNX Runtime, compiled or eager)
        encoder = load_encoder(
            checkpoint, device, "fp32", GatewayConfig.max_history_events,
            UserServiceConfig.max_batch_size if UserServiceConfig.cuda_graphs else 0, cpu_tower,
            tower_cache_dir,
        )  # fmt: skip
        encoder.warm_up([1, 8])
        gw = GatewayConfig(user_service="-:0", candidate_service=candidate_address, device=device)
        index = CorpusIndex(resolve_device(gw.device), gw.dtype, gw.max_score_elements, gw.fused_gemv)
        follower = CorpusFollower(
            candidate_address, index, gw.server.channel_options(), max_corpus_items=gw.max_corpus_items,
            backoff_initial_s=gw.reconnect_initial_s, backoff_max_s=gw.reconnect_max_s,
        )  # fmt: skip
        task = asyncio.create_task(follower.run())
        try:
            deadline = time.monotonic() + SNAPSHOT_TIMEOUT_S
            while index.info() is None:
                if time.monotonic() > deadline or task.done():
                    raise RuntimeError("no corpus snapshot from candidate_service for the baseline")
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return cls(encoder, index)

    def step(
        self, requests: list[retrieval_gateway_pb2.RetrieveRequest], bu: int, bg: int
    ) -> tuple[float, float]:
        """(user seconds for bu users, index seconds for bg queries) over the first max(bu, bg) requests."""
        gw, cfg, limit = self.gw, self.encoder.config, self.encoder.max_history_events
        t0 = time.perf_counter()
        specs = [
            retrieve_spec_from_proto(r, gw.max_k, gw.max_exclusions, gw.max_history_events)
            for r in requests[:bu]
        ]
        contexts = []
        for r in requests[:bu]:
            ctx = user_context_from_proto(r.user, cfg.num_actions, limit)
            validate_user(ctx, cfg, limit)
            contexts.append(ctx)
        emb = self.encoder.encode(contexts).float()  # [bu, D]
        t1 = time.perf_counter()
        queries = [
            Query(emb[j % bu], self.fingerprint, specs[j % bu].k, specs[j % bu].exclude_post_ids,
                  specs[j % bu].exclude_author_ids)
            for j in range(bg)
        ]  # fmt: skip
        self.index.search(queries)
        return t1 - t0, time.perf_counter() - t1

    def measure(
        self, requests: list[retrieval_gateway_pb2.RetrieveRequest], bu: int, bg: int, seconds: float
    ) -> dict[str, float]:
        """Repeat steps for `seconds` (at least 5), cycling through the requests."""
        bu, bg = max(1, bu), max(1, bg)
        self.step(requests, bu, bg)  # warm this batch shape
        user_s: list[float] = []
        index_s: list[float] = []
        began, i = time.perf_counter(), 0
        while len(user_s) < 5 or time.perf_counter() - began < seconds:
            window = [requests[(i + j) % len(requests)] for j in range(max(bu, bg))]
            u, g = self.step(window, bu, bg)
            user_s.append(u)
            index_s.append(g)
            i += max(bu, bg)
            if len(user_s) >= 100_000:
                break
        total = [u + g for u, g in zip(user_s, index_s, strict=True)]
        per_request = percentile(user_s, 50) / bu + percentile(index_s, 50) / bg
        return {
            "user_batch": bu, "index_batch": bg, "steps": len(total),
            "user_p50_ms": percentile(user_s, 50) * 1e3, "index_p50_ms": percentile(index_s, 50) * 1e3,
            "p50_ms": percentile(total, 50) * 1e3, "p90_ms": percentile(total, 90) * 1e3,
            "p99_ms": percentile(total, 99) * 1e3,
            "qps": 1.0 / per_request,  # one core-set doing nothing else: the compute-bound ceiling
        }  # fmt: skip
