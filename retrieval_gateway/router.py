"""The router's scorer (--role router): a batch of queries -> every shard at once -> exact merge.

Takes the place of the corpus index in the gateway's request path: the gateway still parses, encodes
each user once (user_service) and batches concurrent requests; the scoring batch goes to all S shards
concurrently (one ScoreShard call each, bounded by the batch's tightest deadline), and each query's
top-k is merged exactly (retrieval_gateway/sharding.py). What the router knows about the corpus
(model, D, versions, size) comes from the shards' GetStatus, polled in the background and refreshed
at once when a shard reports another model.

Consistency, as documented in the README: every hit of a response comes from the same model (a shard
on another model fails the query, which the gateway retries once the router has refreshed); shards
follow the corpus independently, so a response may combine versions a few milliseconds apart; the
response lists each shard's version and its corpus_version is the oldest of them. A shard that does
not answer fails the query UNAVAILABLE, unless the query allows partial results: then the others'
merge comes back flagged with the missing shards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from retrieval_gateway.index import CorpusView, Query, SearchResult
from retrieval_gateway.shard_client import ShardAnswer, ShardClient, ShardStatus
from retrieval_gateway.sharding import merge_hits
from shared.errors import ModelMismatch, NotReady, ServiceError

logger = logging.getLogger(__name__)


class ShardRouter:
    def __init__(
        self, shards: Sequence[ShardClient], default_timeout_s: float, status_timeout_s: float
    ) -> None:
        if not shards:
            raise ValueError("a router needs at least one shard")
        self.shards = list(shards)
        self.default_timeout_s = default_timeout_s
        self.status_timeout_s = status_timeout_s
        self.statuses: list[ShardStatus | None] = [None] * len(self.shards)
        self._info: CorpusView | None = None
        self._refreshing: asyncio.Task | None = None

    # ---- what the router knows of the corpus ----------------------------------------------------
    def info(self) -> CorpusView | None:
        """The corpus the shards serve: the model of the newest ready shard, the oldest version among
        the shards on that model, the sum of their sizes. None while no shard is ready."""
        return self._info

    def shards_ready(self) -> int:
        return sum(1 for s in self.statuses if s is not None and s.ready)

    async def refresh(self) -> None:
        """Ask every shard for its status (concurrent callers share one round)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        self.statuses = list(await asyncio.gather(*(s.status(self.status_timeout_s) for s in self.shards)))
        ready = [s for s in self.statuses if s is not None and s.ready and s.fingerprint]
        if not ready:
            self._info = None
            return
        newest = max(ready, key=lambda s: s.version)
        same = [s for s in ready if s.fingerprint == newest.fingerprint]
        self._info = CorpusView(
            version=min(s.version for s in same),
            fingerprint=newest.fingerprint,
            size=sum(s.size for s in same),
            dim=newest.dim,
        )

    async def settle(self, deadline: float, poll_s: float = 0.02) -> None:
        """Refresh until every ready shard serves the same model, or `deadline` (loop.time()) passes."""
        loop = asyncio.get_running_loop()
        while True:
            await self.refresh()
            models = {s.fingerprint for s in self.statuses if s is not None and s.ready}
            if len(models) <= 1 or loop.time() + poll_s >= deadline:
                return
            await asyncio.sleep(poll_s)

    async def follow(self, poll_s: float) -> None:
        """Refresh every poll_s until cancelled (run supervised)."""
        while True:
            await self.refresh()
            await asyncio.sleep(poll_s)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards), return_exceptions=True)

    # ---- scoring ---------------------------------------------------------------------------------
    async def search(self, queries: list[Query]) -> list[SearchResult | Exception]:
        """One scoring batch: grouped by model (one group, except during a rollout), each group sent to
        every shard at once."""
        groups: dict[str, list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(q.fingerprint, []).append(i)
        results: list[SearchResult | Exception | None] = [None] * len(queries)
        outs = await asyncio.gather(
            *(self._search_group([queries[i] for i in idx]) for idx in groups.values())
        )
        for idx, out in zip(groups.values(), outs, strict=True):
            for i, r in zip(idx, out, strict=True):
                results[i] = r
        return results  # type: ignore[return-value]

    async def _search_group(self, queries: list[Query]) -> list[SearchResult | Exception]:
        loop = asyncio.get_running_loop()
        fingerprint = queries[0].fingerprint
        deadlines = [q.deadline for q in queries if q.deadline is not None]
        deadline = min(deadlines) if deadlines else loop.time() + self.default_timeout_s
        timeout = max(0.001, deadline - loop.time())
        answers = await asyncio.gather(
            *(s.score(queries, fingerprint, timeout) for s in self.shards), return_exceptions=True
        )
        ok = [a for a in answers if isinstance(a, ShardAnswer)]
        failed = [(i, a) for i, a in enumerate(answers) if not isinstance(a, ShardAnswer)]
        for i, exc in failed:
            if not isinstance(exc, Exception):  # CancelledError and the like: not ours to absorb
                raise exc
            if not isinstance(exc, (ModelMismatch, NotReady)):
                logger.warning("shard %d failed unexpectedly: %r", i, exc)
        mismatch = next((a for _, a in failed if isinstance(a, ModelMismatch)), None)
        if mismatch is not None:
            # A shard on another model (a rollout reaching the shards one by one): never mix models.
            # Learn the new state now, so that the gateway's retry encodes with the right model.
            await self.refresh()
            return [mismatch] * len(queries)
        versions = [0] * len(self.shards)
        for a in ok:
            versions[a.index] = a.version
        missing = tuple(i for i, _ in failed)
        error = failed[0][1] if failed else None
        if not ok:
            return [_unavailable(error)] * len(queries)
        out: list[SearchResult | Exception] = []
        for qi, q in enumerate(queries):
            if missing and not q.allow_partial:
                out.append(_unavailable(error))
                continue
            merged = merge_hits([a.hits[qi] for a in ok], q.k)
            out.append(
                SearchResult(
                    merged.post_ids,
                    merged.author_ids,
                    merged.scores,
                    merged.attributes,
                    version=min(a.version for a in ok),
                    fingerprint=fingerprint,
                    missing_shards=missing,
                    shard_versions=tuple(versions),
                )
            )
        return out


def _unavailable(error: BaseException | None) -> Exception:
    if isinstance(error, ServiceError):  # ShardUnavailable (UNAVAILABLE), DeadlineExpired, ...
        return error
    return NotReady(f"a shard did not answer: {error!r}")
