"""The models a user_service holds (fingerprint -> UserEncoder) and which one is the default, recorded
durably in a state file so that a restarted service comes back with the models of the last rollout.
No grpc import.

During a rollout the service holds two models: requests name the one they need (the gateway asks for
the model of the corpus it scores against), and requests that name none get the default.

State file (JSON, replaced atomically):
    {"started_with": "<--checkpoint at the last start>", "default": "<fingerprint>",
     "models": {"<fingerprint>": "<checkpoint dir>", ...}}
At start-up the recorded models are loaded when `--checkpoint` is the one the file was started with;
a changed `--checkpoint` is a new instruction from the operator and wins (the file is rewritten).
An unreadable state file, or a recorded default model that no longer loads, stops the start with a
message naming the file: the service never silently serves another model than the one rolled out.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.atomic_file import atomic_write_text
from shared.errors import (
    CheckpointError,
    InvalidInput,
    ModelMismatch,
    NotReady,
    PreconditionFailed,
    StorageFull,
    StorageUnavailable,
)
from shared.model.checkpoint import declared_fingerprint
from user_service import metrics
from user_service.encoder import ModelIdentity, UserEncoder

logger = logging.getLogger(__name__)

EncoderLoader = Callable[[str], UserEncoder]  # checkpoint dir -> loaded, warmed-up encoder (blocking)


@dataclass(frozen=True)
class _Held:
    """What the registry holds, published as one object: a reader never sees half a change."""

    encoders: dict[str, UserEncoder] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    default: str = ""


class ModelRegistry:
    def __init__(self, max_models: int = 2, state_file: Path | None = None) -> None:
        self.max_models = max_models
        self.state_file = state_file
        self._lock = threading.Lock()  # mutations; readers take `_held` by reference
        self._held = _Held()
        self._started_with = ""

    # ---- reading (any thread, lock-free) --------------------------------------------------------
    def get(self, fingerprint: str = "") -> UserEncoder:
        held = self._held
        encoders, default = held.encoders, held.default
        if not default:
            raise NotReady("user tower is still loading; retry shortly")
        if not fingerprint:
            return encoders[default]
        encoder = encoders.get(fingerprint)
        if encoder is None:
            raise ModelMismatch(
                f"model {fingerprint!r} is not loaded in user_service (it holds {sorted(encoders)}): "
                "load it first (twotower rollout does)"
            )
        return encoder

    @property
    def default(self) -> UserEncoder:
        return self.get("")

    def identities(self) -> tuple[list[ModelIdentity], str]:
        """Every model held (default first) and the default's fingerprint."""
        held = self._held
        encoders, default = held.encoders, held.default
        order = sorted(encoders, key=lambda fp: (fp != default, fp))
        return [encoders[fp].identity for fp in order], default

    # ---- start-up -------------------------------------------------------------------------------
    def start(self, checkpoint: str, load: EncoderLoader) -> None:
        """Load what the state file records (or `checkpoint`); blocking, call off the event loop."""
        state = self._read_state()
        if state is not None and state.get("started_with") == checkpoint:
            default, models = state["default"], state["models"]
            self._started_with = checkpoint
            logger.info("state file %s: default model %s, models %s", self.state_file, default, models)
            try:
                encoder = load(models[default])
            except CheckpointError as exc:
                raise CheckpointError(
                    f"the default model recorded in {self.state_file} ({default} at {models[default]}) "
                    f"does not load: {exc}. Restore that checkpoint, or start with another --checkpoint "
                    "to replace the record"
                ) from None
            self._install(encoder, models[default], make_default=True)
            for fp, path in models.items():
                if fp != default:
                    try:
                        self._install(load(path), path, make_default=False)
                    except CheckpointError as exc:  # a half-done rollout's extra model: not fatal
                        logger.warning("recorded model %s at %s does not load (%s); dropped", fp, path, exc)
        else:
            if state is not None:
                logger.info("--checkpoint changed since the last start: %s replaces the record", checkpoint)
            self._started_with = checkpoint
            self._install(load(checkpoint), checkpoint, make_default=True)

    def set_only(self, encoder: UserEncoder, checkpoint: str = "") -> None:
        """Hold exactly this encoder as the default (tests, tools)."""
        fp = encoder.identity.fingerprint
        self._commit({fp: encoder}, {fp: checkpoint}, fp)

    # ---- model control ----------------------------------------------------------------------------
    def load(self, checkpoint: str, load: EncoderLoader) -> ModelIdentity:
        """Load a checkpoint beside the models held (blocking). Loading one already held is a no-op."""
        self._require_state_file()
        default = self.default
        held = self._held
        declared = declared_fingerprint(checkpoint)
        if declared in held.encoders:  # already held (a rerun rollout): nothing to load
            return held.encoders[declared].identity
        self._require_room(held)  # before loading: a model past the limit never takes the memory
        encoder = load(checkpoint)
        fp = encoder.identity.fingerprint
        if fp in self._held.encoders:
            return self._held.encoders[fp].identity
        if encoder.identity.embedding_dim != default.identity.embedding_dim:
            raise ModelMismatch(
                f"checkpoint {checkpoint} makes D={encoder.identity.embedding_dim} embeddings but the "
                f"default model makes D={default.identity.embedding_dim}: a rollout must keep the width"
            )
        self._require_room(self._held)
        self._install(encoder, checkpoint, make_default=False)
        return encoder.identity

    def set_default(self, fingerprint: str) -> None:
        self._require_state_file()
        self.get(fingerprint)  # ModelMismatch when not held
        if not fingerprint:
            raise InvalidInput("fingerprint is required")
        held = self._held
        self._commit(held.encoders, held.checkpoints, fingerprint)
        logger.info("default model is now %s", fingerprint)

    def unload(self, fingerprint: str) -> None:
        self._require_state_file()
        if not fingerprint:
            raise InvalidInput("fingerprint is required")
        self.get(fingerprint)
        held = self._held
        if fingerprint == held.default:
            raise PreconditionFailed(
                f"model {fingerprint} is the default: make another model the default first"
            )
        encoders = {fp: e for fp, e in held.encoders.items() if fp != fingerprint}
        checkpoints = {fp: c for fp, c in held.checkpoints.items() if fp != fingerprint}
        self._commit(encoders, checkpoints, held.default)
        logger.info("model %s unloaded", fingerprint)

    # ---- internals ----------------------------------------------------------------------------------
    def _install(self, encoder: UserEncoder, checkpoint: str, make_default: bool) -> None:
        fp, held = encoder.identity.fingerprint, self._held
        encoders = {**held.encoders, fp: encoder}
        checkpoints = {**held.checkpoints, fp: checkpoint}
        self._commit(encoders, checkpoints, fp if make_default or not held.default else held.default)

    def _require_room(self, held: _Held) -> None:
        if len(held.encoders) >= self.max_models:
            raise PreconditionFailed(
                f"user_service already holds {len(held.encoders)} models (--max-models "
                f"{self.max_models}): unload one first"
            )

    def _commit(self, encoders: dict[str, UserEncoder], checkpoints: dict[str, str], default: str) -> None:
        """Record the new state durably, then publish it (by reference: readers never see a half-built
        dict). A failed write (disk full) changes nothing and fails the call: retry when space is back."""
        with self._lock:
            if self.state_file is not None:
                state = {"started_with": self._started_with, "default": default,
                         "models": {fp: checkpoints.get(fp, "") for fp in encoders}}  # fmt: skip
                try:
                    atomic_write_text(self.state_file, json.dumps(state, indent=2) + "\n")
                except OSError as exc:
                    why = f"could not record the model change in {self.state_file}: {exc}"
                    full = exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
                    raise (StorageFull(why) if full else StorageUnavailable(why)) from None
            self._held = _Held(encoders, checkpoints, default)
            metrics.set_models({fp: encoder.runtime for fp, encoder in encoders.items()}, default)

    def _require_state_file(self) -> None:
        if self.state_file is None:
            raise PreconditionFailed(
                "model control needs user_service to be started with --state-file: without it a "
                "rolled-out model would be forgotten at the next restart"
            )

    def _read_state(self) -> dict | None:
        if self.state_file is None or not self.state_file.exists():
            return None
        try:
            state = json.loads(self.state_file.read_text())
            default, models = state["default"], state["models"]
            if not isinstance(models, dict) or default not in models:
                raise ValueError("the default model is not among the recorded models")
            return state
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"state file {self.state_file} is unreadable ({exc}); fix or remove it (removing it "
                "starts the service with --checkpoint)"
            ) from None


class ModelControl:
    """The model-control RPCs' core: one change at a time, loading off the event loop."""

    def __init__(self, registry: ModelRegistry, load: EncoderLoader) -> None:
        self.registry = registry
        self._load = load
        self._busy = asyncio.Lock()

    async def load(self, checkpoint: str) -> ModelIdentity:
        if not checkpoint:
            raise InvalidInput("checkpoint is required: a checkpoint directory on user_service's filesystem")
        async with self._busy:
            try:
                return await asyncio.to_thread(self.registry.load, checkpoint, self._load)
            except CheckpointError as exc:
                raise PreconditionFailed(f"checkpoint {checkpoint} cannot be loaded: {exc}") from None

    async def set_default(self, fingerprint: str) -> None:
        async with self._busy:
            await asyncio.to_thread(self.registry.set_default, fingerprint)

    async def unload(self, fingerprint: str) -> None:
        async with self._busy:
            await asyncio.to_thread(self.registry.unload, fingerprint)
