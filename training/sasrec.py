"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018), a baseline.

Item-id sequence -> item embedding * sqrt(D) + learned position embedding -> L pre-norm blocks of causal
self-attention and a ReLU feed-forward (dropout on both) -> LayerNorm. The output at position t is
scored against the same item embedding table (tied, as in the paper) with a full softmax over every
movie, and trained to predict event t + 1 at every position (the windows of training/windows.py, the
same training events as the two towers). Evaluation: the output at the last event of the history
(the last `max_len` events before the target), ranked through the same exact top-k as every model.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.progress import progress_bar
from training.dataset import EvalCase, Split
from training.evaluate import Catalog, evaluate, selection_score
from training.windows import TARGET_MODES, Window, epoch_windows, window_targets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SASRecConfig:
    max_len: int = 50  # events of history the model reads (the last max_len)
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    targets: str = "all"
    batch_size: int = 128
    learning_rate: float = 1e-3
    max_epochs: int = 60
    patience: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_len", "dim", "num_layers", "num_heads", "batch_size", "max_epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"SASRecConfig.{name} must be >= 1")
        if self.dim % self.num_heads:
            raise ValueError("SASRecConfig.dim must be a multiple of num_heads")
        if self.targets not in TARGET_MODES:
            raise ValueError(f"SASRecConfig.targets must be one of {TARGET_MODES}")

    def to_dict(self) -> dict:
        return asdict(self)


class SASRecBlock(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.ffn_norm = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.dim), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.dim, cfg.dim)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, L, D]. Pads sit after the events, so a causal mask alone keeps every event's query on
        # events only (pad positions compute garbage that nothing reads).
        b, t, d = x.shape
        q, k, v = (
            self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )
        p = self.drop.p if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # [B, H, L, hd]
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class SASRec(nn.Module):
    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)  # row 0 = padding
        self.position = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "norm" in name:
                    param.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.normal_(
                        0.0,
                        0.02 if param.ndim == 2 and "item" not in name else 1 / math.sqrt(self.cfg.dim),
                        generator=generator,
                    )
            self.item.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, L] item rows + 1 (0 = pad, pads after the events) -> hidden states [B, L, D]."""
        x = self.item(seq) * math.sqrt(self.cfg.dim) + self.position.weight[: seq.shape[1]]
        x = self.drop(x) * (seq > 0).unsqueeze(-1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def item_embeddings(self) -> torch.Tensor:
        return self.item.weight[1:]  # [N, D], row i = catalog row i


def sequences(
    split: Split, catalog: Catalog, spans: Sequence[tuple[int, int, int]], length: int
) -> torch.Tensor:
    """[B, length] catalog rows + 1 of each (user, start, end) span's events, left-aligned, 0-padded."""
    out = np.zeros((len(spans), length), dtype=np.int64)
    for b, (u, start, end) in enumerate(spans):
        posts = split.timelines[u].post_ids[max(start, end - length) : end]
        out[b, : len(posts)] = catalog.rows(posts) + 1
    return torch.from_numpy(out)


def sasrec_loss(model: SASRec, seq: torch.Tensor, target_rows: torch.Tensor) -> torch.Tensor:
    """seq [B, L], target_rows [B, L] catalog row that position t must predict (-1: none)."""
    hidden = model(seq)
    supervised = target_rows >= 0
    logits = hidden[supervised] @ model.item_embeddings().T  # [M, N]
    return F.cross_entropy(logits, target_rows[supervised])


def window_batch(
    split: Split, windows: list[Window], catalog: Catalog, cfg: SASRecConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    seq = sequences(split, catalog, [(w.user, w.start, w.end) for w in windows], cfg.max_len)
    # Column t + 1 of window_targets is what follows the window's first t + 1 events: SASRec's position t.
    posts = window_targets(split, windows, cfg.max_len, cfg.targets)[:, 1:]
    rows = np.full(posts.shape, -1, dtype=np.int64)
    rows[posts > 0] = catalog.rows(posts[posts > 0])
    return seq, torch.from_numpy(rows)


class SASRecScorer:
    name = "SASRec"

    def __init__(self, model: SASRec, catalog: Catalog) -> None:
        self.model, self.catalog = model, catalog

    def corpus(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.item_embeddings().clone()

    def users(self, split: Split, cases: Sequence[EvalCase]) -> torch.Tensor:
        length = self.model.cfg.max_len
        seq = sequences(split, self.catalog, [(c.user, 0, c.cut) for c in cases], length)
        last = (seq > 0).sum(dim=1).clamp_min(1) - 1  # the last event's position
        with torch.inference_mode():
            hidden = self.model(seq)
            return hidden[torch.arange(len(cases)), last]


@dataclass
class SASRecResult:
    best_epoch: int
    best_validation: dict[str, float]
    epochs_run: int
    seconds: float


def train_sasrec(
    split: Split, catalog: Catalog, cfg: SASRecConfig, progress: bool = False
) -> tuple[SASRec, SASRecResult]:
    """Seeded training, early stopping on the validation selection score; returns the best epoch's model."""
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    model = SASRec(len(catalog.post_ids), cfg)
    model.reset_parameters(torch.Generator().manual_seed(cfg.seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.98))
    rng = np.random.default_rng(cfg.seed)
    best_state, best_score, best_epoch, best_val, stale, epoch = None, -1.0, 0, {}, 0, 0
    for epoch in range(1, cfg.max_epochs + 1):
        windows = epoch_windows(split, cfg.max_len, rng)
        windows = [windows[i] for i in rng.permutation(len(windows))]
        bar = progress_bar(
            math.ceil(len(windows) / cfg.batch_size),
            f"SASRec epoch {epoch:>2}/{cfg.max_epochs}",
            unit="step",
            logger=logger,
            disable=not progress,
        )
        model.train()
        total, steps = 0.0, 0
        for start in range(0, len(windows), cfg.batch_size):
            seq, rows = window_batch(split, windows[start : start + cfg.batch_size], catalog, cfg)
            if not (rows >= 0).any():
                continue
            loss = sasrec_loss(model, seq, rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
            bar.set_postfix_str(f"loss {total / steps:.4f}", refresh=False)
            bar.update()
        model.eval()
        validation = evaluate(SASRecScorer(model, catalog), split, split.validation, catalog)
        score = selection_score(validation)
        bar.set_postfix_str(
            f"loss {total / max(steps, 1):.4f} val R@10 {validation['recall@10']:.4f} "
            f"NDCG@10 {validation['ndcg@10']:.4f}",
            refresh=False,
        )
        bar.close()
        if score > best_score:
            best_state, best_score, best_epoch, best_val, stale = (
                copy.deepcopy(model.state_dict()),
                score,
                epoch,
                validation,
                0,
            )
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, SASRecResult(best_epoch, best_val, epoch, time.monotonic() - started)
