"""Candidate-tower encoding in large batches (no grpc): ids -> L2-normalised float32 embeddings."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from shared.model.checkpoint import LoadedModel
from shared.model.features import featurize_items, validate_item_ids
from shared.progress import progress_bar

logger = logging.getLogger(__name__)


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
        # A labelled (long) encode logs a progress line every few seconds and one at the end; an
        # unlabelled one (a write's few items) does not pay for a bar.
        bar = progress_bar(n, f"{label} encoded", unit="item", logger=logger, live=False) if label else None
        with torch.inference_mode(), bar if bar is not None else contextlib.nullcontext():
            for lo in range(0, n, self.batch_size):
                if stop is not None and stop.is_set():
                    raise EncodingStopped(f"{label or 'encoding'} stopped at {lo}/{n} items")
                hi = min(n, lo + self.batch_size)
                t0 = time.perf_counter()
                features = featurize_items(post_ids[lo:hi], author_ids[lo:hi], self.config)
                out[lo:hi] = self.model.encode_items(features).numpy()  # [b, D]
                if self._on_encoded is not None:
                    self._on_encoded(hi - lo, time.perf_counter() - t0)
                if progress is not None:
                    progress(hi)
                if bar is not None:
                    bar.update(hi - lo)
        return out
