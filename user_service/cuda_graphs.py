"""The user tower replayed from CUDA graphs: one graph per batch-size bucket, no per-op launches.

A forward pass of the small user tower is a few hundred tiny kernels; at small batches their launch
cost (tens of microseconds each from Python) is most of the time on a GPU. A CUDA graph records the
whole pass once and replays it with one launch. Shapes are fixed per graph, so batches are padded up
to the next power of two (1, 2, 4, ... max); pad rows are independent of the real ones (no op of the
tower mixes users) and are cut off the output. Batches above the largest bucket run eagerly.

Only for cuda; `encode` is called from one thread at a time (the batcher's worker), as for the eager
tower. No grpc import.
"""

from __future__ import annotations

import logging

import torch

from shared.model.features import UserFeatures
from shared.model.towers import TwoTowerModel

logger = logging.getLogger(__name__)


def buckets_up_to(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself: [1, 2, 4, ..., max_batch]."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: UserFeatures, output: torch.Tensor) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphedUserTower:
    """`encode_users` for batches up to `max_batch` on cuda through captured graphs."""

    def __init__(self, model: TwoTowerModel, device: torch.device, max_batch: int) -> None:
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a cuda device")
        self._model = model
        self._device = device
        self.buckets = buckets_up_to(max_batch)
        self._graphs: dict[int, _Graph] = {}
        self._pool = None  # one memory pool for every graph: they never run at the same time

    def _static_inputs(self, b: int) -> UserFeatures:
        """Zero inputs of the bucket's shapes (a zero hash embeds as zero; every row stays finite)."""
        cfg = self._model.config
        s, dev = cfg.history_len, self._device
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.int64, device=dev)  # noqa: E731
        return UserFeatures(
            user_hashes=zeros(b, cfg.num_user_hashes),
            user_feature_hashes=zeros(b, cfg.num_user_features, cfg.num_user_hashes),
            history_post_hashes=zeros(b, s, cfg.num_item_hashes),
            history_author_hashes=zeros(b, s, cfg.num_author_hashes),
            history_actions=torch.zeros(b, s, cfg.num_actions, dtype=torch.float32, device=dev),
            history_surfaces=zeros(b, s),
            history_mask=torch.zeros(b, s, dtype=torch.bool, device=dev),
        )

    def capture(self) -> None:
        """Record one graph per bucket (blocking; at warm-up, before serving)."""
        with torch.inference_mode():
            for b in self.buckets:
                inputs = self._static_inputs(b)
                side = torch.cuda.Stream(self._device)
                side.wait_stream(torch.cuda.current_stream(self._device))
                with torch.cuda.stream(side):  # warm the kernels (and cuBLAS workspaces) off the capture
                    for _ in range(2):
                        self._model.encode_users(inputs)
                torch.cuda.current_stream(self._device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    output = self._model.encode_users(inputs)
                self._pool = graph.pool()
                self._graphs[b] = _Graph(graph, inputs, output)
        torch.cuda.synchronize(self._device)
        logger.info("captured CUDA graphs of the user tower for batch sizes %s", self.buckets)

    def bucket_for(self, b: int) -> int | None:
        return next((size for size in self.buckets if size >= b), None)

    def encode_users(self, features: UserFeatures) -> torch.Tensor | None:
        """[B, D] on the device (a view into the graph's output: copy it before the next call), or
        None when B is above the largest bucket or graphs were not captured."""
        b = features.history_mask.shape[0]
        bucket = self.bucket_for(b)
        held = self._graphs.get(bucket) if bucket is not None else None
        if held is None:
            return None
        for name, target in vars(held.inputs).items():
            target[:b].copy_(getattr(features, name), non_blocking=True)
        held.graph.replay()
        return held.output[:b]
