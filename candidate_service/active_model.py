"""Which model candidate_service serves, recorded durably in the item store (no grpc, no torch).

The item store's meta table holds:
- `started_with`: the --checkpoint of the last start (the operator's instruction);
- `active_checkpoint`, `active_fingerprint`: the model whose corpus is served, set by a rollout in
  the same transaction that moves the corpus version to the new model's first version;
- `active_since_version`: that version.

At start, a --checkpoint equal to `started_with` means "as before": the recorded active model is
loaded, so a service restarted after a rollout comes back on the rolled-out model. A changed
--checkpoint is a new instruction and replaces the record. A rollout interrupted before its switch
changed nothing here, so a restart mid-rollout comes back on the previous model. user_service keeps
the same rule in its --state-file, so both towers come back on the same model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from candidate_service.item_store import ItemStore, ItemStoreError
from shared.errors import CheckpointError, ServiceError

logger = logging.getLogger(__name__)

STARTED_WITH = "started_with"
ACTIVE_CHECKPOINT = "active_checkpoint"
ACTIVE_FINGERPRINT = "active_fingerprint"
ACTIVE_SINCE_VERSION = "active_since_version"

M = TypeVar("M")


@dataclass(frozen=True)
class ActiveModel:
    checkpoint: str  # the directory it was loaded from, absolute (as recorded)
    fingerprint: str
    since_version: int  # the corpus version from which it is served


def checkpoint_path(checkpoint: str | Path) -> str:
    """The form recorded: absolute, so that the record means the same from any working directory
    (symlinks are not resolved: user_service records the path it was given, and both must agree)."""
    return os.path.abspath(os.fspath(checkpoint))


def active_record(model: ActiveModel) -> dict[str, str]:
    """The meta values a rollout commits with its switch."""
    return {
        ACTIVE_CHECKPOINT: model.checkpoint,
        ACTIVE_FINGERPRINT: model.fingerprint,
        ACTIVE_SINCE_VERSION: str(model.since_version),
    }


def load_active_model(
    store: ItemStore,
    flag_checkpoint: str | Path,
    load: Callable[[str], M],
    fingerprint_of: Callable[[M], str],
) -> tuple[M, ActiveModel]:
    """Load the model to serve (blocking) and record it; returns the loaded model and what was recorded.
    CheckpointError when the model does not load (for a recorded one, the message names the record);
    ItemStoreError when the record cannot be written."""
    flag = os.fspath(flag_checkpoint)
    started_with, active = store.meta(STARTED_WITH), store.meta(ACTIVE_CHECKPOINT)
    if started_with == flag and active:
        recorded_fp = store.meta(ACTIVE_FINGERPRINT) or "?"
        try:
            model = load(active)
        except CheckpointError as exc:
            raise CheckpointError(
                f"the active model recorded in the item store {store.location} ({recorded_fp} at {active}, "
                f"rolled out after the start with --checkpoint {flag}) does not load: {exc}. Restore that "
                "checkpoint, or start with another --checkpoint to replace the record"
            ) from None
        fingerprint = fingerprint_of(model)
        if active != checkpoint_path(flag):
            logger.info("serving model %s from %s, the model last rolled out (recorded in %s; the "
                        "--checkpoint %s is unchanged since that start)", fingerprint, active,
                        store.location, flag)  # fmt: skip
        if fingerprint != recorded_fp:
            logger.warning("%s now holds model %s, not %s as recorded: serving what it holds",
                           active, fingerprint, recorded_fp)  # fmt: skip
            _record(store, {ACTIVE_FINGERPRINT: fingerprint})
        try:
            since = int(store.meta(ACTIVE_SINCE_VERSION) or store.version)
        except ValueError:
            since = store.version
        return model, ActiveModel(active, fingerprint, since)
    model = load(flag)
    current = ActiveModel(checkpoint_path(flag), fingerprint_of(model), store.version)
    if started_with is not None and started_with != flag:
        logger.warning(
            "--checkpoint changed since the last start (%s -> %s): it replaces the recorded active model "
            "(%s at %s)", started_with, flag, store.meta(ACTIVE_FINGERPRINT), active,
        )  # fmt: skip
    _record(store, {STARTED_WITH: flag, **active_record(current)})
    return model, current


def _record(store: ItemStore, values: dict[str, str]) -> None:
    try:
        store.set_meta(values)
    except ServiceError as exc:  # disk full at start: the service cannot start, and says why
        raise ItemStoreError(f"recording the active model in the item store failed: {exc}") from exc
