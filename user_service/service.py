"""Micro-batched encoding: admission, deadlines, fan-out of a call's users and fan-in of their rows.

No grpc import: errors are domain errors (shared/errors.py) that the interceptor maps to codes.

A call with n users becomes n items of the shared MicroBatcher, so a forward pass never exceeds
`max_batch_size` users whatever the mix of call sizes (a 256-user call is spread over several passes
and may share them with other callers), and the queue bound counts users, i.e. work. The call is
admitted whole or not at all: if its n users do not fit in the queue it fails at once with
RESOURCE_EXHAUSTED, and if any of its users fails later (deadline, shutdown) the rest are cancelled
so they cost no compute.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

import torch

from shared.batching import BatchStats, MicroBatcher
from shared.errors import InvalidInput, Overloaded
from shared.model.features import UserContext
from user_service import metrics
from user_service.encoder import ModelIdentity, UserEncoder
from user_service.models import ModelRegistry

_Job = tuple[UserEncoder, UserContext]  # the model to run and one user

logger = logging.getLogger(__name__)


class EncodingService:
    def __init__(
        self, *, max_batch_size: int, max_wait_s: float, max_queue: int, max_users_per_call: int,
        models: ModelRegistry | None = None,
    ) -> None:  # fmt: skip
        self.max_users_per_call = max_users_per_call
        self.models = models if models is not None else ModelRegistry()
        self._batcher: MicroBatcher[_Job, torch.Tensor] = MicroBatcher(
            self._process, max_batch_size=max_batch_size, max_wait_s=max_wait_s, max_queue=max_queue,
            on_batch=metrics.observe_batch, name="user-tower",
        )  # fmt: skip

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()

    def set_encoder(self, encoder: UserEncoder) -> None:
        """Make the service ready with this one model (after the encoder's warm-up)."""
        self.models.set_only(encoder)

    @property
    def encoder(self) -> UserEncoder:
        """The default model (NotReady while loading)."""
        return self.models.default

    @property
    def stats(self) -> BatchStats:
        return self._batcher.stats  # batches, items, sizes: the observed coalescing

    @property
    def queued(self) -> int:
        return self._batcher.queued

    # -- requests --------------------------------------------------------------------------------
    def check_call_size(self, n: int) -> None:
        """Before any per-user work: an empty or oversized call is rejected outright."""
        if n == 0:
            raise InvalidInput("EncodeUsersRequest.users is empty: send 1 or more users")
        if n > self.max_users_per_call:
            raise InvalidInput(f"{n} users in one call; the limit is {self.max_users_per_call}")

    async def encode(
        self, contexts: Sequence[UserContext], deadline: float | None = None, model: str | UserEncoder = ""
    ) -> tuple[torch.Tensor, ModelIdentity]:
        """Validated contexts -> ([n, D] embeddings, the model that made them). `model`: the encoder
        the contexts were validated against, or a fingerprint (ModelMismatch when not held), or "" for
        the default model.

        `deadline` is in `loop.time()` seconds: a user still queued then is dropped, not computed."""
        encoder = model if isinstance(model, UserEncoder) else self.models.get(model)
        self.check_call_size(len(contexts))
        if self._batcher.queued + len(contexts) > self._batcher.max_queue:
            raise Overloaded(
                f"user tower queue is full ({self._batcher.queued} of {self._batcher.max_queue} users "
                "waiting); retry later"
            )
        metrics.USERS.inc(len(contexts))
        if len(contexts) == 1:  # the common case: no extra task
            rows = [await self._batcher.submit((encoder, contexts[0]), deadline)]
        else:
            rows = await self._gather([self._batcher.submit((encoder, c), deadline) for c in contexts])
        return torch.stack(rows), encoder.identity  # [n, D]

    @staticmethod
    async def _gather(submissions: list[Coroutine[Any, Any, torch.Tensor]]) -> list[torch.Tensor]:
        tasks = [asyncio.ensure_future(s) for s in submissions]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:  # a failed or cancelled call leaves nothing behind in the queue
                task.cancel()
            raise

    def _process(self, jobs: list[_Job]) -> list[torch.Tensor]:
        """The batch function (worker thread): B users -> B rows of [D], one forward pass per model
        (two models only during a rollout)."""
        encoders = {id(encoder): encoder for encoder, _ in jobs}
        if len(encoders) == 1:
            return list(jobs[0][0].encode([ctx for _, ctx in jobs]).unbind(0))
        rows: list[torch.Tensor | None] = [None] * len(jobs)
        for key, encoder in encoders.items():
            idx = [i for i, (e, _) in enumerate(jobs) if id(e) == key]
            for i, row in zip(idx, encoder.encode([jobs[i][1] for i in idx]).unbind(0), strict=True):
                rows[i] = row
        return rows  # type: ignore[return-value]
