"""Transformer building blocks of the user tower (Grok-1 / Phoenix style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.model.config import TowerConfig


def rotary_tables(seq_len: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin tables for rotary position embeddings: [T, head_dim] each, float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # [T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, hd]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hd/2) of x [B, H, T, hd] by position-dependent angles (computed in fp32)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions, soft-capped logits and a key padding mask."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.emb_dim, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_q_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_q_heads * hd, d, bias=False)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, rope: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        # x: [B, T, D]; key_mask: [B, T] bool (True = valid position)
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, cfg.num_q_heads, cfg.head_dim).transpose(1, 2)  # [B, Hq, T, hd]
        k = self.k_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        group = cfg.num_q_heads // cfg.num_kv_heads
        if group > 1:  # each kv head serves `group` query heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)

        logits = (
            torch.matmul(q.float(), k.float().transpose(-1, -2)) * cfg.attn_logit_multiplier
        )  # [B,Hq,T,T]
        logits = cfg.attn_logit_cap * torch.tanh(logits / cfg.attn_logit_cap)
        allowed = key_mask[:, None, None, :]  # [B, 1, 1, T]
        if cfg.causal:
            allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        logits = logits.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(logits, dim=-1).to(v.dtype)  # every row has a valid key: the user token
        out = torch.matmul(weights, v)  # [B, Hq, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, cfg.num_q_heads * cfg.head_dim))


class GeGLU(nn.Module):
    """Gated feed-forward: W_out(gelu(W_gate x) * W_in x)."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.emb_dim, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.emb_dim, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """A "sandwich" block: RMSNorm before and after both attention and the feed-forward."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.attn_in_norm = nn.RMSNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.attn_out_norm = nn.RMSNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.ffn_in_norm = nn.RMSNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.ffn = GeGLU(cfg)
        self.ffn_out_norm = nn.RMSNorm(cfg.emb_dim, eps=cfg.norm_eps)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, rope: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        x = x + self.attn_out_norm(self.attn(self.attn_in_norm(x), key_mask, rope))
        return x + self.ffn_out_norm(self.ffn(self.ffn_in_norm(x)))
