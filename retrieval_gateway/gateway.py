"""The gateway's request path and background work: user embedding -> batched search.

Owns the corpus index, the corpus follower, the user_service client and the micro-batcher; the
servicer converts protos (convert.py) and delegates here. Domain types in and out: a RetrieveSpec in,
a SearchResult out, a GatewayReport for GetStatus.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from retrieval_gateway import metrics
from retrieval_gateway.config import GatewayConfig
from retrieval_gateway.follower import CorpusFollower
from retrieval_gateway.index import CorpusIndex, CorpusView, Query, SearchResult, model_mismatch
from retrieval_gateway.router import ShardRouter
from retrieval_gateway.shard_client import ShardClient
from retrieval_gateway.sharding import ShardFilter
from retrieval_gateway.user_client import UserServiceClient
from shared.batching import BatchReport, MicroBatcher
from shared.device import resolve_device
from shared.errors import (
    DeadlineExpired,
    InvalidInput,
    ModelMismatch,
    NotReady,
    PreconditionFailed,
    ServiceError,
)
from shared.model.features import UserContext
from shared.server.bootstrap import Health
from shared.supervision import Supervisor, TaskState

logger = logging.getLogger(__name__)

_SWITCH_RETRIES = 2  # a request restarts at most this often because the corpus changed model under it
_ROUTER_SWITCH_RETRIES = 8  # a router's: its shards switch one after another (each wait is bounded)
_IN_TRANSIT_S = 0.003  # a loopback round trip: the clients of a finished batch sending their next requests


@dataclass(frozen=True)
class RetrieveSpec:
    """One Retrieve, parsed and checked (convert.retrieve_spec_from_proto)."""

    user: UserContext  # checked once; sent to user_service in columns (no re-parse)
    k: int
    exclude_post_ids: np.ndarray  # [e] int64: explicit exclusions plus history posts when asked
    exclude_author_ids: np.ndarray  # [a] int64
    allow_partial: bool = False  # a router: may the shards that answer answer alone?


@dataclass(frozen=True)
class GatewayReport:
    """What GetStatus tells (convert.status_to_proto)."""

    ready: bool
    role: str
    device: str
    dtype: str  # corpus storage: "fp32" or "bf16"
    candidate_service_connected: bool
    user_calls_in_flight: int
    shard_index: int  # role shard: this shard (0 otherwise)
    num_shards: int  # role shard or router
    corpus: CorpusView | None
    background_tasks: list[TaskState] = field(default_factory=list)


@dataclass(frozen=True)
class _UserJob:
    user: UserContext  # parsed and checked by the gateway
    fingerprint: str  # the model to encode with: the model of the corpus it will be scored against
    deadline: float  # loop.time() by which the caller stops waiting for its embedding


class Gateway:
    """One of three roles (--role): single (the whole corpus), shard (its slice, scored for a router;
    no Retrieve), router (no corpus: each scoring batch goes to every shard, see router.py)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.role = config.role
        options = config.server.channel_options()
        self.router: ShardRouter | None = None
        self.index: CorpusIndex | None = None
        self.follower: CorpusFollower | None = None
        if self.role == "router":
            self.device = torch.device("cpu")  # the shards hold the corpus; the router merges on the host
            shards = [
                ShardClient(i, len(config.shard_addresses), address, options, config.upstream_tls)
                for i, address in enumerate(config.shard_addresses)
            ]
            self.router = ShardRouter(shards, config.user_timeout_s, config.health_poll_s)
            search = self.router.search
        else:
            self.device = resolve_device(config.device)
            self.index = CorpusIndex(self.device, config.dtype, config.max_score_elements, config.fused_gemv)
            search = self.index.search
        self.users = UserServiceClient(config.user_service, options, tls=config.upstream_tls)
        # Concurrent requests share one EncodeUsers call (user_service batches the forward pass; this
        # saves one RPC per request on both sides). Awaited on the loop: it is I/O, not compute. Several
        # calls may be in flight: one slow or stalled user_service replica does not hold up the others,
        # and the next users are encoded while the scorer works on the previous ones.
        self.user_batcher: MicroBatcher[_UserJob, tuple[torch.Tensor, str]] = MicroBatcher(
            self._encode_users,
            max_batch_size=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000.0,
            max_queue=config.max_queue,
            name="gateway-user-encode",
            max_in_flight=config.max_user_calls_in_flight,
        )
        self._last_scoring_s = 0.0  # compute time of the last scoring batch ...
        self._last_batch_size = 0  # ... and its size
        self._encoding = 0  # requests between parsing and the scorer (see _scoring_linger)
        self.batcher: MicroBatcher[Query, SearchResult] = MicroBatcher(
            search,
            max_batch_size=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000.0,
            max_queue=config.max_queue,
            on_batch=self._on_batch,
            name="gateway-scoring",
            linger=self._scoring_linger,
        )
        self._wake = asyncio.Event()
        if self.index is not None:
            self.follower = CorpusFollower(
                config.candidate_service,
                self.index,
                options,
                max_corpus_items=config.max_corpus_items,
                backoff_initial_s=config.reconnect_initial_s,
                backoff_max_s=config.reconnect_max_s,
                on_change=self._on_corpus_change,
                tls=config.upstream_tls,
                shard=ShardFilter(config.shard_index, config.num_shards) if self.role == "shard" else None,
            )
        self.supervisor = Supervisor(
            backoff_initial_s=config.reconnect_initial_s, backoff_max_s=config.reconnect_max_s
        )

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, health: Health) -> None:
        """Start scoring, following the corpus and tracking readiness (on the running loop)."""
        self.batcher.start()
        self.user_batcher.start()
        # Supervised: a crash is logged, counted, shown in GetStatus, and the loop restarted.
        if self.follower is not None:
            self.supervisor.spawn("corpus-follower", self.follower.run, lambda _exc: self._follower_crashed())
        if self.router is not None:
            router = self.router
            self.supervisor.spawn("shard-status", lambda: router.follow(self.config.health_poll_s))
        self.supervisor.spawn("readiness", lambda: self._track_readiness(health))

    def _follower_crashed(self) -> None:
        if self.follower is not None:
            self.follower.disconnected("crash")
        self._wake.set()

    async def stop(self) -> None:
        await self.supervisor.stop()
        await self.user_batcher.stop()
        await self.batcher.stop()
        await self.users.close()
        if self.router is not None:
            await self.router.close()

    def corpus_info(self) -> CorpusView | None:
        """The corpus this gateway scores against (a router: what its shards report)."""
        if self.router is not None:
            return self.router.info()
        assert self.index is not None
        return self.index.info()

    def ready(self) -> bool:
        if self.role == "shard":  # scores for a router: needs its corpus, not user_service
            return self.corpus_info() is not None
        return self.corpus_info() is not None and self.users.reachable

    async def _track_readiness(self, health: Health) -> None:
        """SERVING once a corpus is in and user_service answers; back to NOT_SERVING while it does not."""
        poll = self.config.health_poll_s
        while True:
            if self.role != "shard":
                await self.users.probe(timeout=poll)
            ready = self.ready()
            if ready != health.serving:
                logger.info(
                    "gateway %s", "SERVING" if ready else "NOT_SERVING (waiting for corpus / user_service)"
                )
                await health.set_serving(ready)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll)

    def _on_corpus_change(self) -> None:
        info = self.corpus_info()
        if info is not None:
            metrics.CORPUS_VERSION.set(info.version)
            metrics.CORPUS_SIZE.set(info.size)
            metrics.set_model(info.fingerprint)
        self._wake.set()

    def _on_batch(self, report: BatchReport) -> None:
        self._last_scoring_s, self._last_batch_size = report.compute_s, report.size
        metrics.BATCH_SIZE.observe(report.size)
        metrics.BATCH_COMPUTE.observe(report.compute_s)

    def _scoring_linger(self) -> float:
        """How long a scoring batch may stay open for requests on their way to it. Without it,
        concurrent requests split into cohorts that take turns on the matmul: the cohort whose batch
        just finished is still between the client and the scorer when the next batch starts (1M items,
        c=32: mean batch 2.8 with one user call in flight, 12.8 with four). Up to half the last batch's
        compute, capped by --max-linger-ms, while requests are being encoded; a moment
        (_IN_TRANSIT_S) after a batch of several, whose clients are sending their next requests; and
        not at all otherwise. A lone request waits only while another one is being encoded (also
        one stuck on a stalled user_service: bounded by the same cap)."""
        cap = min(self.config.max_linger_ms / 1000.0, 0.5 * self._last_scoring_s)
        if self._encoding:
            return cap
        return min(cap, _IN_TRANSIT_S) if self._last_batch_size > 1 else 0.0

    # ---- requests ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def request_outcome(self) -> Iterator[None]:
        """Around one Retrieve, its parsing included: a shard refuses it first, and its outcome and total
        latency are counted (an INVALID_ARGUMENT too)."""
        start = time.perf_counter()
        try:
            self._refuse_on_shard()
            yield
        except ServiceError as exc:
            metrics.REQUESTS.labels(type(exc).__name__).inc()
            if isinstance(exc, ModelMismatch):
                metrics.FINGERPRINT_MISMATCH.inc()
            raise
        except Exception:
            metrics.REQUESTS.labels("error").inc()
            raise
        metrics.REQUESTS.labels("ok").inc()
        metrics.LATENCY.labels("total").observe(time.perf_counter() - start)

    def _refuse_on_shard(self) -> None:
        cfg = self.config
        if self.role == "shard":
            raise PreconditionFailed(
                f"this gateway is shard {cfg.shard_index} of {cfg.num_shards} (--role shard): it answers its "
                "router's ScoreShard calls; send Retrieve to the router"
            )

    async def retrieve(self, spec: RetrieveSpec, time_remaining: float | None) -> SearchResult:
        """One checked request's results (within `request_outcome()`, which counts it). `time_remaining`:
        seconds left of the caller's deadline (None = no deadline)."""
        self._refuse_on_shard()
        cfg = self.config
        loop = asyncio.get_running_loop()
        deadline = None if time_remaining is None else loop.time() + time_remaining
        user_deadline = loop.time() + (cfg.user_timeout_s if time_remaining is None else time_remaining)
        # The user is encoded with the model of the corpus it will be scored against. When a rollout
        # swaps the corpus between the two steps (a new model's snapshot), the request starts over
        # with the new model instead of failing: a response never mixes fingerprints, and a rollout
        # fails no request.
        retries = _SWITCH_RETRIES if self.router is None else _ROUTER_SWITCH_RETRIES
        for attempt in range(retries + 1):
            info = self._corpus_or_raise()  # fail fast, before spending a user_service call
            t0 = time.perf_counter()
            self._encoding += 1
            try:
                embedding, fingerprint = await self.user_batcher.submit(
                    _UserJob(spec.user, fingerprint=info.fingerprint, deadline=user_deadline), deadline
                )
            finally:
                self._encoding -= 1
            t1 = time.perf_counter()
            metrics.LATENCY.labels("user_encode").observe(t1 - t0)
            now = self._corpus_or_raise()
            if fingerprint != now.fingerprint:  # checked again, atomically, inside the scoring batch
                if fingerprint == info.fingerprint and attempt < retries:
                    metrics.MODEL_SWITCH_RETRIES.inc()
                    continue  # the corpus moved to another model meanwhile
                raise model_mismatch(fingerprint, now.fingerprint)
            if embedding.shape[0] != now.dim:
                raise NotReady(f"user_service returned D={embedding.shape[0]} for a corpus of D={now.dim}")
            query = Query(
                embedding, fingerprint, spec.k, spec.exclude_post_ids, spec.exclude_author_ids,
                allow_partial=spec.allow_partial, deadline=deadline,
            )  # fmt: skip
            try:
                result = await self.batcher.submit(query, deadline)
            except ModelMismatch:
                if self.router is not None and attempt < retries:
                    # Shards switch models one after the other: wait (within the deadline) until they
                    # agree again, then encode with their model. No response mixes models.
                    await self.router.settle(user_deadline)
                    metrics.MODEL_SWITCH_RETRIES.inc()
                    continue
                if attempt < _SWITCH_RETRIES and self._corpus_or_raise().fingerprint != fingerprint:
                    metrics.MODEL_SWITCH_RETRIES.inc()
                    continue
                raise
            metrics.LATENCY.labels("scoring").observe(time.perf_counter() - t1)
            return result
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def _encode_users(self, jobs: list[_UserJob]) -> list[tuple[torch.Tensor, str] | BaseException]:
        """One EncodeUsers call per model asked for (one model, except during a rollout)."""
        groups: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.fingerprint, []).append(i)
        if len(groups) == 1:
            return await self._encode_group(jobs)
        results: list[tuple[torch.Tensor, str] | BaseException | None] = [None] * len(jobs)
        outs = await asyncio.gather(*(self._encode_group([jobs[i] for i in idx]) for idx in groups.values()))
        for idx, out in zip(groups.values(), outs, strict=True):
            for i, row in zip(idx, out, strict=True):
                results[i] = row
        return results  # type: ignore[return-value]

    async def _encode_group(self, jobs: list[_UserJob]) -> list[tuple[torch.Tensor, str] | BaseException]:
        """EncodeUsers for requests of one model, bounded by the TIGHTEST deadline among them: a call
        that outlives its most impatient caller holds a slot for nothing. When that deadline passes,
        the callers that still have time are sent again on their own (tighter-first) deadline."""
        loop = asyncio.get_running_loop()
        results: list[tuple[torch.Tensor, str] | BaseException | None] = [None] * len(jobs)
        todo = list(range(len(jobs)))
        while todo:
            batch = [jobs[i] for i in todo]
            timeout = max(0.001, min(job.deadline for job in batch) - loop.time())
            try:
                out = await self._encode_call(batch, timeout)
            except DeadlineExpired as exc:
                now = loop.time()
                expired = [i for i in todo if jobs[i].deadline <= now + 0.001]
                if not expired:  # the call failed faster than its deadline: nobody to retry for
                    expired = todo
                for i in expired:
                    results[i] = exc
                todo = [i for i in todo if i not in set(expired)]
                continue
            for i, row in zip(todo, out, strict=True):
                results[i] = row
            todo = []
        return results  # type: ignore[return-value]

    async def _encode_call(
        self, jobs: list[_UserJob], timeout: float
    ) -> list[tuple[torch.Tensor, str] | BaseException]:
        metrics.USER_CALLS_IN_FLIGHT.inc()
        try:
            return await self._encode_call_inner(jobs, timeout)
        finally:
            metrics.USER_CALLS_IN_FLIGHT.dec()

    async def _encode_call_inner(
        self, jobs: list[_UserJob], timeout: float
    ) -> list[tuple[torch.Tensor, str] | BaseException]:
        """One EncodeUsers call; DeadlineExpired propagates (the caller retries the patient ones)."""
        try:
            embeddings, fingerprint = await self.users.encode(
                [job.user for job in jobs], timeout, jobs[0].fingerprint
            )
        except InvalidInput as exc:
            if len(jobs) == 1:
                return [exc]
            # One bad user context (e.g. a feature id the model rejects) must not fail the others
            # coalesced with it: retry each alone, so only the bad one gets INVALID_ARGUMENT.
            return await asyncio.gather(*(self._encode_alone(job) for job in jobs), return_exceptions=True)
        except DeadlineExpired:
            raise
        except ServiceError as exc:
            return [exc] * len(jobs)
        return [(row, fingerprint) for row in embeddings]

    async def _encode_alone(self, job: _UserJob) -> tuple[torch.Tensor, str]:
        timeout = max(0.001, job.deadline - asyncio.get_running_loop().time())
        embeddings, fingerprint = await self.users.encode([job.user], timeout, job.fingerprint)
        return embeddings[0], fingerprint

    def _corpus_or_raise(self) -> CorpusView:
        info = self.corpus_info()
        if info is None:
            if self.router is not None:
                raise NotReady("no shard is ready yet (see --shard-addresses and each shard's status)")
            raise NotReady("no corpus yet: waiting for the first snapshot from candidate_service")
        if info.size == 0:
            raise NotReady(f"the corpus is empty (version {info.version}): nothing to retrieve")
        return info

    def status(self, serving: bool) -> GatewayReport:
        cfg = self.config
        tasks = [replace(state) for state in self.supervisor.states.values()]  # copies: a snapshot
        if self.follower is not None:
            tasks.append(  # errors the follower survived by resyncing
                TaskState(
                    "corpus-stream", self.follower.connected, self.follower.errors, self.follower.last_error
                )
            )
        return GatewayReport(
            ready=serving,
            role=self.role,
            device=str(self.device),
            dtype=self.index.dtype_name if self.index is not None else "fp32",
            candidate_service_connected=self.follower is not None and self.follower.connected,
            user_calls_in_flight=self.user_batcher.batches_in_flight,
            shard_index=cfg.shard_index if self.role == "shard" else 0,
            num_shards=len(cfg.shard_addresses) if self.router is not None else cfg.num_shards,
            corpus=self.corpus_info(),
            background_tasks=tasks,
        )

    # ---- shard role ------------------------------------------------------------------------------
    async def score_shard(
        self, queries: list[Query], shard_index: int, num_shards: int
    ) -> tuple[list[SearchResult], int, str]:
        """A router's batch against this shard's slice, in one pass over one corpus version: (results,
        version, fingerprint). Every query carries the router's model; another model fails the call."""
        cfg = self.config
        if self.role != "shard" or self.index is None:
            raise PreconditionFailed(
                f"this gateway has role {self.role}, not shard: ScoreShard is for shards"
            )
        if (shard_index, num_shards) != (cfg.shard_index, cfg.num_shards):
            raise PreconditionFailed(
                f"the router expects shard {shard_index} of {num_shards}; this is shard {cfg.shard_index} "
                f"of {cfg.num_shards}: the router's --shard-addresses and the shards' flags disagree"
            )
        info = self.corpus_info()
        if info is None:
            raise NotReady("no corpus yet: waiting for the first snapshot from candidate_service")
        for q in queries:
            if q.embedding.shape[0] != info.dim:
                raise InvalidInput(
                    f"embeddings have D={q.embedding.shape[0]}; this shard's corpus has D={info.dim}"
                )
        if info.size == 0:
            # An empty slice (a small corpus, or every item of this shard deleted) holds no hit: that is
            # an answer, not an outage (NotReady here failed every request of the router).
            for q in queries:
                if q.fingerprint != info.fingerprint:
                    raise model_mismatch(q.fingerprint, info.fingerprint)
            empty = SearchResult(
                np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), [],
                info.version, info.fingerprint,
            )  # fmt: skip
            return [empty] * len(queries), info.version, info.fingerprint
        results = await asyncio.to_thread(functools.partial(self.index.search, queries, encoded=True))
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise errors[0]  # the same model for every query: a mismatch is the whole call's
        done = [r for r in results if isinstance(r, SearchResult)]
        return done, done[0].version, done[0].fingerprint
