"""The user tower's dense part on ONNX Runtime, for a CPU. No grpc import.

Eager, a forward pass of the small user tower is a few hundred tiny ops, each paying Python and
dispatch overhead: for one MovieLens user (D=64, S=16) 2.6-3.0 ms on this project's 2-core CPU, more
after an idle gap. ONNX Runtime runs the same graph in 0.45 ms (identical to ~1e-7), with its own
fused kernels and no per-op Python. Unlike torch.compile (`--cpu-tower compile`) it needs no C++
compiler and exports in seconds, not a minute, so it is the default on CPU (docs/decisions.md).

Only the part after the table lookups is exported (`UserTower.encode_rows`: the tower's own small
weights): the tables stay in torch's tensors, read through numpy views (`_NumpyTables`, the gathers
of `UserTower.lookup`), so ONNX Runtime holds no second copy of them and a model of any table size
exports (protobuf's 2 GB limit never applies).

The export (`torch.onnx.export`, dynamo, the batch dimension dynamic) takes ~7 s here and holds the
GIL for most of it, so it runs in a child process (`user_service.onnx_export`: the server serves on
meanwhile, e.g. the old model during a rollout's LoadModel), and the exported model is cached on
disk, keyed by the checkpoint's fingerprint, the tower's dtype and the exporter's versions; a cached
file that does not load is exported again. The cache is not data of record: losing it costs one
export. UserEncoder checks the result against eager at warm-up and keeps eager serving on any failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.atomic_file import atomic_write
from shared.model.features import UserFeatures
from shared.model.towers import TwoTowerModel, history_inputs
from user_service import onnx_export
from user_service.onnx_export import INPUTS, OUTPUT

logger = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 600.0  # the child export (~10 s here): past this it is killed and eager serves


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/twotower/user-tower, else ~/.cache/twotower/user-tower."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "twotower" / "user-tower"


def _inputs(model: TwoTowerModel, features: UserFeatures) -> tuple[torch.Tensor, ...]:
    return (*model.user_tower.lookup(model.tables, features), *history_inputs(features))


def export_dense_tower(
    model: TwoTowerModel, example: UserFeatures, timeout_s: float = EXPORT_TIMEOUT_S
) -> bytes:
    """The ONNX model (serialised ModelProto) of `UserTower.encode_rows`, batch dimension dynamic,
    exported by a child process (`user_service.onnx_export`: the exporter holds the GIL for seconds).
    `example` must hold at least 2 users. Raises RuntimeError when the child fails or times out."""
    with tempfile.TemporaryDirectory(prefix="twotower-onnx-") as tmp:
        workdir = Path(tmp)
        write_workdir(model, example, workdir)
        _run_child(_child_command(workdir), timeout_s)
        return (workdir / onnx_export.OUTPUT_FILE).read_bytes()


def write_workdir(model: TwoTowerModel, example: UserFeatures, workdir: Path) -> None:
    """What the export child reads (user_service.onnx_export): the config, the user tower's weights
    and the example's inputs to the dense part."""
    from safetensors.torch import save_file

    with torch.inference_mode():
        inputs = _inputs(model, example)
    tensors = {
        onnx_export.TOWER_PREFIX + k: v.detach().contiguous()
        for k, v in model.user_tower.state_dict().items()
    }
    tensors.update(
        {onnx_export.INPUT_PREFIX + n: t.contiguous() for n, t in zip(INPUTS, inputs, strict=True)}
    )
    (workdir / onnx_export.CONFIG_FILE).write_text(json.dumps(model.config.to_dict()))
    save_file(tensors, workdir / onnx_export.INPUTS_FILE)


def _child_command(workdir: Path) -> list[str]:
    """The export child, told this process's pid: it exits (removing workdir) if this one dies."""
    return [sys.executable, "-m", "user_service.onnx_export", str(workdir), str(os.getpid())]


def _run_child(command: list[str], timeout_s: float) -> None:
    """Run the export child to completion (its output kept for the error), or kill it at the timeout."""
    root = str(Path(onnx_export.__file__).resolve().parents[1])  # where user_service/ and shared/ live
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        raise RuntimeError(f"the ONNX export did not finish in {timeout_s:.0f} s; killed") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the ONNX export failed (exit status {done.returncode}): {tail}")


def cache_key(fingerprint: str, dtype: torch.dtype) -> str:
    """What an exported file depends on besides the weights the fingerprint names."""
    from importlib.metadata import version  # not the modules: importing onnxscript takes a second

    libraries = "|".join(version(name) for name in ("onnxscript", "onnx", "onnxruntime"))
    versions = f"{torch.__version__}|{libraries}|{dtype}|{INPUTS}"
    return f"{fingerprint}-{hashlib.sha256(versions.encode()).hexdigest()[:12]}"


class OnnxUserTower:
    """`encode_users` with the dense part on ONNX Runtime: one session on one thread (small batches)
    and, where more threads are allowed, one on `max_threads` (no spinning between runs: the cores
    are shared with the event loop and, often, other services)."""

    def __init__(
        self, model: TwoTowerModel, fingerprint: str, example: UserFeatures, cache_dir: Path | None,
        max_threads: int,
    ) -> None:  # fmt: skip
        self._thread_counts = sorted({1, max(1, max_threads)})
        dtype = next(model.parameters()).dtype
        path = None if cache_dir is None else cache_dir / f"{cache_key(fingerprint, dtype)}.onnx"
        sessions = self._from_cache(path) if path is not None else None
        if sessions is None:
            t0 = time.perf_counter()
            data = export_dense_tower(model, example)
            logger.info("user tower exported to ONNX in %.1f s", time.perf_counter() - t0)
            sessions = self._open(data)
            if path is not None:
                try:
                    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
                except OSError as exc:  # a read-only home, a full disk: serve on, export again next time
                    logger.warning("user tower: cannot cache the ONNX model at %s (%s)", path, exc)
        self._sessions = sessions
        self.threads = max(sessions)
        self._tables = _NumpyTables(model)

    def _from_cache(self, path: Path) -> dict[int, Any] | None:
        try:
            sessions = self._open(path.read_bytes())
        except FileNotFoundError:
            return None
        except Exception as exc:  # a truncated or foreign file: export again, over it
            logger.warning("user tower: cached ONNX model %s is unusable (%s); exporting again", path, exc)
            return None
        logger.info("user tower: ONNX model from the cache (%s)", path)
        return sessions

    def _open(self, data: bytes) -> dict[int, Any]:
        import onnxruntime

        sessions = {}
        for threads in self._thread_counts:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3  # errors only: its warnings are about graph rewrites
            cpu = ["CPUExecutionProvider"]
            sessions[threads] = onnxruntime.InferenceSession(data, options, providers=cpu)
        return sessions

    def encode_users(self, features: UserFeatures, threads: int = 1) -> torch.Tensor:
        """[B, D] embeddings on the cpu; `threads` picks the session (1, or the most allowed)."""
        session = self._sessions[1 if threads <= 1 else self.threads]
        inputs = (*self._tables.lookup(features), *(t.numpy() for t in history_inputs(features)))
        (out,) = session.run([OUTPUT], dict(zip(INPUTS, inputs, strict=True)))
        return torch.from_numpy(np.asarray(out))


class _NumpyTables:
    """`UserTower.lookup` in numpy, over views of the model's own tables (no copy): the same rows in
    the same layout, without torch's per-op dispatch (one MovieLens user 0.13 -> 0.04 ms, 64 users of
    the default model 8.6 -> 6.5 ms). UserEncoder's warm-up checks the whole tower against eager."""

    def __init__(self, model: TwoTowerModel) -> None:
        t = model.tables
        self.user, self.post, self.author = (
            table.weight.detach().numpy() for table in (t.user, t.post, t.author)
        )
        self.user_feature = None if t.user_feature is None else t.user_feature.weight.detach().numpy()

    @staticmethod
    def _rows(weight: np.ndarray, hashes: torch.Tensor) -> np.ndarray:
        """hashes [..., H] -> [..., H*D], the H rows side by side; hash 0 (padding) is a zero row."""
        h = hashes.numpy()
        rows = weight[h]  # [..., H, D]
        rows[h == 0] = 0.0
        return rows.reshape(*h.shape[:-1], -1)

    def lookup(self, f: UserFeatures) -> tuple[np.ndarray, np.ndarray]:
        user = [self._rows(self.user, f.user_hashes)]  # [B, Hu*D]
        if self.user_feature is not None:
            per_feature = self._rows(self.user_feature, f.user_feature_hashes)  # [B, F, Hu*D]
            user.append(per_feature.reshape(per_feature.shape[0], -1))
        history = [
            self._rows(self.post, f.history_post_hashes),
            self._rows(self.author, f.history_author_hashes),
        ]
        return np.concatenate(user, axis=-1), np.concatenate(history, axis=-1)
