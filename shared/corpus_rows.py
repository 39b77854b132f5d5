"""The corpus's rows, shared by candidate_service (which produces changes) and the gateway (which
follows them): one `Delta` type for a change, with one apply order. No grpc, no torch.

Apply order of a delta: upserts first, then deletes (an id both upserted and deleted in one delta ends
up deleted). candidate_service's store and the gateway's index both apply deltas through this module,
so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Attrs = dict[str, str] | None


def attribute_bytes(attrs: Attrs) -> int:
    """Serialized size bound of one row's attributes (an empty map still costs a tag and a length)."""
    if not attrs:
        return 2
    return 4 + sum(len(k.encode()) + len(v.encode()) + 8 for k, v in attrs.items())


@dataclass(frozen=True)
class Delta:
    """The change that took the corpus from `version - 1` to `version` (one upsert or delete call)."""

    version: int
    fingerprint: str
    upsert_post_ids: np.ndarray  # [u] int64
    upsert_author_ids: np.ndarray  # [u] int64
    upsert_embeddings: np.ndarray  # [u, D] float32
    upsert_attributes: list[Attrs]  # [u]
    deleted_post_ids: np.ndarray  # [d] int64

    @property
    def nbytes(self) -> int:
        attrs = sum(attribute_bytes(a) for a in self.upsert_attributes)
        return (
            int(
                self.upsert_embeddings.nbytes
                + 16 * len(self.upsert_post_ids)
                + 8 * len(self.deleted_post_ids)
            )
            + attrs
        )
