import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.errors import CheckpointError
from shared.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint, random_model, save_checkpoint
from shared.model.features import UserContext, featurize_items, featurize_users


def _outputs(model):
    users = featurize_users([UserContext.build(3, [1, 2, 3], [4, 0, 6], [[0], [], [1, 2]])], model.config)
    items = featurize_items(np.arange(1, 20), np.arange(19) % 3, model.config)
    with torch.inference_mode():
        return model.encode_users(users), model.encode_items(items)


def test_round_trip_is_bit_identical(tiny_model, tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    for a, b in zip(_outputs(tiny_model), _outputs(loaded.model), strict=True):
        assert torch.equal(a, b)
    assert loaded.fingerprint == json.loads((tiny_checkpoint / CONFIG_FILE).read_text())["fingerprint"]
    assert loaded.fingerprint == save_checkpoint(tiny_model, tiny_checkpoint.parent / "again")


def test_checkpoint_files_are_world_readable(tiny_checkpoint):
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        assert (tiny_checkpoint / name).stat().st_mode & 0o777 == 0o644


def test_same_seed_same_fingerprint_other_seed_differs(tiny_config, tmp_path):
    a = save_checkpoint(random_model(tiny_config, seed=3), tmp_path / "a")
    b = save_checkpoint(random_model(tiny_config, seed=3), tmp_path / "b")
    c = save_checkpoint(random_model(tiny_config, seed=4), tmp_path / "c")
    assert a == b != c


def test_changing_one_weight_changes_fingerprint(tiny_model, tmp_path):
    before = save_checkpoint(tiny_model, tmp_path / "a")
    with torch.no_grad():
        tiny_model.candidate_tower.proj_out.weight[0, 0] += 1e-3
    assert save_checkpoint(tiny_model, tmp_path / "b") != before


def test_truncated_weights_fail_clearly(tiny_checkpoint):
    path = tiny_checkpoint / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(tiny_checkpoint)


def test_flipped_byte_fails_fingerprint_check(tiny_checkpoint):
    path = tiny_checkpoint / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        load_checkpoint(tiny_checkpoint)


def test_missing_file_fails_clearly(tiny_checkpoint):
    (tiny_checkpoint / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="checkpoint file missing"):
        load_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize("change", ["missing", "extra", "misshapen"])
def test_mismatched_tensors_are_refused(tiny_checkpoint, change):
    path = tiny_checkpoint / WEIGHTS_FILE
    state = load_file(path)
    if change == "missing":
        del state["candidate_tower.proj_out.weight"]
    elif change == "extra":
        state["surprise"] = torch.zeros(2)
    else:
        state["candidate_tower.proj_out.weight"] = torch.zeros(3, 3)
    save_file(state, path)
    with pytest.raises(CheckpointError, match={"missing": "missing tensors", "extra": "unexpected tensors",
                                               "misshapen": "has shape"}[change]):  # fmt: skip
        load_checkpoint(tiny_checkpoint)


def test_corrupt_config_fails_clearly(tiny_checkpoint):
    (tiny_checkpoint / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid checkpoint config"):
        load_checkpoint(tiny_checkpoint)


def test_init_command_is_seeded(tmp_path):
    root = Path(__file__).parents[2]
    cmd = [sys.executable, "-m", "shared.model.init_checkpoint", "--seed", "5", "--set", "emb_dim=8",
           "--set", "head_dim=4", "--set", "post_vocab_size=100"]  # fmt: skip
    out1 = subprocess.run([*cmd, "--out", str(tmp_path / "a")], cwd=root, capture_output=True, text=True)
    out2 = subprocess.run([*cmd, "--out", str(tmp_path / "b")], cwd=root, capture_output=True, text=True)
    assert out1.returncode == 0 and out2.returncode == 0, out1.stderr + out2.stderr
    assert load_checkpoint(tmp_path / "a").fingerprint == load_checkpoint(tmp_path / "b").fingerprint
    assert load_checkpoint(tmp_path / "a").config.emb_dim == 8
    bad = subprocess.run([*cmd, "--set", "nope=1", "--out", str(tmp_path / "c")], cwd=root,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "FIELD=VALUE" in bad.stderr
