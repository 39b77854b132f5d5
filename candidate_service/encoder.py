"""Candidate-tower encoding in large batches (no grpc): ids -> L2-normalised float32 embeddings."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from shared.model.checkpoint import LoadedModel
from shared.model.features import ItemFeatures, featurize_items, validate_item_ids
from shared.model.towers import TwoTowerModel

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0  # a progress line at most this often while encoding a long corpus


class EncodingStopped(Exception):
    """A long encode was abandoned because the service is shutting down."""


class ItemEncoder:
    def __init__(
        self,
        loaded: LoadedModel,
        batch_size: int,
        on_encoded: Callable[[int, float], None] | None = None,
    ) -> None:
        """`on_encoded(items, seconds)` is called after every forward pass (metrics)."""
        self.model = loaded.model
        self.config = loaded.config
        self._tower = FusedCandidateTower(loaded.model)
        self.fingerprint = loaded.fingerprint
        self.dim = loaded.config.emb_dim
        self.batch_size = batch_size
        self._on_encoded = on_encoded

    def encode(
        self,
        post_ids: np.ndarray,
        author_ids: np.ndarray,
        label: str = "",
        stop: threading.Event | None = None,
    ) -> np.ndarray:
        """[N] ids -> [N, D] float32 embeddings, row i for item i. `label` turns on progress logging;
        setting `stop` abandons the work between batches (EncodingStopped)."""
        post_ids = np.asarray(post_ids, dtype=np.int64)
        author_ids = np.asarray(author_ids, dtype=np.int64)
        validate_item_ids(post_ids, author_ids)  # once, up front: a bad id fails before any compute
        n = len(post_ids)
        out = np.empty((n, self.dim), dtype=np.float32)  # [N, D]
        start = last_log = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, n, self.batch_size):
                if stop is not None and stop.is_set():
                    raise EncodingStopped(f"{label or 'encoding'} stopped at {lo}/{n} items")
                hi = min(n, lo + self.batch_size)
                t0 = time.perf_counter()
                features = featurize_items(post_ids[lo:hi], author_ids[lo:hi], self.config)
                out[lo:hi] = self._tower(features).numpy()  # [b, D]
                now = time.perf_counter()
                if self._on_encoded is not None:
                    self._on_encoded(hi - lo, now - t0)
                if label and now - last_log >= PROGRESS_EVERY_S:
                    last_log = now
                    logger.info(
                        "%s: encoded %d/%d items (%.0f%%, %.0f items/s)",
                        label, hi, n, 100 * hi / n, hi / (now - start),
                    )  # fmt: skip
        if label and n:
            elapsed = time.perf_counter() - start
            logger.info("%s: encoded %d items in %.1fs (%.0f items/s)", label, n, elapsed, n / elapsed)
        return out


class FusedCandidateTower:
    """The candidate tower's exact function with one gather instead of four lookups, four padding
    masks and a concat (a third of the forward time at the default size).

    The post and author tables are stacked into one [Vp + Va, D] table whose two padding rows are zero,
    so gathering rows [post hashes, Vp + author hashes] yields the masked, concatenated input directly.
    Costs one copy of the two tables (100 MB at the default size).
    """

    def __init__(self, model: TwoTowerModel) -> None:
        tables, self._tower = model.tables, model.candidate_tower
        with torch.no_grad():
            self._offset = tables.post.weight.shape[0]
            self._table = torch.cat([tables.post.weight, tables.author.weight]).detach().clone()  # [Vp+Va, D]
            self._table[0] = 0  # hash 0 is padding: HashEmbedding masks it to zero
            self._table[self._offset] = 0

    def __call__(self, f: ItemFeatures) -> torch.Tensor:
        n = f.post_hashes.shape[0]
        rows = torch.cat([f.post_hashes, f.author_hashes + self._offset], dim=1)  # [N, Hi + Ha]
        x = self._table.index_select(0, rows.reshape(-1)).view(n, -1)  # [N, (Hi + Ha) * D]
        x = self._tower.proj_out(F.silu(self._tower.proj_in(x)))  # [N, D]
        return F.normalize(x.float(), dim=-1, eps=1e-12)
