"""Candidate-tower encoding in large batches (no grpc): ids -> L2-normalised float32 embeddings."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from shared.model.checkpoint import LoadedModel
from shared.model.features import featurize_items, validate_item_ids

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
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """[N] ids -> [N, D] float32 embeddings, row i for item i. `label` turns on progress logging;
        setting `stop` abandons the work between batches (EncodingStopped); `progress(done)` is called
        after each batch with the rows encoded so far."""
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
                out[lo:hi] = self.model.encode_items(features).numpy()  # [b, D]
                now = time.perf_counter()
                if self._on_encoded is not None:
                    self._on_encoded(hi - lo, now - t0)
                if progress is not None:
                    progress(hi)
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
