"""A service given a bad checkpoint refuses to start: exit code 1 and one clear log line saying what is
wrong (missing, extra or misshapen tensors; a pickle in place of safetensors, which is never run)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.model.checkpoint import WEIGHTS_FILE
from tests.reliability.harness import write_items
from tests.support import REPO_ROOT

pytestmark = pytest.mark.reliability


class _Exploit:
    """Unpickling this creates `marker`: the file must never appear."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _break(checkpoint: Path, change: str, marker: Path) -> str:
    """Damage the checkpoint; returns the text the error line must contain."""
    path = checkpoint / WEIGHTS_FILE
    if change == "pickle":
        path.write_bytes(pickle.dumps({"weights": _Exploit(marker)}))
        return "unreadable or truncated weights"
    state = load_file(path)
    if change == "missing":
        del state["candidate_tower.proj_out.weight"]
        expected = "missing tensors: candidate_tower.proj_out.weight"
    elif change == "extra":
        state["surprise"] = torch.zeros(2)
        expected = "unexpected tensors: surprise"
    else:
        state["candidate_tower.proj_out.weight"] = torch.zeros(3, 3)
        expected = "tensor candidate_tower.proj_out.weight has shape (3, 3), expected"
    save_file(state, path)
    return expected


CASES = {  # (service, damage)
    "user_service missing": ("user_service", "missing"),
    "user_service pickle": ("user_service", "pickle"),
    "candidate_service extra": ("candidate_service", "extra"),
    "candidate_service misshapen": ("candidate_service", "misshapen"),
}


def test_bad_checkpoints_make_the_services_refuse_to_start_with_one_clear_line(tmp_path, tiny_checkpoint):
    items = write_items(tmp_path / "items.jsonl", range(1, 11))
    marker = tmp_path / "pwned"
    started = {}
    for name, (module, change) in CASES.items():
        ckpt = tmp_path / name.replace(" ", "-")
        subprocess.run(["cp", "-r", str(tiny_checkpoint), str(ckpt)], check=True)
        expected = _break(ckpt, change, marker)
        args = ["--checkpoint", str(ckpt), "--port", "0"]
        if module == "candidate_service":
            args += ["--items", str(items), "--cache-dir", str(tmp_path / f"cache-{change}")]
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        started[name] = (proc, module, expected)
    for name, (proc, module, expected) in started.items():
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{name}: still running with a bad checkpoint")
        errors = [line for line in out.splitlines() if " ERROR " in line]
        print(f"\n{name}: exit {proc.returncode}: {errors}")
        assert proc.returncode == 1, out
        assert len(errors) == 1 and f"{module} cannot start: " in errors[0] and expected in errors[0], out
        assert "Traceback" not in out
    assert not marker.exists()  # the pickle was never unpickled
