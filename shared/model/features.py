"""The featurizer: raw user contexts and items -> the padded hash tensors the towers take.

Validation of raw values happens here (no grpc): every problem raises InvalidInput naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.errors import InvalidInput
from shared.model.config import TowerConfig
from shared.model.hashing import hash_many

# History events per user context: user_service's --max-history-events and the gateway's default.
DEFAULT_MAX_HISTORY_EVENTS = 1024


@dataclass(frozen=True)
class UserContext:
    """One user's request, column-oriented. History is oldest -> newest; n events."""

    user_id: int
    post_ids: np.ndarray  # [n] int64, > 0
    author_ids: np.ndarray  # [n] int64, >= 0 (0 = unknown)
    actions: np.ndarray  # [n, A] bool multi-hot
    surfaces: np.ndarray  # [n] int64 in [0, num_product_surfaces)
    user_features: tuple[int, ...] = field(default=())  # <= num_user_features ids, 0 = unknown

    @staticmethod
    def build(
        user_id: int,
        post_ids: Sequence[int] = (),
        author_ids: Sequence[int] | None = None,
        actions: Sequence[Sequence[int]] | None = None,
        surfaces: Sequence[int] | None = None,
        user_features: Sequence[int] = (),
        num_actions: int = 19,
    ) -> UserContext:
        """Convenience constructor from lists (actions as lists of action ids per event)."""
        n = len(post_ids)
        multi_hot = np.zeros((n, num_actions), dtype=bool)
        for i, ids in enumerate(actions or [()] * n):
            for a in ids:
                if not 0 <= a < num_actions:
                    raise InvalidInput(f"history[{i}]: action id {a} out of range [0, {num_actions})")
                multi_hot[i, a] = True
        return UserContext(
            user_id=int(user_id),
            post_ids=np.asarray(post_ids, dtype=np.int64).reshape(n),
            author_ids=np.asarray(author_ids if author_ids is not None else [0] * n, dtype=np.int64),
            actions=multi_hot,
            surfaces=np.asarray(surfaces if surfaces is not None else [0] * n, dtype=np.int64),
            user_features=tuple(int(v) for v in user_features),
        )


@dataclass
class UserFeatures:
    """Padded tensors for B users; history left-aligned, pads at the end."""

    user_hashes: torch.Tensor  # [B, Hu] int64
    user_feature_hashes: torch.Tensor  # [B, F, Hu] int64 (F may be 0)
    history_post_hashes: torch.Tensor  # [B, S, Hi] int64
    history_author_hashes: torch.Tensor  # [B, S, Ha] int64
    history_actions: torch.Tensor  # [B, S, A] float32 multi-hot
    history_surfaces: torch.Tensor  # [B, S] int64
    history_mask: torch.Tensor  # [B, S] bool, True = a real event

    def to(self, device: torch.device | str) -> UserFeatures:
        return UserFeatures(**{k: v.to(device, non_blocking=True) for k, v in vars(self).items()})


@dataclass
class ItemFeatures:
    post_hashes: torch.Tensor  # [N, Hi] int64
    author_hashes: torch.Tensor  # [N, Ha] int64

    def to(self, device: torch.device | str) -> ItemFeatures:
        return ItemFeatures(**{k: v.to(device, non_blocking=True) for k, v in vars(self).items()})


def check_history_length(n: int, max_history_events: int, where: str = "user") -> None:
    """The history limit (converters call it before any per-event work, so absurd sizes cost nothing)."""
    if n > max_history_events:
        raise InvalidInput(f"{where}.history has {n} events; the limit is {max_history_events}")


def validate_user(
    ctx: UserContext, cfg: TowerConfig | None, max_history_events: int, where: str = "user"
) -> None:
    """The one check of a user context: ids, the history limit, column shapes, and with a model's
    `cfg` what that model takes (user features, actions, surfaces). The gateway, which holds no model,
    passes cfg=None; user_service checks again against the model that will encode the user."""
    n = len(ctx.post_ids)
    if ctx.user_id <= 0:
        raise InvalidInput(f"{where}.user_id must be > 0, got {ctx.user_id}")
    check_history_length(n, max_history_events, where)
    if cfg is not None:
        if len(ctx.user_features) > cfg.num_user_features:
            raise InvalidInput(
                f"{where}.user_features has {len(ctx.user_features)} values; the model takes "
                f"at most {cfg.num_user_features}"
            )
        if any(v < 0 for v in ctx.user_features):
            raise InvalidInput(f"{where}.user_features must be >= 0")
    if not (len(ctx.author_ids) == len(ctx.surfaces) == len(ctx.actions) == n):
        raise InvalidInput(f"{where}.history columns have different lengths")
    if cfg is not None and (ctx.actions.ndim != 2 or ctx.actions.shape[1] != cfg.num_actions):
        raise InvalidInput(f"{where}.history actions must be [n, {cfg.num_actions}]")
    if n == 0:
        return
    for column, values, low in (("post_id", ctx.post_ids, 1), ("author_id", ctx.author_ids, 0)):
        bad = np.flatnonzero(values < low)
        if bad.size:
            i = int(bad[0])
            raise InvalidInput(f"{where}.history[{i}].{column} must be >= {low}, got {int(values[i])}")
    if cfg is None:
        return
    bad = np.flatnonzero((ctx.surfaces < 0) | (ctx.surfaces >= cfg.num_product_surfaces))
    if bad.size:
        i = int(bad[0])
        raise InvalidInput(
            f"{where}.history[{i}].product_surface {int(ctx.surfaces[i])} out of range "
            f"[0, {cfg.num_product_surfaces})"
        )


def featurize_users(
    contexts: Sequence[UserContext],
    cfg: TowerConfig,
    max_history_events: int = DEFAULT_MAX_HISTORY_EVENTS,
) -> UserFeatures:
    """Validate and pad B user contexts. Keeps the last S events of each history, left-aligned."""
    b, s = len(contexts), cfg.history_len
    if b == 0:
        raise InvalidInput("no users to encode")
    user_ids = np.empty(b, dtype=np.int64)
    features = np.zeros((b, cfg.num_user_features), dtype=np.int64)
    post_ids = np.zeros((b, s), dtype=np.int64)
    author_ids = np.zeros((b, s), dtype=np.int64)
    actions = np.zeros((b, s, cfg.num_actions), dtype=np.float32)
    surfaces = np.zeros((b, s), dtype=np.int64)
    for i, ctx in enumerate(contexts):
        validate_user(ctx, cfg, max_history_events, where=f"users[{i}]" if b > 1 else "user")
        user_ids[i] = ctx.user_id
        features[i, : len(ctx.user_features)] = ctx.user_features
        kept = slice(max(0, len(ctx.post_ids) - s), None)  # the last S events
        n = len(ctx.post_ids[kept])
        post_ids[i, :n] = ctx.post_ids[kept]
        author_ids[i, :n] = ctx.author_ids[kept]
        actions[i, :n] = ctx.actions[kept]
        surfaces[i, :n] = ctx.surfaces[kept]
    user_hashes, feature_hashes, post_hashes, author_hashes = hash_many(
        [
            (user_ids, cfg.num_user_hashes, cfg.user_vocab_size),
            (features, cfg.num_user_hashes, cfg.user_feature_vocab_size),
            (post_ids, cfg.num_item_hashes, cfg.post_vocab_size),
            (author_ids, cfg.num_author_hashes, cfg.author_vocab_size),
        ]
    )
    return UserFeatures(
        user_hashes=torch.from_numpy(user_hashes),
        user_feature_hashes=torch.from_numpy(feature_hashes),
        history_post_hashes=torch.from_numpy(post_hashes),
        history_author_hashes=torch.from_numpy(author_hashes),
        history_actions=torch.from_numpy(actions),
        history_surfaces=torch.from_numpy(surfaces),
        history_mask=torch.from_numpy(post_ids != 0),
    )


def validate_item_ids(post_ids: np.ndarray, author_ids: np.ndarray) -> None:
    if len(post_ids) != len(author_ids):
        raise InvalidInput(f"{len(post_ids)} post ids but {len(author_ids)} author ids")
    bad = np.flatnonzero(post_ids <= 0)
    if bad.size:
        raise InvalidInput(f"items[{int(bad[0])}].post_id must be > 0, got {int(post_ids[bad[0]])}")
    bad = np.flatnonzero(author_ids < 0)
    if bad.size:
        raise InvalidInput(f"items[{int(bad[0])}].author_id must be >= 0, got {int(author_ids[bad[0]])}")


def featurize_items(post_ids: np.ndarray, author_ids: np.ndarray, cfg: TowerConfig) -> ItemFeatures:
    """Hash N items (post id > 0, author id >= 0 with 0 = unknown) for the candidate tower."""
    post_ids = np.asarray(post_ids, dtype=np.int64)
    author_ids = np.asarray(author_ids, dtype=np.int64)
    validate_item_ids(post_ids, author_ids)
    post_hashes, author_hashes = hash_many(
        [
            (post_ids, cfg.num_item_hashes, cfg.post_vocab_size),
            (author_ids, cfg.num_author_hashes, cfg.author_vocab_size),
        ]
    )
    return ItemFeatures(
        post_hashes=torch.from_numpy(post_hashes),
        author_hashes=torch.from_numpy(author_hashes),
    )
