"""Evaluation: the two-tower model and two baselines, ranked by one exact top-k, same protocol.

Every scorer is "user vectors [B, D] against corpus vectors [N, D]": for the model those are the tower
embeddings (exactly what the services compute), for popularity a constant user against item counts, for
item-kNN the user's last 10 items (multi-hot) against the item-item cosine matrix. All of them go through
`top_k`, the same matmul + mask + top-k the gateway runs, so the numbers describe what serving returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from retrieval_gateway.topk import exact_topk
from shared.model.features import featurize_items, featurize_users
from shared.model.towers import TwoTowerModel
from training.dataset import EvalCase, Split, training_interactions

EVAL_KS = (10, 50, 100)
NDCG_K = 10
KNN_LAST_ITEMS = 10  # item-kNN scores from the user's last 10 history items
EVAL_BATCH = 256


def top_k(users: torch.Tensor, corpus: torch.Tensor, k: int, exclude: torch.Tensor) -> torch.Tensor:
    """Exact top-k rows of corpus for each user: scores = users @ corpusᵀ, excluded rows never returned.

    users [B, D], corpus [N, D], exclude [B, N] bool -> indices [B, k] into corpus, best first (-1 where
    fewer than k rows are eligible). The one place that ranks, and it is the gateway's own exact top-k,
    so the reported metrics describe what the service returns (ties: ascending row).
    """
    query_index, rows = exclude.nonzero(as_tuple=True)
    _, top = exact_topk(users, corpus, k, exclude=(query_index, rows))
    return top


def target_ranks(top: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target in its row of `top` [B, K]; -1 when it is not there."""
    hits = top == targets[:, None]  # [B, K]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), -1)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """One target per user: recall@k is the fraction of users whose target ranks in the first k."""
    return float(np.mean((ranks >= 0) & (ranks < k))) if len(ranks) else 0.0


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """One relevant item: DCG = 1 / log2(rank + 2) inside the first k, and the ideal DCG is 1."""
    if not len(ranks):
        return 0.0
    found = (ranks >= 0) & (ranks < k)
    gains = np.where(found, 1.0 / np.log2(np.where(found, ranks, 0) + 2.0), 0.0)
    return float(np.mean(gains))


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    out = {f"recall@{k}": recall_at_k(ranks, k) for k in EVAL_KS}
    out[f"ndcg@{NDCG_K}"] = ndcg_at_k(ranks, NDCG_K)
    return out


def selection_score(metrics: dict[str, float]) -> float:
    """What early stopping and every validation choice maximise: the four reported columns, equally."""
    return float(np.mean([metrics[f"recall@{k}"] for k in EVAL_KS] + [metrics[f"ndcg@{NDCG_K}"]]))


@dataclass(frozen=True)
class Catalog:
    """The ranked corpus: every movie, row i <-> post_ids[i] (sorted)."""

    post_ids: np.ndarray  # [N] int64, sorted, unique

    def rows(self, post_ids: np.ndarray) -> np.ndarray:
        missing = post_ids[~np.isin(post_ids, self.post_ids)]
        if missing.size:
            raise ValueError(f"post id {int(missing[0])} is not in the catalog")
        return np.searchsorted(self.post_ids, post_ids)


class Scorer(Protocol):
    name: str

    def corpus(self) -> torch.Tensor: ...  # [N, D]

    def users(self, split: Split, cases: Sequence[EvalCase]) -> torch.Tensor: ...  # [B, D]


def evaluate(scorer: Scorer, split: Split, cases: Sequence[EvalCase], catalog: Catalog) -> dict[str, float]:
    k = max(EVAL_KS)
    corpus = scorer.corpus()
    ranks = []
    for start in range(0, len(cases), EVAL_BATCH):
        batch = cases[start : start + EVAL_BATCH]
        exclude = torch.zeros(len(batch), len(catalog.post_ids), dtype=torch.bool)
        for b, case in enumerate(batch):  # rank all movies except those in the history
            exclude[b, catalog.rows(split.timelines[case.user].post_ids[: case.cut])] = True
        top = top_k(scorer.users(split, batch), corpus, k, exclude).numpy()
        targets = catalog.rows(np.asarray([c.target for c in batch], dtype=np.int64))
        ranks.append(target_ranks(top, targets))
    return metrics_from_ranks(np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64))


class ModelScorer:
    """The serving path: candidate tower over the whole catalog, user tower over the history."""

    name = "two-tower"

    def __init__(self, model: TwoTowerModel, catalog: Catalog) -> None:
        self.model, self.catalog = model, catalog

    def corpus(self) -> torch.Tensor:
        cfg = self.model.config
        items = featurize_items(self.catalog.post_ids, np.zeros_like(self.catalog.post_ids), cfg)
        with torch.inference_mode():
            return self.model.encode_items(items)

    def users(self, split: Split, cases: Sequence[EvalCase]) -> torch.Tensor:
        cfg = self.model.config
        contexts = [split.timelines[c.user].context(c.cut, cfg.num_user_features) for c in cases]
        with torch.inference_mode():
            return self.model.encode_users(featurize_users(contexts, cfg))


class PopularityScorer:
    """Every user gets the most-interacted movies of the training events."""

    name = "popularity"

    def __init__(self, split: Split, catalog: Catalog) -> None:
        _, posts = training_interactions(split)
        counts = np.bincount(catalog.rows(posts), minlength=len(catalog.post_ids))
        self._corpus = torch.from_numpy(counts.astype(np.float32))[:, None]  # [N, 1]

    def corpus(self) -> torch.Tensor:
        return self._corpus

    def users(self, split: Split, cases: Sequence[EvalCase]) -> torch.Tensor:
        return torch.ones(len(cases), 1)


class ItemKNNScorer:
    """Cosine similarity over co-occurrence in the training events, summed over the last 10 items."""

    name = "item-kNN"

    def __init__(self, split: Split, catalog: Catalog) -> None:
        self.catalog = catalog
        users, posts = training_interactions(split)
        n = len(catalog.post_ids)
        x = torch.zeros(len(split.timelines), n)  # [U, N] binary: user interacted with item
        x[torch.from_numpy(users), torch.from_numpy(catalog.rows(posts))] = 1.0
        co = x.T @ x  # [N, N] co-occurrence counts
        norms = co.diagonal().sqrt().clamp_min(1e-12)
        sim = co / norms[:, None] / norms[None, :]
        sim.fill_diagonal_(0.0)
        self._corpus = sim  # symmetric, so users @ simᵀ = users @ sim

    def corpus(self) -> torch.Tensor:
        return self._corpus

    def users(self, split: Split, cases: Sequence[EvalCase]) -> torch.Tensor:
        out = torch.zeros(len(cases), len(self.catalog.post_ids))
        for b, c in enumerate(cases):
            recent = split.timelines[c.user].post_ids[max(0, c.cut - KNN_LAST_ITEMS) : c.cut]
            out[b, self.catalog.rows(recent)] = 1.0
        return out


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """results[split][scorer] -> metrics; one row per (split, scorer)."""
    names = [f"recall@{k}" for k in EVAL_KS] + [f"ndcg@{NDCG_K}"]
    lines = [f"{'split':<11}{'model':<12}" + "".join(f"{n:>11}" for n in names)]
    for split_name, by_scorer in results.items():
        for scorer, metrics in by_scorer.items():
            lines.append(f"{split_name:<11}{scorer:<12}" + "".join(f"{metrics[n]:>11.4f}" for n in names))
    return "\n".join(lines)


def format_spread_table(spreads: dict[str, dict[str, dict[str, dict[str, float]]]]) -> str:
    """spreads[split][scorer][metric] -> {"mean", "std"}; one row per (split, scorer)."""
    names = [f"recall@{k}" for k in EVAL_KS] + [f"ndcg@{NDCG_K}"]
    lines = [f"{'split':<11}{'model':<12}" + "".join(f"{n:>18}" for n in names)]
    for split_name, by_scorer in spreads.items():
        for scorer, metrics in by_scorer.items():
            cells = "".join(f"{metrics[n]['mean']:>10.4f} ± {metrics[n]['std']:.4f}" for n in names)
            lines.append(f"{split_name:<11}{scorer:<12}" + cells)
    return "\n".join(lines)
