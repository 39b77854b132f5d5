"""The user tower on its device: validated user contexts in, [B, D] embeddings out. No grpc import.

Featurization (hashing, padding to the last S events) runs here, inside the batch, so that its numpy
work is vectorised over every user of a forward pass instead of being paid per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.device import resolve_device
from shared.errors import CheckpointError
from shared.model.checkpoint import LoadedModel, load_checkpoint
from shared.model.config import TowerConfig
from shared.model.features import UserContext, featurize_users
from shared.model.towers import TwoTowerModel
from shared.threads import INTRA_OP
from user_service.compiled_tower import CompiledUserTower
from user_service.cuda_graphs import GraphedUserTower

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelIdentity:
    fingerprint: str  # 16 hex chars, from the checkpoint
    embedding_dim: int  # D


class UserEncoder:
    """Runs the user tower. `encode` is called from the batcher's single worker thread only."""

    def __init__(
        self, model: TwoTowerModel, fingerprint: str, device: torch.device, dtype: torch.dtype,
        max_history_events: int, cuda_graph_max_batch: int = 0, compile_tower: bool = False,
    ) -> None:  # fmt: skip
        self.config: TowerConfig = model.config
        self.identity = ModelIdentity(fingerprint, model.config.emb_dim)
        self.device = device
        self.dtype = dtype  # of the weights and of the returned embeddings
        self.max_history_events = max_history_events
        self._model = model.to(device=device, dtype=dtype).eval()
        # cuda only: batches up to this size replay captured graphs (captured by warm_up); 0 = eager
        self._graphed = (
            GraphedUserTower(self._model, device, cuda_graph_max_batch)
            if device.type == "cuda" and cuda_graph_max_batch > 0
            else None
        )
        self.cuda_graphs = False  # True once captured
        # cpu only: torch.compile'd tower (compiled by warm_up); None = eager
        self._compile = compile_tower and device.type == "cpu"
        self._compiled: CompiledUserTower | None = None

    @classmethod
    def from_loaded(
        cls, loaded: LoadedModel, device: torch.device, dtype: torch.dtype, max_history_events: int,
        cuda_graph_max_batch: int = 0, compile_tower: bool = False,
    ) -> UserEncoder:  # fmt: skip
        return cls(
            loaded.model, loaded.fingerprint, device, dtype, max_history_events, cuda_graph_max_batch,
            compile_tower,
        )  # fmt: skip

    def encode(self, contexts: Sequence[UserContext]) -> torch.Tensor:
        """B validated contexts -> [B, D] unit-norm embeddings on the cpu, in `self.dtype`."""
        features = featurize_users(contexts, self.config, self.max_history_events).to(self.device)
        if self.device.type == "cpu":  # threads for the largest matmul: tokens x D x FFN width
            cfg = self.config
            tokens = len(contexts) * (1 + cfg.history_len)
            INTRA_OP.use_for(tokens * cfg.emb_dim * max(cfg.emb_dim, cfg.ffn_dim))
        with torch.inference_mode():
            out = self._graphed.encode_users(features) if self.cuda_graphs else None
            if out is None and self._compiled is not None:
                try:
                    out = self._compiled.encode_users(features)
                except Exception:  # a shape it failed to recompile for: eager from now on, this batch too
                    logger.exception("the compiled user tower failed; running it eagerly from now on")
                    self._compiled = None
            if out is None:
                out = self._model.encode_users(features)  # [B, D]
        return out.cpu()

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run full-history batches of each size once, so the first real request does not pay for
        lazy initialisation (allocator, kernels, cuda context)."""
        s, a = self.config.history_len, self.config.num_actions
        for b in batch_sizes:
            ctx = UserContext(
                user_id=1,
                post_ids=np.arange(1, s + 1, dtype=np.int64),
                author_ids=np.arange(1, s + 1, dtype=np.int64),
                actions=np.eye(s, a, dtype=bool),
                surfaces=np.zeros(s, dtype=np.int64),
            )
            out = self.encode([ctx] * b)
            if not torch.isfinite(out.float()).all():
                raise CheckpointError("warm-up produced non-finite embeddings: the checkpoint is broken")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._graphed is not None and not self.cuda_graphs:
            try:
                self._graphed.capture()
            except Exception:  # an op the graph cannot hold, an old driver: eager still serves
                logger.exception("capturing CUDA graphs of the user tower failed; running it eagerly")
                return
            self.cuda_graphs = True
            for b in batch_sizes:  # the graphs must give what the eager tower gives
                self._check_fast_path_matches_eager(b)
        if self._compile and self._compiled is None:
            self._compile_tower(batch_sizes)

    def _compile_tower(self, batch_sizes: Sequence[int]) -> None:
        """Compile for a first batch size and then a second (which makes the batch dimension dynamic),
        and check the result against eager; any failure leaves the eager tower serving."""
        t0 = time.perf_counter()
        try:
            self._compiled = CompiledUserTower(self._model)
            for b in sorted({1, 2, *batch_sizes}):
                self._check_fast_path_matches_eager(b)
        except Exception:  # no C++ compiler, an op inductor cannot handle: eager still serves
            logger.exception("compiling the user tower failed; running it eagerly")
            self._compiled = None
            return
        if self._compiled is not None:
            logger.info("user tower compiled in %.1f s", time.perf_counter() - t0)

    def _check_fast_path_matches_eager(self, b: int) -> None:
        s, a = self.config.history_len, self.config.num_actions
        rng = np.random.default_rng(b)
        contexts = [
            UserContext(
                user_id=i + 1,
                post_ids=rng.integers(1, 1 << 40, s, dtype=np.int64),
                author_ids=rng.integers(0, 1 << 40, s, dtype=np.int64),
                actions=rng.random((s, a)) < 0.2,
                surfaces=np.zeros(s, dtype=np.int64),
            )
            for i in range(b)
        ]
        fast = self.encode(contexts).float()  # CUDA graphs or the compiled tower
        features = featurize_users(contexts, self.config, self.max_history_events).to(self.device)
        with torch.inference_mode():
            eager = self._model.encode_users(features).float().cpu()
        err = (fast - eager).abs().max().item()
        if err > 1e-2:
            self.cuda_graphs, self._compiled = False, None
            logger.error("the fast user tower differs from eager by %.3g at B=%d; running eagerly", err, b)


def load_encoder(
    checkpoint: str, device: str, dtype: str, max_history_events: int, cuda_graph_max_batch: int = 0,
    compile_tower: bool = False,
) -> UserEncoder:  # fmt: skip
    """Load and verify the checkpoint and move it to the device (blocking: call off the event loop).
    cuda_graph_max_batch > 0: on cuda, batches up to that size replay CUDA graphs (captured at warm-up).
    compile_tower: on cpu, torch.compile the tower (compiled at warm-up)."""
    loaded = load_checkpoint(checkpoint)
    target = resolve_device(device)
    encoder = UserEncoder.from_loaded(
        loaded, target, TORCH_DTYPES[dtype], max_history_events, cuda_graph_max_batch, compile_tower
    )
    logger.info(
        "loaded checkpoint %s (fingerprint %s, D=%d, S=%d) on %s as %s",
        checkpoint, loaded.fingerprint, loaded.config.emb_dim, loaded.config.history_len, target, dtype,
    )  # fmt: skip
    return encoder
