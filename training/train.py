"""The training loop: the dense objective (default) or Phoenix's in-batch sampled softmax; early stopping.

`objective="dense"` (training/dense.py): a causal user tower, next-item prediction at every position
of windows of each user's training events, full softmax over the catalogue. `objective="in-batch"`:

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
from tqdm import tqdm

from shared.model.features import featurize_items
from shared.model.towers import TwoTowerModel
from shared.progress import progress_bar
from training.dataset import Split, featurize_examples, training_examples
from training.dense import dense_step_loss, training_dropout, window_batch
from training.evaluate import Catalog, ModelScorer, evaluate, selection_score
from training.windows import TARGET_MODES, epoch_windows

logger = logging.getLogger(__name__)

MIN_TEMPERATURE = 0.01  # a collapsing temperature makes logits explode; the clamp keeps them finite
SELECTION_METRIC = "mean of recall@10, recall@50, recall@100, ndcg@10"
OBJECTIVES = ("dense", "in-batch")


@dataclass(frozen=True)
class TrainConfig:
    # Defaults chosen on validation (mean of the four columns) within make train's ~20-epoch budget.
    objective: str = "dense"  # "dense" (causal tower, every position) or "in-batch" (one per positive)
    targets: str = "all"  # dense: predict every next event ("all") or only positive ones
    max_epochs: int = 20  # ~10 s per dense epoch on a quiet 2-core CPU
    patience: int = 5  # epochs without a better validation selection score before stopping
    batch_size: int = 64  # in-batch: examples; dense: windows of history_len events
    learning_rate: float = 1e-3
    weight_decay: float = 0.01  # on dense weights only; embedding tables, norms and biases are exempt
    temperature_init: float = 0.1
    learn_temperature: bool = True
    dropout: float = 0.2  # dense: training-only dropout on tokens and residual branches
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1")
        if self.learning_rate <= 0 or self.temperature_init < MIN_TEMPERATURE or self.weight_decay < 0:
            raise ValueError("TrainConfig: learning_rate > 0, temperature_init >= 0.01, weight_decay >= 0")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig.objective must be one of {OBJECTIVES}")
        if self.targets not in TARGET_MODES:
            raise ValueError(f"TrainConfig.targets must be one of {TARGET_MODES}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("TrainConfig.dropout must be in [0, 1)")

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
    num_examples: int = 0  # dense: windows per epoch; in-batch: (history, positive) examples


class Temperature(nn.Module):
    """τ = exp(log τ), learned in log space so it stays positive; clamped at MIN_TEMPERATURE."""

    def __init__(self, init: float, learn: bool = True) -> None:
        super().__init__()
        self.log_tau = nn.Parameter(torch.tensor(math.log(init)), requires_grad=learn)

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
    bar: tqdm | None = None,
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
        total, steps = total + _optimizer_step(optimizer, loss, cfg.grad_clip), steps + 1
        if bar is not None:
            bar.set_postfix_str(f"loss {total / steps:.4f}", refresh=False)
            bar.update()
    model.eval()
    return total / max(steps, 1)


def _optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> float:
    """Backward, clip the gradient norm, step; returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    return loss.item()


def dense_train_steps(
    model: TwoTowerModel,
    split: Split,
    catalog: Catalog,
    temperature: Temperature,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    rng: np.random.Generator,
    bar: tqdm | None = None,
) -> float:
    """One epoch of the dense objective over shuffled, randomly offset windows; returns the mean loss."""
    windows = epoch_windows(split, model.config.history_len, rng)
    windows = [windows[i] for i in rng.permutation(len(windows))]
    items = featurize_items(catalog.post_ids, np.zeros_like(catalog.post_ids), model.config)
    model.train()
    total, steps = 0.0, 0
    with training_dropout(model, cfg.dropout):
        for start in range(0, len(windows), cfg.batch_size):
            features, rows = window_batch(
                split, windows[start : start + cfg.batch_size], model, catalog, cfg.targets
            )
            if not (rows >= 0).any():
                continue
            loss = dense_step_loss(model, features, rows, items, temperature())
            total, steps = total + _optimizer_step(optimizer, loss, cfg.grad_clip), steps + 1
            if bar is not None:
                bar.set_postfix_str(f"loss {total / steps:.4f}", refresh=False)
                bar.update()
    model.eval()
    return total / max(steps, 1)


def train(
    model: TwoTowerModel, split: Split, catalog: Catalog, cfg: TrainConfig, progress: bool = True
) -> TrainResult:
    """Train from a seeded initialisation; leaves `model` at the epoch with the best validation score."""
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    model.reset_parameters(torch.Generator().manual_seed(cfg.seed))
    rng = np.random.default_rng(cfg.seed)
    dense = cfg.objective == "dense"
    if dense and not model.config.causal:
        raise ValueError("the dense objective needs a causal user tower (TowerConfig.causal=True)")
    examples = training_examples(split)
    if len(examples) < 2:
        raise ValueError("fewer than 2 training examples: nothing to train on")
    log_q = target_log_q(split, examples, catalog)
    temperature = Temperature(cfg.temperature_init, cfg.learn_temperature)
    groups = param_groups(model, cfg.weight_decay)
    groups[1]["params"].append(temperature.log_tau)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    if dense:
        num_windows = len(epoch_windows(split, model.config.history_len, None))
        steps_per_epoch = math.ceil(num_windows / cfg.batch_size)
        logger.info("dense training on %d windows, %d steps per epoch", num_windows, steps_per_epoch)
    else:
        num_windows = 0
        steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
        logger.info("training on %d examples, %d steps per epoch", len(examples), steps_per_epoch)

    result = TrainResult(
        best_epoch=0, best_validation={}, num_examples=num_windows if dense else len(examples)
    )
    best_state, best_score, stale = None, -1.0, 0
    for epoch in range(1, cfg.max_epochs + 1):
        epoch_start = time.monotonic()
        desc = f"epoch {epoch:>2}/{cfg.max_epochs}"
        bar = progress_bar(steps_per_epoch, desc, unit="step", logger=logger, disable=not progress)
        if dense:
            loss = dense_train_steps(model, split, catalog, temperature, optimizer, cfg, rng, bar)
        else:
            order = examples[rng.permutation(len(examples))]
            loss = train_steps(model, split, order, log_q, catalog, temperature, optimizer, cfg, bar)
        validation = evaluate(ModelScorer(model, catalog), split, split.validation, catalog)
        tau, score = temperature().item(), selection_score(validation)
        bar.set_postfix_str(
            f"loss {loss:.4f} tau {tau:.3f} val R@10 {validation['recall@10']:.4f} "
            f"R@50 {validation['recall@50']:.4f} NDCG@10 {validation['ndcg@10']:.4f}",
            refresh=False,
        )
        bar.close()
        result.epochs.append(EpochLog(epoch, loss, tau, validation, time.monotonic() - epoch_start))
        if score > best_score:
            best_score, stale = score, 0
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
