"""Shared fixtures: tiny model configs and checkpoints so tests stay fast."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from shared.model.checkpoint import random_model, save_checkpoint
from shared.model.config import TowerConfig

TINY = dict(
    emb_dim=16, history_len=8, user_vocab_size=257, post_vocab_size=509, author_vocab_size=127,
    num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8,
)  # fmt: skip


# user_service exports its ONNX tower once per model into $XDG_CACHE_HOME (user_service/onnx_tower.py):
# the suite's services, in process and in subprocesses, share one cache of their own, never ~/.cache.
os.environ["XDG_CACHE_HOME"] = _CACHE = tempfile.mkdtemp(prefix="twotower-tests-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# An export costs seconds per model, and the suite's stacks use dozens of models: user_service processes
# run the eager tower unless a test asks for the default with --cpu-tower onnx (the real-services and
# end-to-end stacks, the rollout under load; in-process servers built from UserServiceConfig keep its
# default), and tests/unit/test_onnx_tower.py covers the export itself.
os.environ["USER_SERVICE_CPU_TOWER"] = "eager"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config() -> TowerConfig:
    return TowerConfig(**TINY)


@pytest.fixture
def tiny_model(tiny_config):
    return random_model(tiny_config, seed=0)


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model):
    path = tmp_path / "ckpt"
    save_checkpoint(tiny_model, path)
    return path
