"""The dense objective: next-item prediction at every history position, full softmax over the catalogue.

With causal attention the user tower's output at position t depends on positions <= t only, so the
masked mean of its outputs over [0, t] (user token included) is exactly the embedding the served tower
returns for the history cut after event t (`UserTower.hidden_states`). One forward pass over a window
of S events thus yields S + 1 served user embeddings, each scored against the candidate tower's
embeddings of every movie (1,682 of them: a full softmax is cheaper than sampling here, and it has no
sampling bias to correct):

    logits[b, t, j] = cos(u_{b,t}, c_j) / τ,   loss = cross-entropy(logits[b, t], target_{b,t})

averaged over the supervised positions. Both towers get gradients from every movie at every step.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.model.features import ItemFeatures, UserFeatures, featurize_users
from shared.model.towers import TwoTowerModel
from training.dataset import Split
from training.evaluate import Catalog
from training.windows import Window, window_context, window_targets


def prefix_embeddings(model: TwoTowerModel, features: UserFeatures) -> torch.Tensor:
    """[B, 1+S, D] unit-norm user embeddings of every prefix (position t: user token + events < t+1).

    Equals `model.encode_users` of each prefix only for a causal tower; the caller checks that.
    """
    x, valid = model.user_tower.hidden_states(model.tables, features)  # [B, 1+S, D], [B, 1+S]
    w = valid.to(x.dtype).unsqueeze(-1)
    running = (x * w).cumsum(dim=1) / w.cumsum(dim=1)  # masked mean over positions <= t
    return F.normalize(running.float(), dim=-1, eps=1e-12)


def dense_softmax_loss(
    users: torch.Tensor, corpus: torch.Tensor, target_rows: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """users [B, T, D], corpus [N, D] (both unit norm), target_rows [B, T] corpus row or -1 (none)."""
    supervised = target_rows >= 0
    logits = (users[supervised] / temperature) @ corpus.T  # [M, N]; scaling [M, D] is cheaper than [M, N]
    return F.cross_entropy(logits, target_rows[supervised])


def window_batch(
    split: Split, windows: list[Window], model: TwoTowerModel, catalog: Catalog, mode: str
) -> tuple[UserFeatures, torch.Tensor]:
    """Model inputs for a batch of windows and the corpus row each position predicts ([B, 1+S], -1 none)."""
    cfg = model.config
    features = featurize_users([window_context(split, w, cfg.num_user_features) for w in windows], cfg)
    posts = window_targets(split, windows, cfg.history_len, mode)
    rows = np.full(posts.shape, -1, dtype=np.int64)
    has = posts > 0
    rows[has] = catalog.rows(posts[has])
    return features, torch.from_numpy(rows)


def dense_step_loss(
    model: TwoTowerModel,
    features: UserFeatures,
    target_rows: torch.Tensor,
    items: ItemFeatures,
    temperature: torch.Tensor,
) -> torch.Tensor:
    return dense_softmax_loss(
        prefix_embeddings(model, features), model.encode_items(items), target_rows, temperature
    )


@contextmanager
def training_dropout(model: TwoTowerModel, p: float):
    """Dropout on the user tower's token embeddings and on each attention / feed-forward output,
    active only while the model is in training mode. Forward hooks, so the module tree, the weights and
    the checkpoint stay exactly Phoenix's (serving never sees them: the hooks are removed on exit)."""
    if p <= 0:
        yield
        return
    tower = model.user_tower
    targets: list[nn.Module] = [tower.user_proj, tower.history_proj]
    for block in tower.blocks:
        targets += [block.attn, block.ffn]

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p, training=module.training)

    handles = [m.register_forward_hook(hook) for m in targets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
