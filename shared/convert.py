"""Proto messages <-> the model's plain inputs. Imports protobuf types only (no grpc)."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence

import numpy as np

from shared import codec
from shared.errors import InvalidInput
from shared.model.actions import ACTION_IDS
from shared.model.features import DEFAULT_MAX_HISTORY_EVENTS, UserContext, check_history_length
from twotower.v1 import common_pb2, user_tower_pb2

# action_names + action_ids of one event (duplicates allowed): a bound, so that one event cannot make
# the server build a list of millions of entries (there are 19 actions).
MAX_ACTIONS_PER_EVENT = 64
_SCALARS = operator.attrgetter("post_id", "author_id", "product_surface", "timestamp_ms")
_ACTION_NAMES = operator.attrgetter("action_names")
_ACTION_IDS = operator.attrgetter("action_ids")


def user_context_from_proto(
    msg: common_pb2.UserContext,
    num_actions: int,
    max_history_events: int = DEFAULT_MAX_HISTORY_EVENTS,
    where: str = "user",
) -> UserContext:
    """Convert and check what only the proto shows (action names, timestamps, size before copying);
    the values are checked by `validate_user`, which the services call next."""
    history = msg.history
    n = len(history)
    check_history_length(n, max_history_events, where)  # before any per-event work
    # This runs per request on an event loop, so the per-event work is left to C: attrgetter and map
    # read each event's fields without a Python loop (128 events with 2 action names each: 0.67-0.77
    # ms as one Python pass, 0.43-0.5 ms so), then the checks are vectorised.
    scalars = itertools.chain.from_iterable(map(_SCALARS, history))
    columns = np.fromiter(scalars, np.int64, 4 * n).reshape(n, 4)
    names = list(map(_ACTION_NAMES, history))
    ids = list(map(_ACTION_IDS, history))
    name_counts = np.fromiter(map(len, names), np.int64, n)
    id_counts = np.fromiter(map(len, ids), np.int64, n)
    too_many = np.flatnonzero(name_counts + id_counts > MAX_ACTIONS_PER_EVENT)
    if too_many.size:  # before anything is built from the actions
        i = int(too_many[0])
        raise InvalidInput(
            f"{where}.history[{i}] has {int(name_counts[i] + id_counts[i])} action_names + action_ids; "
            f"the limit is {MAX_ACTIONS_PER_EVENT}"
        )
    flat_names = list(itertools.chain.from_iterable(names))
    named = np.fromiter(
        map(ACTION_IDS.get, flat_names, itertools.repeat(num_actions)), np.int64, len(flat_names)
    )
    name_rows = np.repeat(np.arange(n, dtype=np.int64), name_counts)
    unknown = np.flatnonzero(named >= num_actions)
    if unknown.size:
        j = int(unknown[0])
        raise InvalidInput(
            f"{where}.history[{int(name_rows[j])}].action_names: unknown action {flat_names[j]!r}"
        )
    given = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(id_counts.sum()))
    id_rows = np.repeat(np.arange(n, dtype=np.int64), id_counts)
    bad = np.flatnonzero((given < 0) | (given >= num_actions))
    if bad.size:
        i, action = int(id_rows[bad[0]]), int(given[bad[0]])
        raise InvalidInput(f"{where}.history[{i}].action_ids: {action} out of range [0, {num_actions})")
    actions = np.zeros((n, num_actions), dtype=bool)
    actions[name_rows, named] = True
    actions[id_rows, given] = True
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


_I64 = (common_pb2.DTYPE_INT64,)


def user_batch_to_proto(contexts: Sequence[UserContext]) -> user_tower_pb2.UserBatch:
    """Parsed, checked contexts -> one columnar message (no per-event work on either side)."""
    lengths = np.array([len(c.post_ids) for c in contexts], np.int64)
    counts = np.array([len(c.user_features) for c in contexts], np.int64)
    num_actions = contexts[0].actions.shape[1] if contexts else 0
    weights = np.left_shift(np.int64(1), np.arange(num_actions, dtype=np.int64))  # [A]

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)

    actions = [c.actions.astype(np.int64) @ weights if len(c.post_ids) else np.zeros(0, np.int64)
               for c in contexts]  # fmt: skip
    return user_tower_pb2.UserBatch(
        user_ids=codec.encode(np.array([c.user_id for c in contexts], np.int64)),
        history_lengths=codec.encode(lengths),
        post_ids=codec.encode(cat([c.post_ids for c in contexts])),
        author_ids=codec.encode(cat([c.author_ids for c in contexts])),
        action_bits=codec.encode(cat(actions)),
        product_surfaces=codec.encode(cat([c.surfaces for c in contexts])),
        user_feature_counts=codec.encode(counts),
        user_features=codec.encode(cat([np.asarray(c.user_features, np.int64) for c in contexts])),
    )


def user_batch_from_proto(
    msg: user_tower_pb2.UserBatch, num_actions: int, max_history_events: int, max_user_features: int
) -> list[UserContext]:
    """The inverse, checking the columns' shapes and the per-user limits (value ranges are checked
    per user by `validate_user`, as for `users`). Every count is bounded before it is summed, so no
    sum can wrap around int64 and make hostile columns "fit"."""
    user_ids = codec.decode_numpy(msg.user_ids, "batch.user_ids", _I64, shape=(None,))
    b = user_ids.shape[0]
    lengths = codec.decode_numpy(msg.history_lengths, "batch.history_lengths", _I64, shape=(b,))
    counts = codec.decode_numpy(msg.user_feature_counts, "batch.user_feature_counts", _I64, shape=(b,))
    for name, values, high in (("history_lengths", lengths, max_history_events),
                               ("user_feature_counts", counts, max_user_features)):  # fmt: skip
        bad = np.flatnonzero((values < 0) | (values > high))
        if bad.size:
            raise InvalidInput(f"batch.{name}[{int(bad[0])}] = {int(values[bad[0]])}; must be in [0, {high}]")
    n = int(lengths.sum())
    columns = [
        codec.decode_numpy(getattr(msg, name), f"batch.{name}", _I64, shape=(n,))
        for name in ("post_ids", "author_ids", "action_bits", "product_surfaces")
    ]
    post_ids, author_ids, bits, surfaces = columns
    features = codec.decode_numpy(msg.user_features, "batch.user_features", _I64, shape=(int(counts.sum()),))
    bad = np.flatnonzero((bits < 0) | (bits >= (1 << num_actions)))
    if bad.size:
        raise InvalidInput(f"batch.action_bits[{int(bad[0])}] has bits outside the {num_actions} actions")
    actions = (bits[:, None] >> np.arange(num_actions, dtype=np.int64)) & 1  # [N, A]
    actions = actions.astype(bool)
    ends, f_ends = np.cumsum(lengths), np.cumsum(counts)
    contexts = []
    for i in range(b):
        lo, hi = int(ends[i] - lengths[i]), int(ends[i])
        f_lo, f_hi = int(f_ends[i] - counts[i]), int(f_ends[i])
        contexts.append(
            UserContext(
                user_id=int(user_ids[i]),
                post_ids=post_ids[lo:hi],
                author_ids=author_ids[lo:hi],
                actions=actions[lo:hi],
                surfaces=surfaces[lo:hi],
                user_features=tuple(features[f_lo:f_hi].tolist()),
            )
        )
    return contexts


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
