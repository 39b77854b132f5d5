"""The loss, the loop (a tiny config learns, runs are reproducible, the best epoch is kept), the export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.model.checkpoint import load_checkpoint
from shared.model.config import TowerConfig
from shared.model.towers import TwoTowerModel
from tests.conftest import TINY
from training.__main__ import main
from training.data import load_from_dir
from training.dataset import build_timelines, split, training_examples
from training.evaluate import Catalog, ModelScorer, evaluate
from training.export import HISTORIES_FILE, ITEMS_FILE, METRICS_FILE
from training.pipeline import run
from training.sasrec import SASRecConfig
from training.train import (
    Temperature,
    TrainConfig,
    param_groups,
    sampled_softmax_loss,
    target_log_q,
    train,
    train_steps,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "synthetic"
TINY_TOWER = TowerConfig(**TINY, num_user_features=3, user_feature_vocab_size=31, causal=True)
FAST = TrainConfig(max_epochs=2, patience=2, batch_size=32, learning_rate=5e-3)
TINY_SASREC = SASRecConfig(max_len=8, dim=16, max_epochs=1, batch_size=32)


@pytest.fixture(scope="module")
def fixture_data():
    data = load_from_dir(FIXTURE, "synth")
    s = split(build_timelines(data, 19))
    return data, s, Catalog(np.asarray([m.item_id for m in data.movies]))


def test_loss_by_hand_with_logq_and_duplicate_masking():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    items = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    ids = torch.tensor([5, 7, 5])  # rows 0 and 2 share a target: neither is the other's negative
    log_q = torch.tensor([-1.0, -2.0, -1.0])
    tau = torch.tensor(0.5)
    logits = users @ items.T / 0.5 - log_q[None, :]
    logits[0, 2] = logits[2, 0] = float("-inf")
    expected = F.cross_entropy(logits, torch.arange(3))
    torch.testing.assert_close(sampled_softmax_loss(users, items, ids, log_q, tau), expected)
    row1 = [0.6 / 0.5 + 1.0, 1.0 / 0.5 + 2.0, 0.0 / 0.5 + 1.0]  # user 1 by hand: target is column 1
    by_hand = -(row1[1] - math.log(sum(math.exp(v) for v in row1)))
    per_row = F.cross_entropy(logits, torch.arange(3), reduction="none")
    assert per_row[1].item() == pytest.approx(by_hand, rel=1e-5)


def test_temperature_starts_at_init_and_is_clamped():
    assert Temperature(0.1)().item() == pytest.approx(0.1)
    t = Temperature(0.1)
    with torch.no_grad():
        t.log_tau.fill_(-20.0)
    assert t().item() == pytest.approx(0.01)


def test_a_tiny_config_lowers_its_loss(fixture_data):
    _, s, catalog = fixture_data
    torch.manual_seed(0)
    model = TwoTowerModel(TINY_TOWER)
    model.reset_parameters(torch.Generator().manual_seed(0))
    examples = training_examples(s)
    log_q = target_log_q(s, examples, catalog)
    temperature = Temperature(0.1)
    groups = param_groups(model, 0.01)
    groups[1]["params"].append(temperature.log_tau)
    optimizer = torch.optim.AdamW(groups, lr=5e-3)
    cfg = TrainConfig(batch_size=len(examples))  # one full batch: the same loss is measured each step
    losses = [train_steps(model, s, examples, log_q, catalog, temperature, optimizer, cfg) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1, losses


def test_training_is_reproducible_and_keeps_the_best_epoch(fixture_data):
    _, s, catalog = fixture_data
    first, second, other = TwoTowerModel(TINY_TOWER), TwoTowerModel(TINY_TOWER), TwoTowerModel(TINY_TOWER)
    result = train(first, s, catalog, FAST, progress=False)
    train(second, s, catalog, FAST, progress=False)
    train(other, s, catalog, TrainConfig(**{**FAST.to_dict(), "seed": 1}), progress=False)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert len(result.epochs) == 2 and 1 <= result.best_epoch <= 2
    # the model left behind is the best epoch's: its validation metrics are the recorded best
    assert evaluate(ModelScorer(first, catalog), s, s.validation, catalog) == result.best_validation


def test_train_config_limits():
    bad_values = (
        {"max_epochs": 0}, {"batch_size": 0}, {"learning_rate": 0.0}, {"temperature_init": 0.001},
        {"objective": "pointwise"}, {"targets": "some"}, {"dropout": 1.0},
    )  # fmt: skip
    for bad in bad_values:
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_export_round_trip(tmp_path, fixture_data):
    data, s, catalog = fixture_data
    out = tmp_path / "artifacts"
    metrics = run(data, out, TINY_TOWER, FAST, progress=False, seeds=2, sasrec=TINY_SASREC)
    saved = json.loads((out / METRICS_FILE).read_text())
    assert saved["fingerprint"] == metrics["fingerprint"]
    models = {"two-tower", "SASRec", "EASE", "item-kNN", "popularity"}
    assert set(saved["results"]["test"]) == set(saved["spread"]["validation"]) == models
    assert [r["seed"] for r in saved["runs"]["two-tower"]] == [0, 1] and len(saved["runs"]["SASRec"]) == 2
    spread = saved["spread"]["test"]["two-tower"]["recall@50"]
    seeds = [r["test"]["recall@50"] for r in saved["runs"]["two-tower"]]
    assert spread["mean"] == pytest.approx(np.mean(seeds)) and spread["std"] == pytest.approx(np.std(seeds))
    assert saved["spread"]["test"]["EASE"]["ndcg@10"]["std"] == 0.0
    loaded = load_checkpoint(out / "checkpoint")
    assert loaded.fingerprint == saved["fingerprint"] and loaded.config == TINY_TOWER
    # the served checkpoint reproduces the recorded test numbers exactly
    again = evaluate(ModelScorer(loaded.model, catalog), s, s.test, catalog)
    assert again == saved["results"]["test"]["two-tower"]

    items = [json.loads(line) for line in (out / ITEMS_FILE).read_text().splitlines()]
    assert len(items) == 40 and items[0] == {
        "post_id": 1,
        "attributes": {"title": "Synthetic Movie 1", "year": "1971", "genres": "Action|Test"},
    }
    histories = {r["user_id"]: r for r in map(json.loads, (out / HISTORIES_FILE).read_text().splitlines())}
    assert len(histories) == 24 and histories[24]["test_target"] is None
    for case in s.test:
        record = histories[s.timelines[case.user].user_id]
        assert record["test_target"] == case.target and len(record["history"]) == case.cut
        assert case.target not in [e["post_id"] for e in record["history"]]
    first = histories[1]["history"][0]
    assert set(first) == {"post_id", "actions", "timestamp_ms", "rating"} and "click" in first["actions"]

    run(
        data, out, TINY_TOWER, FAST, progress=False, seeds=1, sasrec=None
    )  # a second export replaces the first cleanly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]


def test_cli_on_the_fixture(tmp_path, capsys):
    sets = [
        f"--set={k}={v}" for k, v in {**TINY, "num_user_features": 3, "user_feature_vocab_size": 31}.items()
    ]
    argv = ["--out", str(tmp_path / "a"), "--data-dir", str(FIXTURE), "--data-name", "synth", "--epochs", "1"]
    fast = ["--seeds", "1", "--no-sasrec", "--runs-cache", "", "--train-set", "learn_temperature=false"]
    assert (
        main([*argv, *sets, *fast, "--train-set", "batch_size=32", "--no-progress", "--log-level", "WARNING"])
        == 0
    )
    assert "item-kNN" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "a" / "checkpoint").config.emb_dim == TINY["emb_dim"]
    assert main([*argv[:2], "--data-dir", str(tmp_path / "nowhere"), "--no-progress"]) == 1
    # --if-missing leaves trained artifacts alone (the data dir does not even exist here)
    assert main([*argv[:2], "--data-dir", str(tmp_path / "nowhere"), "--if-missing"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    saved = json.loads((tmp_path / "a" / METRICS_FILE).read_text())
    assert saved["train_config"]["learn_temperature"] is False and "SASRec" not in saved["results"]["test"]
    for bad in (["--train-set", "nope=1"], ["--train-set", "learn_temperature=maybe"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            main([*argv, *bad])
