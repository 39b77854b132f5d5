"""EASE, SASRec, the dense two-tower objective, its windows and the cached seed runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.model.checkpoint import fingerprint_of
from shared.model.config import TowerConfig
from shared.model.features import featurize_items, featurize_users
from shared.model.towers import TwoTowerModel
from tests.conftest import TINY
from training.data import load_from_dir
from training.dataset import build_timelines, split
from training.dense import dense_step_loss, prefix_embeddings, training_dropout, window_batch
from training.ease import EASEScorer, ease_weights, select_ease
from training.evaluate import Catalog, evaluate
from training.replicates import cached_run, spread
from training.sasrec import SASRec, SASRecConfig, SASRecScorer, sasrec_loss
from training.sasrec import window_batch as sasrec_batch
from training.train import TrainConfig, train
from training.windows import epoch_windows, window_context, window_targets

FIXTURE = Path(__file__).parents[1] / "fixtures" / "synthetic"
CAUSAL = TowerConfig(**TINY, num_user_features=3, user_feature_vocab_size=31, causal=True)


@pytest.fixture(scope="module")
def fixture_split():
    data = load_from_dir(FIXTURE, "synth")
    s = split(build_timelines(data, 19))
    return s, Catalog(np.asarray([m.item_id for m in data.movies]))


def _model(cfg: TowerConfig = CAUSAL, seed: int = 0) -> TwoTowerModel:
    model = TwoTowerModel(cfg)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.eval()


# --- EASE -------------------------------------------------------------------------------------------


def test_ease_columns_are_the_ridge_regressions_of_each_item_on_the_others():
    rng = np.random.default_rng(0)
    x = (rng.random((12, 6)) < 0.4).astype(np.float32)
    lam = 2.5
    b = ease_weights(x, lam)
    for j in range(6):  # column j regresses item j on the other items, with an L2 penalty lam
        others = [i for i in range(6) if i != j]
        xo = x[:, others].astype(np.float64)
        direct = np.linalg.solve(xo.T @ xo + lam * np.eye(5), xo.T @ x[:, j])
        np.testing.assert_allclose(b[others, j], direct, rtol=1e-5, atol=1e-6)
        assert b[j, j] == 0.0
    with pytest.raises(ValueError):
        ease_weights(x, 0.0)


def test_ease_scores_the_whole_history_and_lambda_is_chosen_on_validation(fixture_split):
    s, catalog = fixture_split
    best, scores = select_ease(s, catalog, lambdas=(1.0, 10.0))
    assert set(scores) == {1.0, 10.0} and scores[best.lam] == max(scores.values())
    case = s.validation[0]
    users = best.users(s, [case])
    history_rows = catalog.rows(s.timelines[case.user].post_ids[: case.cut])
    assert sorted(torch.nonzero(users[0]).flatten().tolist()) == sorted(history_rows.tolist())
    expected = users.numpy() @ ease_weights_of(best)  # scores = x B
    np.testing.assert_allclose((users @ best.corpus().T).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert 0.0 <= evaluate(best, s, s.test, catalog)["recall@100"] <= 1.0


def ease_weights_of(scorer: EASEScorer) -> np.ndarray:
    return scorer.corpus().numpy().T


# --- SASRec ------------------------------------------------------------------------------------------

SAS = SASRecConfig(max_len=6, dim=16, num_layers=2, num_heads=2, dropout=0.0)


def _sasrec(cfg: SASRecConfig = SAS, items: int = 20) -> SASRec:
    torch.manual_seed(0)
    model = SASRec(items, cfg)
    model.reset_parameters(torch.Generator().manual_seed(0))
    return model


def test_sasrec_shapes_and_causality():
    model = _sasrec().eval()
    seq = torch.tensor([[3, 7, 1, 9, 0, 0], [5, 2, 8, 4, 6, 11]])
    out = model(seq)
    assert out.shape == (2, 6, 16) and model.item_embeddings().shape == (20, 16)
    changed = seq.clone()
    changed[:, 3:] = torch.tensor([[12, 0, 0], [13, 14, 15]])  # only positions >= 3 change
    again = model(changed)
    torch.testing.assert_close(again[:, :3], out[:, :3])
    assert not torch.allclose(again[1, 3:], out[1, 3:])


def test_sasrec_training_steps_lower_the_loss(fixture_split):
    s, catalog = fixture_split
    cfg = SASRecConfig(max_len=8, dim=16, dropout=0.0)
    model = _sasrec(cfg, len(catalog.post_ids))
    seq, rows = sasrec_batch(s, epoch_windows(s, cfg.max_len, None), catalog, cfg)
    assert seq.shape == rows.shape == (len(epoch_windows(s, 8, None)), 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = sasrec_loss(model, seq, rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    scorer = SASRecScorer(model.eval(), catalog)
    assert scorer.users(s, s.test[:3]).shape == (3, 16) and scorer.corpus().shape == (
        len(catalog.post_ids),
        16,
    )


# --- windows -----------------------------------------------------------------------------------------


def test_windows_tile_each_training_prefix_and_targets_follow(fixture_split):
    s, _ = fixture_split
    for rng in (None, np.random.default_rng(3)):
        windows = epoch_windows(s, 5, rng)
        for u in range(len(s.timelines)):
            spans = [(w.start, w.end) for w in windows if w.user == u]
            covered = [i for a, b in spans for i in range(a, b)]
            assert covered == list(range(int(s.train_end[u]))) and all(b - a <= 5 for a, b in spans)
    w = next(w for w in epoch_windows(s, 3, None) if w.start > 0 and w.end < s.train_end[w.user])
    t = s.timelines[w.user]
    targets = window_targets(s, [w], 3, "all")[0]
    assert targets[0] == 0  # no event of the window seen: not supervised past a timeline's start
    n = w.end - w.start
    assert targets[1 : n + 1].tolist() == t.post_ids[w.start + 1 : w.end + 1].tolist()
    positives = window_targets(s, [w], 3, "positive")[0]
    for p in range(1, n + 1):
        positive = t.ratings[w.start + p] >= 4
        assert positives[p] == (t.post_ids[w.start + p] if positive else 0)
    assert window_context(s, w, 3).post_ids.tolist() == t.post_ids[w.start : w.end].tolist()
    with pytest.raises(ValueError):
        window_targets(s, [w], 3, "some")


def test_no_window_reaches_a_validation_or_test_target(fixture_split):
    s, catalog = fixture_split
    windows = epoch_windows(s, CAUSAL.history_len, np.random.default_rng(0))
    _, rows = window_batch(s, windows, _model(), catalog, "all")
    for w, row in zip(windows, rows.tolist(), strict=True):
        assert w.end <= s.train_end[w.user]
        supervised = [catalog.post_ids[r] for r in row if r >= 0]
        t = s.timelines[w.user]
        assert set(supervised) <= set(t.post_ids[: s.train_end[w.user]].tolist())


# --- the dense two-tower objective -------------------------------------------------------------------


def test_prefix_embeddings_are_the_served_embeddings_of_every_prefix(fixture_split):
    s, _ = fixture_split
    model = _model()
    t = s.timelines[0]
    ctx = window_context(s, epoch_windows(s, CAUSAL.history_len, None)[0], 3)
    with torch.inference_mode():
        prefixes = prefix_embeddings(model, featurize_users([ctx], CAUSAL))[0]  # [1+S, D]
        n = len(ctx.post_ids)
        served = model.encode_users(featurize_users([t.context(i, 3) for i in range(n + 1)], CAUSAL))
    torch.testing.assert_close(prefixes[: n + 1], served, atol=1e-5, rtol=1e-5)


def test_dense_objective_needs_a_causal_tower(fixture_split):
    s, catalog = fixture_split
    cfg = TowerConfig(**TINY, num_user_features=3, user_feature_vocab_size=31)
    with pytest.raises(ValueError, match="causal"):
        train(TwoTowerModel(cfg), s, catalog, TrainConfig(max_epochs=1), progress=False)


def test_dense_steps_lower_the_loss(fixture_split):
    s, catalog = fixture_split
    model = _model().train()
    features, rows = window_batch(s, epoch_windows(s, CAUSAL.history_len, None), model, catalog, "all")
    items = featurize_items(catalog.post_ids, np.zeros_like(catalog.post_ids), CAUSAL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(6):
        loss = dense_step_loss(model, features, rows, items, torch.tensor(0.1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_training_dropout_is_training_only_and_leaves_no_trace(fixture_split):
    s, _ = fixture_split
    model = _model()
    f = featurize_users([s.timelines[0].context(5, 3)], CAUSAL)
    before = model.encode_users(f)
    fingerprint = fingerprint_of(CAUSAL, model.state_dict())
    with training_dropout(model, 0.5):
        torch.testing.assert_close(model.eval().encode_users(f), before)  # eval mode: no dropout
        model.train()
        assert not torch.allclose(model.encode_users(f), before)
    model.eval()
    torch.testing.assert_close(model.encode_users(f), before)  # hooks removed
    assert fingerprint_of(CAUSAL, model.state_dict()) == fingerprint


# --- cached runs -------------------------------------------------------------------------------------


def test_cached_run_computes_once_per_key(tmp_path):
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"x": len(calls)}

    assert cached_run(tmp_path, "k", "abc", compute) == {"x": 1}
    assert cached_run(tmp_path, "k", "abc", compute) == {"x": 1} and len(calls) == 1
    assert cached_run(tmp_path, "k", "other", compute) == {"x": 2}
    assert cached_run(None, "k", "abc", compute) == {"x": 3}
    s = spread([{"m": 1.0}, {"m": 3.0}])
    assert s == {"m": {"mean": 2.0, "std": 1.0}}
