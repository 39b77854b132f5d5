"""MovieLens ratings -> per-user engagement timelines -> the fixed leave-last-positive-out split.

Mapping (no invented data):
- a user -> a user id; gender, age bucket and occupation -> 3 user-feature ids (stable hashes of
  "field=value", so any client can recompute them);
- a movie -> a post id (the MovieLens item id); no author (id 0 = padding): MovieLens has none;
- a rating -> one engagement event: always click + dwell, rating >= 4 also favorite, <= 2 also
  not_interested; one product surface (0).

Order: a user's events sorted by (timestamp, item id). MovieLens timestamps are in seconds and a user
often rates several movies in the same second; the item id breaks those ties so every run and every
client sees the same order.

Protocol: a positive is a rating >= 4. For each user with >= 3 positives, the last positive is the test
target (history = every event before it), the positive before it the validation target (history =
every event before it). Training uses, for those users, only events strictly before the validation
target; users with fewer positives have no target and all their events train. So no target, and nothing
after one, ever reaches training, and a target is never in its own history.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.model.actions import ACTION_IDS
from shared.model.config import TowerConfig
from shared.model.features import UserContext, UserFeatures, featurize_users
from training.data import MovieLens, UserInfo

POSITIVE_RATING = 4.0  # >= this: favourite, a positive for training and a target for evaluation
NEGATIVE_RATING = 2.0  # <= this: not_interested
MIN_POSITIVES = 3  # users with fewer have no validation/test target
PRODUCT_SURFACE = 0
AGE_BUCKETS = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's bucket edges: <18, 18-24, ..., 56+
USER_FEATURE_FIELDS = ("gender", "age_bucket", "occupation")  # slot order in UserContext.user_features


def rating_actions(rating: float) -> tuple[int, ...]:
    actions = [ACTION_IDS["click"], ACTION_IDS["dwell"]]
    if rating >= POSITIVE_RATING:
        actions.append(ACTION_IDS["favorite"])
    if rating <= NEGATIVE_RATING:
        actions.append(ACTION_IDS["not_interested"])
    return tuple(sorted(actions))


def feature_id(field: str, value: str) -> int:
    """A stable id > 0 for a categorical value (56 bits of SHA-256; the model hashes it again)."""
    return int.from_bytes(hashlib.sha256(f"{field}={value}".encode()).digest()[:7], "big") + 1


def user_feature_ids(info: UserInfo | None) -> tuple[int, ...]:
    if info is None:
        return (0, 0, 0)  # unknown: padding
    bucket = sum(info.age >= edge for edge in AGE_BUCKETS)
    return (
        feature_id("gender", info.gender),
        feature_id("age_bucket", str(bucket)),
        feature_id("occupation", info.occupation),
    )


@dataclass(frozen=True)
class Timeline:
    """One user's events, oldest first (sorted by timestamp, then item id)."""

    user_id: int
    post_ids: np.ndarray  # [n] int64
    ratings: np.ndarray  # [n] float32
    timestamps: np.ndarray  # [n] int64, seconds
    actions: np.ndarray  # [n, A] bool multi-hot
    user_features: tuple[int, ...]

    def context(self, end: int, num_features: int = len(USER_FEATURE_FIELDS)) -> UserContext:
        """The user context a server would receive with the events [0, end) as history."""
        n = end
        return UserContext(
            user_id=self.user_id,
            post_ids=self.post_ids[:end],
            author_ids=np.zeros(n, dtype=np.int64),
            actions=self.actions[:end],
            surfaces=np.full(n, PRODUCT_SURFACE, dtype=np.int64),
            user_features=self.user_features[:num_features],
        )


@dataclass(frozen=True)
class EvalCase:
    user: int  # index into Split.timelines
    cut: int  # position of the target in the timeline; the history is events [0, cut)
    target: int  # post id


@dataclass(frozen=True)
class Split:
    timelines: tuple[Timeline, ...]
    train_end: np.ndarray  # [U] exclusive end of each user's training events
    validation: tuple[EvalCase, ...]
    test: tuple[EvalCase, ...]


def build_timelines(data: MovieLens, num_actions: int) -> tuple[Timeline, ...]:
    r = data.ratings
    order = np.lexsort((r.item_ids, r.timestamps, r.user_ids))  # by user, then timestamp, then item
    users, starts = np.unique(r.user_ids[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    timelines = []
    for user, start, end in zip(users.tolist(), starts.tolist(), ends.tolist(), strict=True):
        idx = order[start:end]
        posts = r.item_ids[idx]
        if len(np.unique(posts)) != len(posts):
            raise ValueError(f"user {user} rates a movie twice; the protocol assumes one rating per pair")
        ratings = r.ratings[idx]
        actions = np.zeros((len(idx), num_actions), dtype=bool)
        for i, rating in enumerate(ratings.tolist()):
            actions[i, list(rating_actions(rating))] = True
        timelines.append(
            Timeline(
                user_id=user,
                post_ids=posts,
                ratings=ratings,
                timestamps=r.timestamps[idx],
                actions=actions,
                user_features=user_feature_ids(data.users.get(user)),
            )
        )
    return tuple(timelines)


def split(timelines: Sequence[Timeline]) -> Split:
    train_end = np.empty(len(timelines), dtype=np.int64)
    validation, test = [], []
    for u, t in enumerate(timelines):
        positives = np.flatnonzero(t.ratings >= POSITIVE_RATING)
        if len(positives) < MIN_POSITIVES:
            train_end[u] = len(t.post_ids)
            continue
        val_cut, test_cut = int(positives[-2]), int(positives[-1])
        validation.append(EvalCase(u, val_cut, int(t.post_ids[val_cut])))
        test.append(EvalCase(u, test_cut, int(t.post_ids[test_cut])))
        train_end[u] = val_cut
    return Split(tuple(timelines), train_end, tuple(validation), tuple(test))


def training_examples(s: Split) -> np.ndarray:
    """[E, 2] (user index, target position): every positive strictly inside the training prefix."""
    rows = []
    for u, t in enumerate(s.timelines):
        pos = np.flatnonzero(t.ratings[: s.train_end[u]] >= POSITIVE_RATING)
        rows.append(np.stack([np.full(len(pos), u), pos], axis=1))
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), dtype=np.int64)


def training_interactions(s: Split) -> tuple[np.ndarray, np.ndarray]:
    """(user index [m], post id [m]) of every training event, for the baselines."""
    users = [np.full(int(s.train_end[u]), u) for u in range(len(s.timelines))]
    posts = [t.post_ids[: s.train_end[u]] for u, t in enumerate(s.timelines)]
    return np.concatenate(users).astype(np.int64), np.concatenate(posts).astype(np.int64)


def featurize_examples(s: Split, examples: np.ndarray, cfg: TowerConfig) -> tuple[UserFeatures, torch.Tensor]:
    """Model inputs for the histories before each example's target, and the target post ids [B]."""
    contexts = [s.timelines[u].context(i, cfg.num_user_features) for u, i in examples.tolist()]
    targets = np.asarray([s.timelines[u].post_ids[i] for u, i in examples.tolist()], dtype=np.int64)
    return featurize_users(contexts, cfg), torch.from_numpy(targets)
