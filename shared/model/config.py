"""The one configuration dataclass of the model. Defaults follow Phoenix's retrieval demo."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TowerConfig:
    emb_dim: int = 128  # D: width of every embedding and of the transformer
    history_len: int = 32  # S: engagements kept per user (the last S)

    # Hash embeddings: each id maps to this many hashes into its table (0 = padding row).
    num_user_hashes: int = 2
    num_item_hashes: int = 2
    num_author_hashes: int = 2
    user_vocab_size: int = 65_536
    post_vocab_size: int = 131_072
    author_vocab_size: int = 65_536
    # Optional categorical user features joined to the user token (e.g. demographics).
    num_user_features: int = 0
    user_feature_vocab_size: int = 1_024

    num_actions: int = 19  # multi-hot engagement actions (shared/model/actions.py)
    num_product_surfaces: int = 16

    # Transformer (Grok-1 style, as in Phoenix).
    num_layers: int = 2
    num_q_heads: int = 2
    num_kv_heads: int = 2  # grouped-query attention: each kv head serves num_q_heads / num_kv_heads
    head_dim: int = 64
    widening_factor: float = 2.0  # GeGLU hidden size derives from it, as in Grok's ffn_size
    attn_logit_multiplier: float = 0.125  # scales q.k (Phoenix's attn_output_multiplier)
    attn_logit_cap: float = 30.0  # logits soft-capped as cap * tanh(x / cap)
    rope_base: float = 10_000.0
    causal: bool = False  # bidirectional attention by default
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        positive = [
            "emb_dim", "history_len", "num_user_hashes", "num_item_hashes", "num_author_hashes",
            "num_actions", "num_product_surfaces", "num_layers", "num_q_heads", "num_kv_heads", "head_dim",
        ]  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TowerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("user_vocab_size", "post_vocab_size", "author_vocab_size", "user_feature_vocab_size"):
            if getattr(self, name) < 2:  # row 0 is padding, so a table needs at least one real row
                raise ValueError(f"TowerConfig.{name} must be >= 2, got {getattr(self, name)}")
        if self.num_user_features < 0:
            raise ValueError("TowerConfig.num_user_features must be >= 0")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError("TowerConfig.num_q_heads must be a multiple of num_kv_heads")
        if self.head_dim % 2:
            raise ValueError("TowerConfig.head_dim must be even (rotary embeddings rotate pairs)")
        if self.attn_logit_cap <= 0 or self.widening_factor <= 0 or self.norm_eps <= 0:
            raise ValueError("TowerConfig: attn_logit_cap, widening_factor and norm_eps must be > 0")

    @property
    def ffn_dim(self) -> int:
        """GeGLU hidden width, as Grok-1 computes it: 2/3 of widening * D, rounded up to a multiple of 8."""
        size = int(self.widening_factor * self.emb_dim) * 2 // 3
        return size + (8 - size) % 8

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TowerConfig:
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown TowerConfig fields: {', '.join(unknown)}")
        return cls(**values)
