"""Model rollout in candidate_service (no grpc): move the served corpus from model A to model B while A
keeps serving and writes go on.

1. StartRollout: B's checkpoint is loaded off the event loop and checked (unreadable, another
   embedding width, another rollout under way: PreconditionFailed; B already active: done at once).
2. In the background (a task whose work runs in threads): every change committed from now on is
   recorded; B encodes a snapshot of A's corpus, reusing B's cache file where (post id, author id)
   match; then the recorded changes are replayed onto B's corpus (upserts encoded with B, deletes
   dropped), version by version, until it has caught up.
3. The switch, with the write path held (no change can commit): the last recorded changes are
   replayed, B is recorded as the active model in the item store in the transaction that moves the
   corpus to B's first version, and the core swaps encoder, corpus and watch streams at once (every
   watcher gets B's snapshot next, then B's deltas). B's cache file is written in the background.

Every change acknowledged before or during the rollout is in B's corpus: it is either in the snapshot
B encoded or a recorded change with a later version. A failure or an abort before the switch leaves A
serving, and nothing recorded (FAILED or ABORTED, with the reason); a restart mid-rollout comes back
on A. The switch's transaction is the only write, so after it a restart comes back on B.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from candidate_service import metrics
from candidate_service.active_model import ActiveModel, active_record, checkpoint_path
from candidate_service.encoder import EncodingStopped, ItemEncoder
from candidate_service.item_store import Items, ItemStore
from candidate_service.loading import derive_embeddings
from candidate_service.store import Attrs, CorpusStore, Delta
from candidate_service.writes import CorpusWriter
from shared.errors import CheckpointError, InvalidInput, PreconditionFailed, ServiceError

logger = logging.getLogger(__name__)

# Catch-up passes without holding writers: each replays the changes made during the previous one, so
# the switch (writers held) replays only what came in during the last, short pass.
CATCH_UP_ROUNDS = 4

EncoderLoader = Callable[[str], ItemEncoder]  # checkpoint dir -> encoder (blocking; CheckpointError)


class RolloutState(enum.Enum):
    IDLE = "IDLE"  # no rollout since the service started
    ENCODING = "ENCODING"  # loading, encoding, catching up or switching; A serves
    DONE = "DONE"
    FAILED = "FAILED"
    ABORTED = "ABORTED"


@dataclass(frozen=True)
class ModelRef:
    fingerprint: str
    dim: int


@dataclass(frozen=True)
class RolloutStatus:
    state: RolloutState
    active: ModelRef | None  # None while the service is still loading
    target: ModelRef | None
    items_encoded: int
    items_total: int
    error: str
    switched_at_version: int
    step_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ServingModel:
    """What a rollout reads from the core: the model and corpus serving now, the store and the writer."""

    encoder: ItemEncoder
    corpus: CorpusStore
    items: ItemStore
    writer: CorpusWriter
    active: ActiveModel


class RolloutHost(Protocol):
    def serving_model(self) -> ServingModel:
        """The model serving now (NotReady while the service loads)."""
        ...

    def install_model(self, encoder: ItemEncoder, corpus: CorpusStore, model: ActiveModel) -> None:
        """Serve `corpus` of `encoder`'s model from now on (on the loop, the write path held, after
        the item store recorded it)."""
        ...


@dataclass(frozen=True)
class _Change:
    """A committed change as the rollout replays it (A's embeddings are not kept)."""

    version: int
    post_ids: np.ndarray  # [u] int64
    author_ids: np.ndarray  # [u] int64
    attributes: list[Attrs]  # [u]
    deleted_post_ids: np.ndarray  # [d] int64


class Rollouts:
    """One rollout at a time; the state of the last one. Event loop only, except the work it starts in
    threads (which touches only the new model's corpus and the progress counters)."""

    def __init__(self, host: RolloutHost, cache_dir: Path, load_encoder: EncoderLoader) -> None:
        self.host = host
        self.cache_dir = Path(cache_dir)
        self.load_encoder = load_encoder  # a test may replace it (a gated or failing encoder)
        self._state = RolloutState.IDLE
        self._target: ModelRef | None = None
        self._error = ""
        self._encoded = 0  # written by the encoding thread, read on the loop
        self._total = 0
        self._switched_at = 0
        self._steps: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._stop = threading.Event()  # abort or shutdown: the encoder stops between batches
        self._why_stopped = ""
        self._switching = False
        self._changes: list[_Change] | None = None  # recording while not None
        self._publish_state()

    # ---- reading ----------------------------------------------------------------------------------
    def status(self) -> RolloutStatus:
        active = None
        try:
            serving = self.host.serving_model()
            active = ModelRef(serving.encoder.fingerprint, serving.encoder.dim)
        except ServiceError:
            pass
        return RolloutStatus(
            self._state, active, self._target, self._encoded, self._total, self._error,
            self._switched_at, dict(self._steps),
        )  # fmt: skip

    @property
    def running(self) -> bool:
        return self._state is RolloutState.ENCODING

    # ---- control ----------------------------------------------------------------------------------
    async def start(self, checkpoint: str) -> RolloutStatus:
        """Load and check B, then encode and switch in the background; returns at once after the load."""
        if not checkpoint:
            raise InvalidInput("checkpoint is required: a directory on candidate_service's filesystem")
        self.host.serving_model()  # NotReady while loading
        if self.running:
            raise PreconditionFailed(self._busy_message())
        self._begin()
        t0 = time.perf_counter()
        try:
            encoder = await asyncio.to_thread(self.load_encoder, checkpoint)
        except asyncio.CancelledError:  # the caller went away (deadline): never leave a rollout "running"
            self._end(RolloutState.ABORTED, "StartRollout was cancelled while the checkpoint loaded")
            raise
        except CheckpointError as exc:
            raise PreconditionFailed(self._end(RolloutState.FAILED, f"checkpoint {checkpoint} cannot be "
                                                                    f"loaded: {exc}")) from None  # fmt: skip
        except Exception as exc:  # MemoryError while loading, a bug: A keeps serving, the status says why
            logger.exception("loading checkpoint %s for a rollout failed", checkpoint)
            why = f"checkpoint {checkpoint} could not be loaded: {type(exc).__name__}: {exc}"
            raise PreconditionFailed(self._end(RolloutState.FAILED, why)) from None
        self._steps["load"] = time.perf_counter() - t0
        self._target = ModelRef(encoder.fingerprint, encoder.dim)
        serving = self.host.serving_model()
        active = serving.encoder
        if self._stop.is_set():  # aborted while loading
            self._end(RolloutState.ABORTED, self._why_stopped)
            return self.status()
        if encoder.dim != active.dim:
            raise PreconditionFailed(self._end(RolloutState.FAILED, (
                f"checkpoint {checkpoint} (model {encoder.fingerprint}) makes D={encoder.dim} embeddings, "
                f"the served model {active.fingerprint} D={active.dim}: a rollout must keep the width"
            )))  # fmt: skip
        if encoder.fingerprint == active.fingerprint:  # e.g. the rollout command run again to finish
            self._switched_at = serving.active.since_version
            self._end(RolloutState.DONE, "")
            logger.info("rollout to %s: already the active model", encoder.fingerprint)
            return self.status()
        logger.info("rollout from %s to %s (%s): encoding the corpus in the background; %s keeps serving",
                    active.fingerprint, encoder.fingerprint, checkpoint, active.fingerprint)  # fmt: skip
        metrics.set_models(active.fingerprint, encoder.fingerprint)
        self._total = serving.corpus.num_items  # until the task takes its snapshot
        self._task = asyncio.ensure_future(self._run(encoder, checkpoint))
        return self.status()

    async def abort(self) -> RolloutStatus:
        """Stop a rollout before its switch: A keeps serving (ABORTED)."""
        if not self.running:
            raise PreconditionFailed(f"no rollout in progress (last: {self._state.value}): nothing to abort")
        if self._switching:
            raise PreconditionFailed(
                "the rollout is switching to the new model: too late to abort; once it is DONE, roll back "
                "by rolling out the previous checkpoint"
            )
        self.request_stop("aborted by AbortRollout")
        if self._task is not None:
            await asyncio.wait({self._task})  # it stops between two batches of the encoder
        return self.status()

    def request_stop(self, why: str = "candidate_service is shutting down") -> None:
        if self.running and not self._stop.is_set():
            self._why_stopped = why
            self._stop.set()

    async def wait(self) -> None:
        """Shutdown: let the background work end (it stops at the next batch once asked to)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    def observe(self, delta: Delta) -> None:
        """Called after every committed change (on the loop, in version order)."""
        if self._changes is not None:
            self._changes.append(_Change(delta.version, delta.upsert_post_ids, delta.upsert_author_ids,
                                         delta.upsert_attributes, delta.deleted_post_ids))  # fmt: skip

    # ---- the background work ----------------------------------------------------------------------
    async def _run(self, encoder: ItemEncoder, checkpoint: str) -> None:
        try:
            await self._encode_and_switch(encoder, checkpoint)
        except EncodingStopped:
            self._end(RolloutState.ABORTED, self._why_stopped or "stopped")
        except Exception as exc:  # supervised: MemoryError, a failed store write, a bug; A keeps serving
            if isinstance(exc, ServiceError):
                why = str(exc)
                logger.warning("rollout to %s failed: %s", encoder.fingerprint, why)
            else:
                why = f"{type(exc).__name__}: {exc}"
                logger.exception("rollout to %s failed", encoder.fingerprint)
            self._end(RolloutState.FAILED, f"{why}; model {self._active_fingerprint()} still serves")
        finally:
            self._changes = None
            self._switching = False

    async def _encode_and_switch(self, encoder: ItemEncoder, checkpoint: str) -> None:
        serving = self.host.serving_model()
        self._changes = []  # from here on, every committed change is recorded
        t0 = time.perf_counter()
        base = await asyncio.to_thread(serving.corpus.snapshot)
        self._total = len(base)
        derived = await asyncio.to_thread(
            derive_embeddings, base.post_ids, base.author_ids, base.version, encoder, self.cache_dir,
            self._stop, self._progress, f"the corpus served by {serving.encoder.fingerprint}",
        )  # fmt: skip
        self._check_stop()
        corpus = await asyncio.to_thread(
            CorpusStore.from_rows, encoder.fingerprint, base.version, base.post_ids, base.author_ids,
            derived.embeddings, base.attributes,
        )  # fmt: skip
        del derived, base  # B's corpus holds its own copy
        self._steps["encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for _ in range(CATCH_UP_ROUNDS):
            if not await self._catch_up(corpus, encoder):
                break
            self._check_stop()
        self._steps["catch_up"] = time.perf_counter() - t0

        async with serving.writer.held():  # no change commits until B serves
            self._check_stop()  # the last point an abort is taken
            self._switching = True
            t0 = time.perf_counter()
            await self._catch_up(corpus, encoder)
            current = self.host.serving_model()
            if not corpus.version == current.corpus.version == current.items.version:
                raise RuntimeError(
                    f"the new corpus (version {corpus.version}) is out of step with the served one "
                    f"({current.corpus.version}) or the item store ({current.items.version})"
                )
            version = corpus.version + 1  # B's first version: distinct from every version of A
            model = ActiveModel(checkpoint_path(checkpoint), encoder.fingerprint, version)
            empty = np.zeros(0, np.int64)
            # Durable first: if this fails, nothing changed and A serves on.
            await asyncio.to_thread(current.items.commit, version, Items.empty(), empty, active_record(model))
            corpus.apply(Delta(version, encoder.fingerprint, empty, empty,
                               np.zeros((0, encoder.dim), np.float32), [], empty))  # fmt: skip
            self.host.install_model(encoder, corpus, model)
            self._changes = None
            self._steps["switch"] = time.perf_counter() - t0
        self._switched_at = version
        self._end(RolloutState.DONE, "")
        logger.info(
            "rollout done: model %s serves from corpus version %d (%s)", encoder.fingerprint, version,
            ", ".join(f"{k} {v:.2f}s" for k, v in self._steps.items()),
        )  # fmt: skip

    async def _catch_up(self, corpus: CorpusStore, encoder: ItemEncoder) -> bool:
        """Replay the changes recorded since B's corpus version onto it; False when there were none."""
        assert self._changes is not None
        pending = [c for c in self._changes if c.version > corpus.version]
        self._changes = []
        if not pending:
            return False
        await asyncio.to_thread(self._replay, corpus, encoder, pending)
        return True

    def _replay(self, corpus: CorpusStore, encoder: ItemEncoder, changes: list[_Change]) -> None:
        """(thread) The changes as deltas of B, applied in version order (apply checks the order)."""
        post_ids = np.concatenate([c.post_ids for c in changes])
        author_ids = np.concatenate([c.author_ids for c in changes])
        self._total += len(post_ids)
        embeddings = (
            encoder.encode(post_ids, author_ids, stop=None if self._switching else self._stop)
            if len(post_ids) else np.zeros((0, encoder.dim), np.float32)
        )  # fmt: skip
        self._progress_by(len(post_ids))
        at = 0
        for c in changes:
            n = len(c.post_ids)
            corpus.apply(Delta(c.version, encoder.fingerprint, c.post_ids, c.author_ids,
                               embeddings[at : at + n], c.attributes, c.deleted_post_ids))  # fmt: skip
            at += n

    # ---- state --------------------------------------------------------------------------------------
    def _begin(self) -> None:
        self._state, self._target, self._error = RolloutState.ENCODING, None, ""
        self._encoded = self._total = self._switched_at = 0
        self._steps = {}
        self._stop = threading.Event()
        self._why_stopped = ""
        self._task = None
        self._publish_state()
        metrics.ROLLOUT_STEP_SECONDS.clear()

    def _end(self, state: RolloutState, error: str) -> str:
        self._state, self._error = state, error
        self._publish_state()
        metrics.ROLLOUTS.labels(state.value.lower()).inc()
        for step, seconds in self._steps.items():
            metrics.ROLLOUT_STEP_SECONDS.labels(step).set(seconds)
        active = self._active_fingerprint()
        if active:
            metrics.set_models(active)
        if state is not RolloutState.DONE and error:
            logger.warning("rollout %s: %s", state.value, error)
        return error

    def _publish_state(self) -> None:
        metrics.set_rollout_state(self._state.value, [s.value for s in RolloutState])
        metrics.ROLLOUT_ITEMS_ENCODED.set(self._encoded)
        metrics.ROLLOUT_ITEMS_TOTAL.set(self._total)

    def _progress(self, done: int) -> None:
        """(thread) Items of the snapshot encoded so far (cached rows count at once)."""
        self._encoded = done
        metrics.ROLLOUT_ITEMS_ENCODED.set(done)
        metrics.ROLLOUT_ITEMS_TOTAL.set(self._total)

    def _progress_by(self, n: int) -> None:
        self._encoded += n
        metrics.ROLLOUT_ITEMS_ENCODED.set(self._encoded)
        metrics.ROLLOUT_ITEMS_TOTAL.set(self._total)

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise EncodingStopped(self._why_stopped)

    def _active_fingerprint(self) -> str:
        try:
            return self.host.serving_model().encoder.fingerprint
        except ServiceError:
            return ""

    def _busy_message(self) -> str:
        target = self._target.fingerprint if self._target else "a checkpoint still loading"
        return (
            f"a rollout to {target} is in progress ({self._encoded}/{self._total} items encoded): wait "
            "for it (GetRolloutStatus) or stop it (AbortRollout)"
        )
