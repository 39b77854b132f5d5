"""The ONNX export of the user tower's dense part, run in a child process. No grpc import.

    python -m user_service.onnx_export WORKDIR [PARENT_PID]

WORKDIR holds what `user_service.onnx_tower.export_dense_tower` wrote: `config.json` (TowerConfig),
`inputs.safetensors` (the user tower's weights under "tower.", example inputs under "input.") and
receives `tower.onnx`. Exit status 0 when the file is written. With PARENT_PID (the server's), the
child exits, removing WORKDIR, once that process is gone.

Why a child: `torch.onnx.export` is seconds of Python (tracing, graph rewrites) that holds the GIL
for most of it. Run inside a serving user_service (a LoadModel during a rollout) it would stall
every request of the old model for those seconds; in a child, the server's threads run on and the
child runs at a lower CPU priority. A crash of the exporter is the child's, not the server's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from shared.model.config import TowerConfig
from shared.model.towers import UserTower

INPUTS = ("user_rows", "history_rows", "actions", "surfaces", "mask")
OUTPUT = "user_embedding"  # not "embedding": a name inside the exported graph
MAX_BATCH = 1 << 16  # the exported batch dimension's upper bound (a forward pass is far smaller)
CONFIG_FILE, INPUTS_FILE, OUTPUT_FILE = "config.json", "inputs.safetensors", "tower.onnx"
TOWER_PREFIX, INPUT_PREFIX = "tower.", "input."
NICENESS = 10  # the child's CPU priority below the server's (Unix nice increment)

# The exporter's own loggers: a line per graph rewrite at INFO, optional torchvision ops at WARNING.
_EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


class _DenseTower(nn.Module):
    """The exported function: looked-up rows and the history's inputs -> [B, D] unit-norm embeddings."""

    def __init__(self, tower: UserTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(
        self, user_rows: torch.Tensor, history_rows: torch.Tensor, actions: torch.Tensor,
        surfaces: torch.Tensor, mask: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        return self.tower.encode_rows(user_rows, history_rows, actions, surfaces, mask)


def export_in_process(tower: UserTower, inputs: tuple[torch.Tensor, ...]) -> bytes:
    """The ONNX model (serialised ModelProto) of `UserTower.encode_rows` for `inputs` (INPUTS order,
    at least 2 users: with 1 the exporter would fix the batch dimension to 1), batch dynamic."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad(), warnings.catch_warnings(), _quiet(_EXPORTER_LOGGERS):
        warnings.simplefilter("ignore")  # the exporter's notes on unused axis names and deprecations
        program = torch.onnx.export(
            _DenseTower(tower).eval(), inputs, input_names=list(INPUTS), output_names=[OUTPUT],
            dynamic_shapes={name: {0: batch} for name in INPUTS}, dynamo=True, optimize=True,
            verbose=False,
        )  # fmt: skip
    return program.model_proto.SerializeToString()


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def export_workdir(workdir: Path) -> None:
    """Read WORKDIR's config and tensors, export, write WORKDIR/tower.onnx."""
    from safetensors.torch import load_file

    cfg = TowerConfig.from_dict(json.loads((workdir / CONFIG_FILE).read_text()))
    tensors = load_file(workdir / INPUTS_FILE)
    tower = UserTower(cfg)
    state = {k.removeprefix(TOWER_PREFIX): v for k, v in tensors.items() if k.startswith(TOWER_PREFIX)}
    tower.load_state_dict(state, strict=True)
    tower.to(next(iter(state.values())).dtype)
    inputs = tuple(tensors[INPUT_PREFIX + name] for name in INPUTS)
    (workdir / OUTPUT_FILE).write_bytes(export_in_process(tower.eval(), inputs))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or not all(a.isdigit() for a in args[1:]):
        print("usage: python -m user_service.onnx_export WORKDIR [PARENT_PID]", file=sys.stderr)
        return 2
    workdir = Path(args[0])
    if len(args) == 2:
        _exit_with_parent(int(args[1]), workdir)
    with contextlib.suppress(OSError, AttributeError):  # not on every platform
        os.nice(NICENESS)
    torch.set_num_threads(1)  # the server's cores are busy serving
    export_workdir(workdir)
    return 0


def _exit_with_parent(parent: int, workdir: Path, poll_s: float = 0.5) -> None:
    """A server that dies (SIGKILL, a crash) while its export runs leaves no orphan behind: once this
    process is no longer its child (re-parented, maybe before this runs), it removes the work
    directory its parent can no longer remove and exits."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        shutil.rmtree(workdir, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
