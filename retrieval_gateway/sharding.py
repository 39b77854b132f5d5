"""A corpus split across S gateway shards: which shard holds an item, and the router's exact merge.

No grpc import. The hash is fixed and documented, because every shard and every router must agree on
it for the life of a deployment:

    shard(post_id) = splitmix64(post_id as uint64) mod S

splitmix64 (Steele, Lea & Flood, 2014; the seeding function of Java's SplittableRandom and of the
xoshiro generators) mixes every bit of the id into the low bits, so sequential ids, ids with a common
stride and ids minted with a shard prefix all spread evenly. It depends on the post id alone: an
upsert, a delete and a snapshot row of one item always reach the same shard.

Merge: each shard returns its own exact top-k by (score descending, post id ascending); the global
top-k is a subset of their union (an item beaten by k items of its own shard is beaten globally), and
sorting the union by the same key gives exactly what one unsharded index returns, ties included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's output function of each int64 value (wrapping uint64 arithmetic), vectorised."""
    z = values.astype(np.int64, copy=False).view(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def shard_of(post_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """[n] int64 post ids -> [n] int64 shard index in [0, num_shards)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    with np.errstate(over="ignore"):
        return (splitmix64(np.asarray(post_ids)) % np.uint64(num_shards)).astype(np.int64)


@dataclass(frozen=True)
class ShardFilter:
    """The items one shard keeps: `mask(post_ids)` is True for this shard's ids."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is not in [0, {self.count})")

    def mask(self, post_ids: np.ndarray) -> np.ndarray:
        if self.count == 1:
            return np.ones(len(post_ids), dtype=bool)
        return shard_of(post_ids, self.count) == self.index


@dataclass(frozen=True)
class ShardHits:
    """One shard's answer to one query, as columns in its own rank order."""

    post_ids: np.ndarray  # [n] int64
    author_ids: np.ndarray  # [n] int64
    scores: np.ndarray  # [n] float32
    attributes: list[Mapping[str, str]]  # [n] (read-only for the caller)


def merge_hits(parts: Sequence[ShardHits], k: int) -> ShardHits:
    """The exact global top-k of several shards' top-k lists: (score desc, post id asc)."""
    parts = [p for p in parts if len(p.post_ids)]
    if not parts:
        return ShardHits(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), [])
    if len(parts) == 1:
        p = parts[0]
        return ShardHits(p.post_ids[:k], p.author_ids[:k], p.scores[:k], p.attributes[:k])
    post_ids = np.concatenate([p.post_ids for p in parts])
    scores = np.concatenate([p.scores for p in parts]).astype(np.float32, copy=False)
    order = np.lexsort((post_ids, -scores))[:k]  # last key is primary: score descending, then post id
    attributes = [a for p in parts for a in p.attributes]
    return ShardHits(
        post_ids[order],
        np.concatenate([p.author_ids for p in parts])[order],
        scores[order],
        [attributes[i] for i in order.tolist()],
    )
