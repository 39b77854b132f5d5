"""Proto messages <-> the model's plain inputs. Imports protobuf types only (no grpc)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.errors import InvalidInput
from shared.model.actions import ACTION_IDS
from shared.model.features import DEFAULT_MAX_HISTORY_EVENTS, UserContext
from twotower.v1 import common_pb2


def user_context_from_proto(
    msg: common_pb2.UserContext,
    num_actions: int,
    max_history_events: int = DEFAULT_MAX_HISTORY_EVENTS,
    where: str = "user",
) -> UserContext:
    """Convert and check what only the proto shows (action names, timestamps, size before copying)."""
    history = msg.history
    n = len(history)
    if n > max_history_events:  # checked before any per-event work: absurd sizes cost nothing
        raise InvalidInput(f"{where}.history has {n} events; the limit is {max_history_events}")
    # One pass over the events (this runs per request on the event loop: ~2x faster than one pass
    # per column), then the checks vectorised.
    scalars: list[tuple[int, int, int, int]] = []
    hit_rows: list[int] = []  # (event, action) pairs, names already mapped to ids
    hit_ids: list[int] = []
    for i, event in enumerate(history):
        scalars.append((event.post_id, event.author_id, event.product_surface, event.timestamp_ms))
        for name in event.action_names:
            action = ACTION_IDS.get(name, num_actions)
            if action >= num_actions:
                raise InvalidInput(f"{where}.history[{i}].action_names: unknown action {name!r}")
            hit_rows.append(i)
            hit_ids.append(action)
        if event.action_ids:
            hit_rows.extend([i] * len(event.action_ids))
            hit_ids.extend(event.action_ids)
    columns = np.array(scalars, dtype=np.int64).reshape(n, 4)
    rows, ids = np.array(hit_rows, dtype=np.int64), np.array(hit_ids, dtype=np.int64)
    bad = np.flatnonzero((ids < 0) | (ids >= num_actions))
    if bad.size:
        i, action = int(rows[bad[0]]), int(ids[bad[0]])
        raise InvalidInput(f"{where}.history[{i}].action_ids: {action} out of range [0, {num_actions})")
    actions = np.zeros((n, num_actions), dtype=bool)
    actions[rows, ids] = True
    post_ids, author_ids, surfaces = columns[:, 0].copy(), columns[:, 1].copy(), columns[:, 2].copy()
    _check_timestamps(columns[:, 3], where)
    return UserContext(
        user_id=msg.user_id,
        post_ids=post_ids,
        author_ids=author_ids,
        actions=actions,
        surfaces=surfaces,
        user_features=tuple(msg.user_features),
    )


def _check_timestamps(ts: np.ndarray, where: str) -> None:
    if not ts.size or not ts.any():
        return  # no timestamps: list order is the order
    if (ts <= 0).any():
        i = int(np.flatnonzero(ts <= 0)[0])
        raise InvalidInput(f"{where}.history[{i}].timestamp_ms is unset or negative while others are set")
    if (np.diff(ts) < 0).any():
        i = int(np.flatnonzero(np.diff(ts) < 0)[0]) + 1
        raise InvalidInput(
            f"{where}.history[{i}].timestamp_ms goes back in time: history must be oldest first"
        )


def user_context_to_proto(
    ctx: UserContext, timestamps_ms: Sequence[int] | None = None
) -> common_pb2.UserContext:
    """The inverse, for clients and tests (actions are sent by id)."""
    msg = common_pb2.UserContext(user_id=ctx.user_id, user_features=list(ctx.user_features))
    for i in range(len(ctx.post_ids)):
        msg.history.add(
            post_id=int(ctx.post_ids[i]),
            author_id=int(ctx.author_ids[i]),
            action_ids=np.flatnonzero(ctx.actions[i]).tolist(),
            product_surface=int(ctx.surfaces[i]),
            timestamp_ms=int(timestamps_ms[i]) if timestamps_ms is not None else 0,
        )
    return msg


def item_columns_from_proto(
    items: Sequence[common_pb2.Item], max_items: int
) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """Items -> (post ids, author ids, attributes), rejecting empty, oversized and duplicate batches."""
    n = len(items)
    if n == 0:
        raise InvalidInput("no items given")
    if n > max_items:
        raise InvalidInput(f"{n} items in one request; the limit is {max_items}")
    post_ids = np.fromiter((it.post_id for it in items), dtype=np.int64, count=n)
    author_ids = np.fromiter((it.author_id for it in items), dtype=np.int64, count=n)
    check_unique_ids(post_ids, "items[].post_id")
    attributes = [dict(it.attributes) for it in items]
    for i, attrs in enumerate(attributes):
        check_attributes(attrs, f"items[{i}].attributes")
    return post_ids, author_ids, attributes


def check_unique_ids(ids: np.ndarray, what: str) -> None:
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise InvalidInput(f"{what}: duplicate id {int(values[counts > 1][0])}")


MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY_BYTES = 64
MAX_ATTRIBUTE_VALUE_BYTES = 1024


def check_attributes(attrs: dict[str, str], where: str) -> None:
    if len(attrs) > MAX_ATTRIBUTES:
        raise InvalidInput(f"{where}: {len(attrs)} entries; the limit is {MAX_ATTRIBUTES}")
    for key, value in attrs.items():
        if not key or len(key.encode()) > MAX_ATTRIBUTE_KEY_BYTES:
            raise InvalidInput(f"{where}: key {key[:80]!r} must be 1..{MAX_ATTRIBUTE_KEY_BYTES} bytes")
        if len(value.encode()) > MAX_ATTRIBUTE_VALUE_BYTES:
            raise InvalidInput(f"{where}[{key!r}]: value over {MAX_ATTRIBUTE_VALUE_BYTES} bytes")
