"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019), a baseline.

X [U, N] binary user-item matrix of the training events. With P = (XᵀX + λI)⁻¹, the item-item weights
B = I − P / diag(P) (column j divided by P_jj) have a zero diagonal and minimise ‖X − XB‖² + λ‖B‖²
under diag(B) = 0, in closed form. A user's scores are x_u B for x_u the user's whole history
(multi-hot), ranked through the same exact top-k as every other model. λ is chosen on validation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from training.dataset import EvalCase, Split, training_interactions
from training.evaluate import Catalog, evaluate, selection_score

# Validation peaks at 300 on MovieLens-100K (50 ... 3,000 scanned); the grid brackets it cheaply.
EASE_LAMBDAS = (100.0, 200.0, 300.0, 500.0, 1_000.0)


def ease_weights(x: np.ndarray, lam: float) -> np.ndarray:
    """x [U, N] binary -> B [N, N] with a zero diagonal (float64 for the inverse, float32 out)."""
    if lam <= 0:
        raise ValueError(f"EASE needs lambda > 0, got {lam}")
    gram = x.T.astype(np.float64) @ x.astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]  # B_ij = -P_ij / P_jj
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32)


def interaction_matrix(split: Split, catalog: Catalog) -> np.ndarray:
    users, posts = training_interactions(split)
    x = np.zeros((len(split.timelines), len(catalog.post_ids)), dtype=np.float32)
    x[users, catalog.rows(posts)] = 1.0
    return x


class EASEScorer:
    name = "EASE"

    def __init__(self, split: Split, catalog: Catalog, lam: float, x: np.ndarray | None = None) -> None:
        self.catalog, self.lam = catalog, lam
        b = ease_weights(interaction_matrix(split, catalog) if x is None else x, lam)
        self._corpus = torch.from_numpy(np.ascontiguousarray(b.T))  # scores = x @ B = x @ (Bᵀ)ᵀ

    def corpus(self) -> torch.Tensor:
        return self._corpus

    def users(self, split: Split, cases: Sequence[EvalCase]) -> torch.Tensor:
        out = torch.zeros(len(cases), len(self.catalog.post_ids))
        for b, c in enumerate(cases):
            out[b, self.catalog.rows(split.timelines[c.user].post_ids[: c.cut])] = 1.0
        return out


def select_ease(
    split: Split, catalog: Catalog, lambdas: Sequence[float] = EASE_LAMBDAS
) -> tuple[EASEScorer, dict[float, float]]:
    """The λ with the best validation selection score, and every λ's score."""
    x = interaction_matrix(split, catalog)
    scores, best = {}, None
    for lam in lambdas:
        scorer = EASEScorer(split, catalog, lam, x)
        scores[lam] = selection_score(evaluate(scorer, split, split.validation, catalog))
        if best is None or scores[lam] > scores[best.lam]:
            best = scorer
    return best, scores
