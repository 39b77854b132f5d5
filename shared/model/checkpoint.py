"""Checkpoints: a directory with `model.safetensors` (weights) and `config.json` (config + fingerprint).

Loading never unpickles anything (safetensors only) and refuses missing, extra or misshapen tensors.
The fingerprint is a hash of the config and of every tensor's name, dtype, shape and bytes: two
checkpoints share it only if they compute the same function.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.atomic_file import atomic_write
from shared.errors import CheckpointError
from shared.model.config import TowerConfig
from shared.model.towers import TwoTowerModel

FORMAT = "twotower-checkpoint/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FINGERPRINT_CHARS = 16


@dataclass(frozen=True)
class LoadedModel:
    model: TwoTowerModel  # eval mode, float32, on cpu
    config: TowerConfig
    fingerprint: str


def fingerprint_of(config: TowerConfig, state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def save_checkpoint(model: TwoTowerModel, directory: str | Path) -> str:
    """Write the checkpoint atomically (temp files + rename); returns the fingerprint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fingerprint = fingerprint_of(model.config, state)
    meta = {"format": FORMAT, "fingerprint": fingerprint, "config": model.config.to_dict()}
    atomic_write(directory / WEIGHTS_FILE, lambda path: save_file(state, path, metadata={"format": FORMAT}))
    atomic_write(directory / CONFIG_FILE, lambda path: Path(path).write_text(json.dumps(meta, indent=2)))
    return fingerprint


def declared_fingerprint(directory: str | Path) -> str | None:
    """The fingerprint a checkpoint's config.json declares, without loading the weights (None when it
    cannot be read). Only a hint: `load_checkpoint` verifies it against the weights."""
    try:
        return str(json.loads((Path(directory) / CONFIG_FILE).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_checkpoint(directory: str | Path) -> LoadedModel:
    """Load and verify a checkpoint; raises CheckpointError with a clear message on any problem."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        meta = json.loads(config_path.read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{config_path}: unknown format {meta.get('format')!r}, expected {FORMAT}")
        config = TowerConfig.from_dict(meta["config"])
        expected_fingerprint = str(meta["fingerprint"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: invalid checkpoint config: {exc}") from exc

    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable or truncated weights: {exc}") from exc

    model = TwoTowerModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra)}")
    for k in misshapen:
        problems.append(f"tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}")
    if problems:
        raise CheckpointError(f"{weights_path} does not match its config: " + "; ".join(problems))

    fingerprint = fingerprint_of(config, state)
    if fingerprint != expected_fingerprint:
        raise CheckpointError(
            f"{directory}: fingerprint mismatch (config.json says {expected_fingerprint}, weights hash to "
            f"{fingerprint}): the files are corrupt or come from different checkpoints"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.eval()
    return LoadedModel(model=model, config=config, fingerprint=fingerprint)


def random_model(config: TowerConfig, seed: int) -> TwoTowerModel:
    """A freshly initialised model; the same seed and config give bit-identical weights."""
    model = TwoTowerModel(config)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.eval()
