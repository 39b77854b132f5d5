"""The training loop: sampled softmax with in-batch negatives, logQ correction, early stopping.

Loss (Phoenix's recipe, as in Yi et al. 2019, "Sampling-bias-corrected neural modeling"): for a batch of
(user history, favourited movie) pairs, logits[i, j] = cos(u_i, c_j) / τ − log q_j, where c_j are the
batch's own targets (in-batch negatives), q_j the probability that movie j is a target of a training
example (in-batch sampling picks popular movies more often; subtracting log q stops the model from
learning that bias), τ a learnable temperature (init 0.1). Another row's copy of the same movie is not a
negative and is masked out. Cross-entropy against the diagonal.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.model.features import featurize_items
from shared.model.towers import TwoTowerModel
from training.dataset import Split, featurize_examples, training_examples
from training.evaluate import Catalog, ModelScorer, evaluate
from training.progress import ProgressBar

logger = logging.getLogger(__name__)

MIN_TEMPERATURE = 0.01  # a collapsing temperature makes logits explode; the clamp keeps them finite
SELECTION_METRIC = "recall@50"


@dataclass(frozen=True)
class TrainConfig:
    max_epochs: int = 8  # keeps a quiet 2-core run near 4 minutes (~30 s per epoch)
    patience: int = 3  # epochs without a better validation recall@50 before stopping
    batch_size: int = 512
    learning_rate: float = 2e-3
    weight_decay: float = 0.01  # on dense weights only; embedding tables, norms and biases are exempt
    temperature_init: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1")
        if self.learning_rate <= 0 or self.temperature_init < MIN_TEMPERATURE or self.weight_decay < 0:
            raise ValueError("TrainConfig: learning_rate > 0, temperature_init >= 0.01, weight_decay >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EpochLog:
    epoch: int
    loss: float
    temperature: float
    validation: dict[str, float]
    seconds: float


@dataclass
class TrainResult:
    best_epoch: int
    best_validation: dict[str, float]
    epochs: list[EpochLog] = field(default_factory=list)
    seconds: float = 0.0
    num_examples: int = 0


class Temperature(nn.Module):
    """τ = exp(log τ), learned in log space so it stays positive; clamped at MIN_TEMPERATURE."""

    def __init__(self, init: float) -> None:
        super().__init__()
        self.log_tau = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp().clamp_min(MIN_TEMPERATURE)


def sampled_softmax_loss(
    users: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor,
    temperature: torch.Tensor,
) -> torch.Tensor:
    """users [B, D], items [B, D] (unit norm; row i is user i's target), item_ids [B], log_q [B]."""
    logits = users @ items.T / temperature - log_q[None, :]  # [B, B]
    duplicate = (item_ids[:, None] == item_ids[None, :]) & ~torch.eye(len(item_ids), dtype=torch.bool)
    logits = logits.masked_fill(duplicate, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(item_ids)))


def target_log_q(split: Split, examples: np.ndarray, catalog: Catalog) -> torch.Tensor:
    """[N] log of each movie's share of training targets (movies never a target get a count of 1)."""
    posts = np.asarray([split.timelines[u].post_ids[i] for u, i in examples.tolist()], dtype=np.int64)
    counts = np.bincount(catalog.rows(posts), minlength=len(catalog.post_ids)).astype(np.float64)
    counts = np.maximum(counts, 1.0)
    return torch.from_numpy(np.log(counts / counts.sum()).astype(np.float32))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        dense = param.ndim == 2 and not name.startswith("tables.") and "surface_emb" not in name
        (decay if dense else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_steps(
    model: TwoTowerModel,
    split: Split,
    examples: np.ndarray,
    log_q: torch.Tensor,
    catalog: Catalog,
    temperature: Temperature,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    bar: ProgressBar | None = None,
) -> float:
    """One pass over `examples` in the given order; returns the mean loss."""
    model.train()
    total, steps = 0.0, 0
    for start in range(0, len(examples), cfg.batch_size):
        batch = examples[start : start + cfg.batch_size]
        if len(batch) < 2:  # a softmax over one candidate has nothing to learn
            continue
        users, targets = featurize_examples(split, batch, model.config)
        items = featurize_items(targets.numpy(), np.zeros(len(targets), dtype=np.int64), model.config)
        loss = sampled_softmax_loss(
            model.encode_users(users),
            model.encode_items(items),
            targets,
            log_q[torch.from_numpy(catalog.rows(targets.numpy()))],
            temperature(),
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
        if bar is not None:
            bar.update(1, f"loss {total / steps:.4f}")
    model.eval()
    return total / max(steps, 1)


def train(
    model: TwoTowerModel, split: Split, catalog: Catalog, cfg: TrainConfig, progress: bool = True
) -> TrainResult:
    """Train from a seeded initialisation; leaves `model` at the epoch with the best validation recall@50."""
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    model.reset_parameters(torch.Generator().manual_seed(cfg.seed))
    rng = np.random.default_rng(cfg.seed)
    examples = training_examples(split)
    if len(examples) < 2:
        raise ValueError("fewer than 2 training examples: nothing to train on")
    log_q = target_log_q(split, examples, catalog)
    temperature = Temperature(cfg.temperature_init)
    groups = param_groups(model, cfg.weight_decay)
    groups[1]["params"].append(temperature.log_tau)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    logger.info("training on %d examples, %d steps per epoch", len(examples), steps_per_epoch)

    result = TrainResult(best_epoch=0, best_validation={}, num_examples=len(examples))
    best_state, best_score, stale = None, -1.0, 0
    for epoch in range(1, cfg.max_epochs + 1):
        epoch_start = time.monotonic()
        bar = ProgressBar(steps_per_epoch, f"epoch {epoch:>2}/{cfg.max_epochs}", enabled=progress)
        order = examples[rng.permutation(len(examples))]
        loss = train_steps(model, split, order, log_q, catalog, temperature, optimizer, cfg, bar)
        validation = evaluate(ModelScorer(model, catalog), split, split.validation, catalog)
        tau = temperature().item()
        bar.close(f"loss {loss:.4f} tau {tau:.3f} val {SELECTION_METRIC} {validation[SELECTION_METRIC]:.4f}")
        result.epochs.append(EpochLog(epoch, loss, tau, validation, time.monotonic() - epoch_start))
        if validation[SELECTION_METRIC] > best_score:
            best_score, stale = validation[SELECTION_METRIC], 0
            best_state = copy.deepcopy(model.state_dict())
            result.best_epoch, result.best_validation = epoch, validation
        else:
            stale += 1
            if stale >= cfg.patience:
                logger.info("early stop after epoch %d (best epoch %d)", epoch, result.best_epoch)
                break
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.monotonic() - started
    return result
