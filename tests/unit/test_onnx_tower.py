"""The user tower on ONNX Runtime (user_service/onnx_tower.py): equal to eager, cached, and never the
reason a model does not serve. One real export per model config (seconds each); the other tests reuse
its bytes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shared.model.checkpoint import load_checkpoint, random_model, save_checkpoint
from shared.model.config import TowerConfig
from shared.model.features import UserContext, featurize_users
from tests.conftest import TINY
from user_service import onnx_export, onnx_tower
from user_service.encoder import UserEncoder
from user_service.onnx_tower import OnnxUserTower, cache_key

FINGERPRINT = "0123456789abcdef"


def _users(b: int, first: int = 1) -> list[UserContext]:
    return [
        UserContext.build(
            uid, post_ids=[uid * 10 + i for i in range(1, 2 + uid % 11)],
            actions=[[(uid + i) % 19] for i in range(1 + uid % 11)], user_features=[uid, 7][: uid % 3],
        )
        for uid in range(first, first + b)
    ]  # fmt: skip


def _eager(model, contexts) -> torch.Tensor:
    with torch.inference_mode():
        return model.encode_users(featurize_users(contexts, model.config))


@pytest.fixture(scope="module")
def exported():
    """A real export of a tiny model with user features: (model, bytes)."""
    model = random_model(TowerConfig(**TINY, num_user_features=2), seed=3).eval()
    example = featurize_users(_users(2), model.config)
    return model, onnx_tower.export_dense_tower(model, example)


@pytest.fixture
def reuse_export(monkeypatch, exported):
    """export_dense_tower returns the module's export (counted) instead of exporting again."""
    calls = []

    def fake(model, example):
        calls.append(model)
        return exported[1]

    monkeypatch.setattr(onnx_tower, "export_dense_tower", fake)
    return calls


@pytest.mark.parametrize("threads", [1, 2])
def test_onnx_tower_equals_eager_at_any_batch_size(exported, tmp_path, reuse_export, threads):
    model, _ = exported
    tower = OnnxUserTower(model, FINGERPRINT, featurize_users(_users(2), model.config), tmp_path, threads)
    assert tower.threads == threads
    for b in (1, 2, 5, 64):
        contexts = _users(b, first=b)
        features = featurize_users(contexts, model.config)
        out = tower.encode_users(features, threads)
        assert out.shape == (b, model.config.emb_dim) and out.dtype == torch.float32
        torch.testing.assert_close(out, _eager(model, contexts), atol=1e-5, rtol=1e-5)


def test_a_model_without_user_features_exports_too_in_a_child_process(tmp_path, monkeypatch):
    model = random_model(TowerConfig(**TINY), seed=4).eval()  # no user-feature table at all
    assert model.tables.user_feature is None
    contexts = [UserContext.build(9, post_ids=[3, 4], actions=[[1], [2, 5]]), UserContext.build(3)]

    def not_here(*args, **kwargs):
        raise AssertionError("exported in the server's own process (holding its GIL for seconds)")

    monkeypatch.setattr(torch.onnx, "export", not_here)  # in this process only: the child has its own
    tower = OnnxUserTower(model, FINGERPRINT, featurize_users(contexts, model.config), None, 1)
    out = tower.encode_users(featurize_users(contexts, model.config))
    torch.testing.assert_close(out, _eager(model, contexts), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("child", ["fails", "hangs"])
def test_an_export_child_that_fails_or_hangs_raises_with_its_reason(exported, monkeypatch, child):
    script = {
        "fails": "import sys; sys.stderr.write('exporter: unsupported op aten::foo'); sys.exit(3)",
        "hangs": "import time; time.sleep(120)",
    }[child]
    monkeypatch.setattr(onnx_tower, "_child_command", lambda workdir: [sys.executable, "-c", script])
    model, _ = exported
    expected = (
        r"\(exit status 3\): exporter: unsupported op aten::foo"
        if child == "fails"
        else "did not finish in 2 s"
    )
    with pytest.raises(RuntimeError, match=expected):
        onnx_tower.export_dense_tower(model, featurize_users(_users(2), model.config), timeout_s=2)


def _running(pid: int) -> bool:
    """Whether pid is a live process (an exited one may linger as a zombie until reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_the_export_child_exits_and_cleans_up_when_its_server_dies(exported, tmp_path):
    model, _ = exported
    workdir = tmp_path / "work"
    workdir.mkdir()
    onnx_tower.write_workdir(model, featurize_users(_users(2), model.config), workdir)
    # A stand-in server: starts the export child as onnx_tower does, says its pid, waits to be killed.
    server_script = (
        "import os, subprocess, sys, time\n"
        "command = [sys.executable, '-m', 'user_service.onnx_export', sys.argv[1], str(os.getpid())]\n"
        "print(subprocess.Popen(command).pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    root = str(Path(onnx_export.__file__).resolve().parents[1])
    server = subprocess.Popen(
        [sys.executable, "-c", server_script, str(workdir)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": root},
    )  # fmt: skip
    try:
        child = int(server.stdout.readline())
    finally:
        server.kill()  # SIGKILL: the server cannot clean anything up itself
        server.wait(timeout=10)
    deadline = time.monotonic() + 60  # the child's imports, then its half-second watch
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child), "the export child outlived its server"
    assert not workdir.exists()  # removed by the child: nobody else would


def test_the_export_child_reports_bad_input_with_a_status(tmp_path):
    (tmp_path / onnx_export.CONFIG_FILE).write_text('{"emb_dim": 8, "no_such_field": 1}')
    with pytest.raises(ValueError, match="unknown TowerConfig fields: no_such_field"):
        onnx_export.main([str(tmp_path)])
    assert onnx_export.main([]) == 2  # usage
    assert onnx_export.main([str(tmp_path), "not-a-pid"]) == 2


def test_the_export_is_cached_per_fingerprint_and_reused(exported, tmp_path, reuse_export):
    model, data = exported
    example = featurize_users(_users(2), model.config)
    OnnxUserTower(model, FINGERPRINT, example, tmp_path, 1)
    path = tmp_path / f"{cache_key(FINGERPRINT, torch.float32)}.onnx"
    assert path.read_bytes() == data and len(reuse_export) == 1
    OnnxUserTower(model, FINGERPRINT, example, tmp_path, 1)  # from the file: no export
    assert len(reuse_export) == 1
    OnnxUserTower(model, "fedcba9876543210", example, tmp_path, 1)  # another model: its own export
    assert len(reuse_export) == 2 and len(list(tmp_path.glob("*.onnx"))) == 2


def test_an_unusable_cached_file_is_exported_again(exported, tmp_path, reuse_export, caplog):
    model, data = exported
    path = tmp_path / f"{cache_key(FINGERPRINT, torch.float32)}.onnx"
    path.write_bytes(data[: len(data) // 2])  # e.g. a copy cut short
    with caplog.at_level(logging.WARNING):
        tower = OnnxUserTower(model, FINGERPRINT, featurize_users(_users(2), model.config), tmp_path, 1)
    assert "unusable" in caplog.text and len(reuse_export) == 1
    assert path.read_bytes() == data  # replaced
    contexts = _users(3)
    out = tower.encode_users(featurize_users(contexts, model.config))
    torch.testing.assert_close(out, _eager(model, contexts), atol=1e-5, rtol=1e-5)


def test_a_cache_that_cannot_be_written_costs_only_the_cache(exported, tmp_path, reuse_export, caplog):
    model, _ = exported
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING):
        tower = OnnxUserTower(model, FINGERPRINT, featurize_users(_users(2), model.config), blocked, 1)
    assert "cannot cache" in caplog.text
    contexts = _users(2)
    out = tower.encode_users(featurize_users(contexts, model.config))
    torch.testing.assert_close(out, _eager(model, contexts), atol=1e-5, rtol=1e-5)


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert onnx_tower.default_cache_dir() == tmp_path / "twotower" / "user-tower"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert onnx_tower.default_cache_dir() == Path.home() / ".cache" / "twotower" / "user-tower"


def _encoder(exported, tmp_path, cpu_tower="onnx", dtype=torch.float32) -> UserEncoder:
    model, _ = exported
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    return UserEncoder.from_loaded(loaded, torch.device("cpu"), dtype, 1024, 0, cpu_tower, tmp_path / "cache")


def test_the_encoder_serves_through_onnx_after_warm_up(exported, tmp_path, reuse_export):
    encoder = _encoder(exported, tmp_path)
    assert encoder.runtime == "eager"  # until warm-up has built and checked it
    encoder.warm_up([1, 8])
    assert encoder.runtime == "onnx" and len(reuse_export) == 1
    contexts = _users(4)
    torch.testing.assert_close(encoder.encode(contexts), _eager(exported[0], contexts), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("failure", ["export raises", "wrong results"])
def test_the_encoder_stays_eager_when_onnx_fails_or_differs(exported, tmp_path, monkeypatch, failure):
    if failure == "export raises":

        def broken(model, example):
            raise RuntimeError("an op the exporter cannot handle")

        monkeypatch.setattr(onnx_tower, "export_dense_tower", broken)
    else:
        monkeypatch.setattr(onnx_tower, "export_dense_tower", lambda model, example: exported[1])
        monkeypatch.setattr(OnnxUserTower, "encode_users", lambda self, features, threads=1: torch.zeros(
            features.user_hashes.shape[0], exported[0].config.emb_dim))  # fmt: skip
    encoder = _encoder(exported, tmp_path)
    encoder.warm_up([1])
    assert encoder.runtime == "eager"
    contexts = _users(2)
    torch.testing.assert_close(encoder.encode(contexts), _eager(exported[0], contexts), atol=1e-5, rtol=1e-5)


def test_onnx_failing_while_serving_falls_back_to_eager(exported, tmp_path, reuse_export, monkeypatch):
    encoder = _encoder(exported, tmp_path)
    encoder.warm_up([1])
    assert encoder.runtime == "onnx"

    def fails(self, features, threads=1):
        raise RuntimeError("onnxruntime: out of memory")

    monkeypatch.setattr(OnnxUserTower, "encode_users", fails)
    contexts = _users(3)
    torch.testing.assert_close(encoder.encode(contexts), _eager(exported[0], contexts), atol=1e-5, rtol=1e-5)
    assert encoder.runtime == "eager"


def test_bf16_towers_run_eagerly(exported, tmp_path, reuse_export):
    encoder = _encoder(exported, tmp_path, dtype=torch.bfloat16)
    encoder.warm_up([1])
    assert encoder.runtime == "eager" and not reuse_export
