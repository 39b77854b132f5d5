"""The two towers and the hash-embedding tables they share.

Shapes: B users, S history positions, N items, D = emb_dim, H* = hashes per id, A = actions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shared.model.config import TowerConfig
from shared.model.features import ItemFeatures, UserFeatures
from shared.model.layers import Block, rotary_tables


class HashEmbedding(nn.Module):
    """One hash-embedding table. Row 0 is padding: a hash of 0 always yields a zero vector."""

    def __init__(self, num_rows: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_rows, dim))

    def forward(self, hashes: torch.Tensor) -> torch.Tensor:
        # hashes: [..., H] int64 -> [..., H * D], the H embeddings concatenated (never summed)
        emb = F.embedding(hashes, self.weight) * (hashes != 0).unsqueeze(-1).to(self.weight.dtype)
        return emb.flatten(-2)


class EmbeddingTables(nn.Module):
    """Tables shared by both towers: post and author rows serve history tokens and candidates alike."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.user = HashEmbedding(cfg.user_vocab_size, cfg.emb_dim)
        self.post = HashEmbedding(cfg.post_vocab_size, cfg.emb_dim)
        self.author = HashEmbedding(cfg.author_vocab_size, cfg.emb_dim)
        self.user_feature = (
            HashEmbedding(cfg.user_feature_vocab_size, cfg.emb_dim) if cfg.num_user_features else None
        )


class UserTower(nn.Module):
    """[user token; S history tokens] -> transformer -> RMSNorm -> masked mean -> L2 normalise."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.emb_dim
        user_width = cfg.num_user_hashes * d * (1 + cfg.num_user_features)
        self.user_proj = nn.Linear(user_width, d)
        # The action vector a in {0,1}^A enters as 2a - 1 in {-1,+1}^A, projected without bias.
        self.action_proj = nn.Linear(cfg.num_actions, d, bias=False)
        self.surface_emb = nn.Embedding(cfg.num_product_surfaces, d)
        history_width = (cfg.num_item_hashes + cfg.num_author_hashes + 2) * d  # post, author, action, surface
        self.history_proj = nn.Linear(history_width, d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.RMSNorm(d, eps=cfg.norm_eps)

    def action_embedding(self, actions: torch.Tensor) -> torch.Tensor:
        # actions: [B, S, A] in {0, 1} -> [B, S, D]; a position with no action at all is exactly zero
        signed = actions * 2 - 1
        any_action = actions.amax(dim=-1, keepdim=True) > 0
        return self.action_proj(signed) * any_action.to(signed.dtype)

    def forward(self, tables: EmbeddingTables, f: UserFeatures) -> torch.Tensor:
        return self.encode_rows(*self.lookup(tables, f), *history_inputs(f))

    def lookup(self, tables: EmbeddingTables, f: UserFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """The hash-embedding rows of a batch: the user's [B, (1+F)*Hu*D] and the history's
        [B, S, (Hi+Ha)*D]. The only part of the tower that reads the (large, shared) tables; what
        follows (`encode_rows`) holds only the tower's own small weights, so it can run elsewhere
        (user_service exports it to ONNX Runtime) without a copy of the tables."""
        user_parts = [tables.user(f.user_hashes)]  # [B, Hu*D]
        if tables.user_feature is not None:
            user_parts.append(tables.user_feature(f.user_feature_hashes).flatten(-2))  # [B, F*Hu*D]
        post_author = [tables.post(f.history_post_hashes), tables.author(f.history_author_hashes)]
        return torch.cat(user_parts, dim=-1), torch.cat(post_author, dim=-1)

    def encode_rows(
        self, user_rows: torch.Tensor, history_rows: torch.Tensor, actions: torch.Tensor,
        surfaces: torch.Tensor, mask: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """`lookup`'s rows and the history's actions [B, S, A], surfaces [B, S] and mask [B, S] ->
        [B, D] unit-norm embeddings."""
        x, valid = self.hidden_states_of_rows(user_rows, history_rows, actions, surfaces, mask)
        weights = valid.to(x.dtype).unsqueeze(-1)  # [B, 1+S, 1]
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1)  # [B, D]: user token included
        return F.normalize(pooled.float(), dim=-1, eps=1e-12).to(x.dtype)

    def hidden_states(self, tables: EmbeddingTables, f: UserFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """The final-normed sequence before pooling: x [B, 1+S, D] and its validity mask [B, 1+S].

        With causal attention, x[:, t] depends on positions <= t only, so the mean of x[:, : t + 1]
        over valid positions is exactly what `forward` returns for the history cut after event t:
        training reads every prefix's embedding from one pass (dense next-item supervision).
        """
        return self.hidden_states_of_rows(*self.lookup(tables, f), *history_inputs(f))

    def hidden_states_of_rows(
        self, user_rows: torch.Tensor, history_rows: torch.Tensor, actions: torch.Tensor,
        surfaces: torch.Tensor, mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        dtype = self.user_proj.weight.dtype
        user_token = self.user_proj(user_rows).unsqueeze(1)  # [B, 1, D]
        history = torch.cat(
            [
                history_rows,  # [B, S, (Hi+Ha)*D]: post, author
                self.action_embedding(actions.to(dtype)),  # [B, S, D]
                self.surface_emb(surfaces),  # [B, S, D]
            ],
            dim=-1,
        )
        history_tokens = self.history_proj(history)  # [B, S, D]

        x = torch.cat([user_token, history_tokens], dim=1)  # [B, 1+S, D]
        valid = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # [B, 1+S]
        rope = rotary_tables(x.shape[1], self.cfg.head_dim, self.cfg.rope_base, x.device)
        for block in self.blocks:
            x = block(x, valid, rope)
        return self.final_norm(x), valid


def history_inputs(f: UserFeatures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `encode_rows` takes from the features besides `lookup`'s rows: actions, surfaces, mask."""
    return f.history_actions, f.history_surfaces, f.history_mask


class CandidateTower(nn.Module):
    """concat[post hashes, author hashes] (4D) -> Linear 2D -> SiLU -> Linear D -> L2 normalise."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        d = cfg.emb_dim
        self.proj_in = nn.Linear((cfg.num_item_hashes + cfg.num_author_hashes) * d, 2 * d, bias=False)
        self.proj_out = nn.Linear(2 * d, d, bias=False)

    def forward(self, tables: EmbeddingTables, f: ItemFeatures) -> torch.Tensor:
        # Padded hashes (e.g. an unknown author) contribute exactly zero: HashEmbedding masks them.
        x = torch.cat([tables.post(f.post_hashes), tables.author(f.author_hashes)], dim=-1)  # [N, 4D]
        x = self.proj_out(F.silu(self.proj_in(x)))  # [N, D]
        return F.normalize(x.float(), dim=-1, eps=1e-12).to(x.dtype)


class TwoTowerModel(nn.Module):
    """Both towers over one set of tables: one checkpoint, loaded by both services."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tables = EmbeddingTables(cfg)
        self.user_tower = UserTower(cfg)
        self.candidate_tower = CandidateTower(cfg)

    def encode_users(self, features: UserFeatures) -> torch.Tensor:
        return self.user_tower(self.tables, features)  # [B, D], unit norm

    def encode_items(self, features: ItemFeatures) -> torch.Tensor:
        return self.candidate_tower(self.tables, features)  # [N, D], unit norm

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Explicit initialisation (never zeros): normal(0, init_std) weights, residual outputs scaled
        down by 1/sqrt(2 * num_layers) as in GPT-2, unit RMSNorm scales, zero biases."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name:
                param.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down.weight")):
                param.normal_(0.0, std / math.sqrt(2 * self.config.num_layers), generator=generator)
            else:
                param.normal_(0.0, std, generator=generator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
