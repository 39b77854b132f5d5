"""The user tower on its device: validated user contexts in, [B, D] embeddings out. No grpc import.

Featurization (hashing, padding to the last S events) runs here, inside the batch, so that its numpy
work is vectorised over every user of a forward pass instead of being paid per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
from user_service.config import CPU_TOWERS
from user_service.cuda_graphs import GraphedUserTower
from user_service.onnx_tower import OnnxUserTower

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
        max_history_events: int, cuda_graph_max_batch: int = 0, cpu_tower: str = "eager",
        tower_cache_dir: Path | None = None,
    ) -> None:  # fmt: skip
        if cpu_tower not in CPU_TOWERS:
            raise ValueError(f"cpu_tower must be one of {', '.join(CPU_TOWERS)}, got {cpu_tower!r}")
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
        # cpu only: the tower on ONNX Runtime or torch.compile'd (built by warm_up); None = eager.
        # ONNX Runtime gets fp32 only (its CPU kernels have no bf16 for most of the tower's ops).
        if device.type != "cpu" or (cpu_tower == "onnx" and dtype != torch.float32):
            cpu_tower = "eager"
        self._cpu_tower = cpu_tower
        self._tower_cache_dir = tower_cache_dir
        self._fast: OnnxUserTower | CompiledUserTower | None = None

    @classmethod
    def from_loaded(
        cls, loaded: LoadedModel, device: torch.device, dtype: torch.dtype, max_history_events: int,
        cuda_graph_max_batch: int = 0, cpu_tower: str = "eager", tower_cache_dir: Path | None = None,
    ) -> UserEncoder:  # fmt: skip
        return cls(
            loaded.model, loaded.fingerprint, device, dtype, max_history_events, cuda_graph_max_batch,
            cpu_tower, tower_cache_dir,
        )  # fmt: skip

    @property
    def runtime(self) -> str:
        """How the tower runs now: "cuda-graphs", "onnx", "compile" or "eager"."""
        if self.cuda_graphs:
            return "cuda-graphs"
        return self._cpu_tower if self._fast is not None else "eager"

    def encode(self, contexts: Sequence[UserContext]) -> torch.Tensor:
        """B validated contexts -> [B, D] unit-norm embeddings on the cpu, in `self.dtype`."""
        features = featurize_users(contexts, self.config, self.max_history_events).to(self.device)
        threads = 1
        if self.device.type == "cpu":  # threads for the largest matmul: tokens x D x FFN width
            cfg = self.config
            tokens = len(contexts) * (1 + cfg.history_len)
            threads = INTRA_OP.use_for(tokens * cfg.emb_dim * max(cfg.emb_dim, cfg.ffn_dim))
        with torch.inference_mode():
            out = self._graphed.encode_users(features) if self.cuda_graphs else None
            fast = self._fast
            if out is None and fast is not None:
                try:
                    out = fast.encode_users(features, threads)
                except Exception:  # e.g. a shape it cannot recompile for: eager from now on, this batch too
                    logger.exception("the %s user tower failed; eager from now on", self._cpu_tower)
                    self._fast = None
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
        if self._cpu_tower != "eager" and self._fast is None:
            self._build_cpu_tower(batch_sizes)

    def _build_cpu_tower(self, batch_sizes: Sequence[int]) -> None:
        """Build the fast CPU tower and check it against eager at several batch sizes (compiling
        for a first size and a second makes torch.compile's batch dimension dynamic); any failure
        leaves the eager tower serving."""
        t0 = time.perf_counter()
        try:
            if self._cpu_tower == "onnx":
                example = featurize_users(self._random_contexts(2), self.config, self.max_history_events)
                self._fast = OnnxUserTower(
                    self._model, self.identity.fingerprint, example, self._tower_cache_dir, INTRA_OP.limit
                )
            else:
                self._fast = CompiledUserTower(self._model)
            for b in sorted({1, 2, *batch_sizes}):
                self._check_fast_path_matches_eager(b)
        except Exception:  # no C++ compiler, an op the exporter or inductor cannot handle: eager serves
            logger.exception("building the %s user tower failed; running it eagerly", self._cpu_tower)
            self._fast = None
            return
        if self._fast is not None:
            logger.info("user tower on %s, ready in %.1f s", self._cpu_tower, time.perf_counter() - t0)

    def _random_contexts(self, b: int) -> list[UserContext]:
        """b users of random ids and actions (seeded by b), user features set; every other history
        is full, the others shorter (padded positions)."""
        cfg = self.config
        rng = np.random.default_rng(b)
        contexts = []
        for i in range(b):
            n = cfg.history_len if i % 2 == 0 else int(rng.integers(0, cfg.history_len))
            contexts.append(
                UserContext(
                    user_id=i + 1,
                    post_ids=rng.integers(1, 1 << 40, n, dtype=np.int64),
                    author_ids=rng.integers(0, 1 << 40, n, dtype=np.int64),
                    actions=rng.random((n, cfg.num_actions)) < 0.2,
                    surfaces=rng.integers(0, cfg.num_product_surfaces, n, dtype=np.int64),
                    user_features=tuple(int(v) for v in rng.integers(1, 1 << 40, cfg.num_user_features)),
                )
            )
        return contexts

    def _check_fast_path_matches_eager(self, b: int) -> None:
        contexts = self._random_contexts(b)
        fast = self.encode(contexts).float()  # CUDA graphs or the fast CPU tower
        features = featurize_users(contexts, self.config, self.max_history_events).to(self.device)
        with torch.inference_mode():
            eager = self._model.encode_users(features).float().cpu()
        err = (fast - eager).abs().max().item()
        exact = self.device.type == "cpu" and self.dtype == torch.float32  # fp32 on cpu: ~1e-7 apart
        if err > (1e-4 if exact else 1e-2):
            self.cuda_graphs, self._fast = False, None
            logger.error("the fast user tower differs from eager by %.3g at B=%d; running eagerly", err, b)


def load_encoder(
    checkpoint: str, device: str, dtype: str, max_history_events: int, cuda_graph_max_batch: int = 0,
    cpu_tower: str = "eager", tower_cache_dir: Path | None = None,
) -> UserEncoder:  # fmt: skip
    """Load and verify the checkpoint and move it to the device (blocking: call off the event loop).
    cuda_graph_max_batch > 0: on cuda, batches up to that size replay CUDA graphs (captured at warm-up).
    cpu_tower: on cpu, how the tower runs (CPU_TOWERS; the fast ones are built at warm-up), exported
    ONNX models cached in tower_cache_dir (None: not cached)."""
    loaded = load_checkpoint(checkpoint)
    target = resolve_device(device)
    encoder = UserEncoder.from_loaded(
        loaded, target, TORCH_DTYPES[dtype], max_history_events, cuda_graph_max_batch, cpu_tower,
        tower_cache_dir,
    )  # fmt: skip
    logger.info(
        "loaded checkpoint %s (fingerprint %s, D=%d, S=%d) on %s as %s",
        checkpoint, loaded.fingerprint, loaded.config.emb_dim, loaded.config.history_len, target, dtype,
    )  # fmt: skip
    return encoder
