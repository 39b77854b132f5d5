import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.model.checkpoint import random_model
from shared.model.config import TowerConfig
from shared.model.features import ItemFeatures, UserContext, featurize_items, featurize_users
from shared.model.layers import rotary_tables
from tests.conftest import TINY


def _user(user_id=7, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return UserContext.build(
        user_id,
        post_ids=rng.integers(1, 10_000, n).tolist(),
        author_ids=rng.integers(0, 500, n).tolist(),
        actions=[rng.choice(19, size=rng.integers(0, 3), replace=False).tolist() for _ in range(n)],
        surfaces=rng.integers(0, 16, n).tolist(),
    )


def _pad_history(f, extra):
    """Append `extra` padding positions to every history tensor."""

    def pad(t, value=0):
        shape = list(t.shape)
        shape[1] = extra
        return torch.cat([t, torch.full(shape, value, dtype=t.dtype)], dim=1)

    f.history_post_hashes = pad(f.history_post_hashes)
    f.history_author_hashes = pad(f.history_author_hashes)
    f.history_actions = pad(f.history_actions)
    f.history_surfaces = pad(f.history_surfaces)
    f.history_mask = pad(f.history_mask, False)
    return f


def test_action_embedding_is_signed_and_zero_without_action(tiny_model):
    tower = tiny_model.user_tower
    a = torch.zeros(1, 2, 19)
    a[0, 0, [0, 4]] = 1.0  # favorite + click; position 1 has no action
    out = tower.action_embedding(a)
    signed = torch.full((19,), -1.0)
    signed[[0, 4]] = 1.0
    torch.testing.assert_close(out[0, 0], tower.action_proj.weight @ signed)
    assert torch.equal(out[0, 1], torch.zeros(16))


@pytest.mark.parametrize("causal", [False, True])
def test_user_embedding_ignores_appended_padding(causal):
    model = random_model(TowerConfig(**TINY, causal=causal), seed=1)
    f = featurize_users([_user(n=3), _user(user_id=9, n=0)], model.config)
    with torch.inference_mode():
        base = model.encode_users(f)
        padded = model.encode_users(_pad_history(f, extra=5))
    torch.testing.assert_close(base, padded, atol=1e-6, rtol=0)


def test_changed_history_token_changes_embedding(tiny_model):
    ctx = _user(n=4)
    changed = UserContext.build(
        ctx.user_id, ctx.post_ids.tolist(), ctx.author_ids.tolist(),
        [np.flatnonzero(r).tolist() for r in ctx.actions[:-1]] + [[3]], ctx.surfaces.tolist(),
    )  # fmt: skip
    with torch.inference_mode():
        a, b = tiny_model.encode_users(featurize_users([ctx, changed], tiny_model.config))
    assert not torch.allclose(a, b, atol=1e-4)


def test_user_tower_keeps_last_s_events_left_aligned(tiny_config):
    n = tiny_config.history_len + 3
    ctx = UserContext.build(1, post_ids=list(range(1, n + 1)))
    f = featurize_users([ctx, UserContext.build(2, post_ids=[5, 6])], tiny_config)
    kept = featurize_users([UserContext.build(1, post_ids=list(range(4, n + 1)))], tiny_config)
    assert torch.equal(f.history_post_hashes[0], kept.history_post_hashes[0])
    assert f.history_mask[1].tolist() == [True, True] + [False] * (tiny_config.history_len - 2)


def test_outputs_have_unit_norm(tiny_model):
    users = featurize_users([_user(seed=s, n=s) for s in range(4)], tiny_model.config)
    items = featurize_items(np.arange(1, 51), np.arange(50) % 7, tiny_model.config)
    with torch.inference_mode():
        u, c = tiny_model.encode_users(users), tiny_model.encode_items(items)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(c.norm(dim=-1), torch.ones(50))


def test_padded_author_hash_contributes_nothing(tiny_model):
    f = featurize_items(np.array([11, 11]), np.array([0, 3]), tiny_model.config)
    # replace the author rows of item 0's padding row with garbage: the output must not move
    with torch.inference_mode():
        before = tiny_model.encode_items(f)
        tiny_model.tables.author.weight[0].fill_(123.0)
        after = tiny_model.encode_items(f)
    torch.testing.assert_close(before[0], after[0])
    half = ItemFeatures(f.post_hashes, f.author_hashes.clone())
    half.author_hashes[1, 1] = 0  # one of the two author hashes padded: it still changes the output
    with torch.inference_mode():
        assert not torch.allclose(tiny_model.encode_items(half)[1], after[1])


def test_candidate_tower_equals_by_hand(tiny_model):
    cfg = tiny_model.config
    f = featurize_items(np.array([5, 6]), np.array([2, 0]), cfg)
    t = tiny_model.tables
    rows = []
    for i in range(2):
        parts = [t.post.weight[h] if h else torch.zeros(cfg.emb_dim) for h in f.post_hashes[i].tolist()]
        parts += [t.author.weight[h] if h else torch.zeros(cfg.emb_dim) for h in f.author_hashes[i].tolist()]
        x = torch.cat(parts)  # [4D]
        h = tiny_model.candidate_tower.proj_in.weight @ x
        h = h * torch.sigmoid(h)  # SiLU
        y = tiny_model.candidate_tower.proj_out.weight @ h
        rows.append(y / y.norm())
    with torch.inference_mode():
        torch.testing.assert_close(tiny_model.encode_items(f), torch.stack(rows), atol=1e-6, rtol=1e-5)


def test_user_tower_pools_user_token_and_normalises(tiny_model):
    # With no history, the embedding is the normalised final-normed user token alone.
    f = featurize_users([UserContext.build(3)], tiny_model.config)
    tower, tables = tiny_model.user_tower, tiny_model.tables
    with torch.inference_mode():
        x = tower.user_proj(tables.user(f.user_hashes)).unsqueeze(1)
        x = torch.cat([x, torch.zeros(1, tiny_model.config.history_len, 16)], dim=1)
        valid = torch.zeros(1, x.shape[1], dtype=torch.bool)
        valid[0, 0] = True
        rope = rotary_tables(x.shape[1], 8, tiny_model.config.rope_base, x.device)
        for block in tower.blocks:
            x = block(x, valid, rope)
        want = F.normalize(tower.final_norm(x)[:, 0], dim=-1)
        torch.testing.assert_close(tiny_model.encode_users(f), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_attention_equals_by_hand_gqa_rope_softcap(tiny_config, scale):
    # scale=300 pushes logits far past the cap of 30, where the soft cap changes the result.
    model = random_model(tiny_config, seed=0)
    attn = model.user_tower.blocks[0].attn
    with torch.no_grad():
        attn.q_proj.weight.mul_(scale)
        attn.k_proj.weight.mul_(scale)
    cfg = tiny_config
    t, hd = 5, cfg.head_dim
    x = torch.randn(1, t, cfg.emb_dim, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[True, True, True, False, False]])
    rope = rotary_tables(t, hd, cfg.rope_base, x.device)
    with torch.inference_mode():
        got = attn(x, mask, rope)
        q = (x @ attn.q_proj.weight.T).view(t, cfg.num_q_heads, hd)
        k = (x @ attn.k_proj.weight.T).view(t, cfg.num_kv_heads, hd)
        v = (x @ attn.v_proj.weight.T).view(t, cfg.num_kv_heads, hd)
        pos = torch.arange(t, dtype=torch.float32)[:, None]
        freq = 1.0 / cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = pos * freq  # [t, hd/2]

        def rot(z):  # rotate pairs (i, i + hd/2)
            a, b = z[..., : hd // 2], z[..., hd // 2 :]
            c, s = ang.cos()[:, None], ang.sin()[:, None]
            return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

        q, k = rot(q), rot(k)
        heads = []
        for h in range(cfg.num_q_heads):
            kv = h // (cfg.num_q_heads // cfg.num_kv_heads)  # grouped-query: shared kv head
            logits = (q[:, h] @ k[:, kv].T) * cfg.attn_logit_multiplier
            logits = 30.0 * torch.tanh(logits / 30.0)
            logits[:, ~mask[0]] = float("-inf")
            heads.append(torch.softmax(logits, dim=-1) @ v[:, kv])
        want = torch.cat(heads, dim=-1) @ attn.o_proj.weight.T
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TowerConfig(num_q_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="unknown TowerConfig fields"):
        TowerConfig.from_dict({"emb_dimm": 3})
    assert TowerConfig().ffn_dim == 176  # Grok-1's ffn_size(128, 2)


def test_default_parameter_count():
    model = random_model(TowerConfig(), seed=0)
    assert model.num_parameters() == 34_121_472
