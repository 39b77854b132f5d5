"""The three real services as subprocesses on loopback, for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from tests.support import ServiceProcess


def write_items(path: Path, n: int) -> Path:
    rows = [{"post_id": i, "author_id": i % 4, "attributes": {"n": str(i)}} for i in range(1, n + 1)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@contextlib.contextmanager
def launch_stack(tmp_dir: Path, checkpoint: Path, items: Path) -> Iterator[tuple[ServiceProcess, ...]]:
    """candidate_service + user_service, then the gateway pointed at them; all SERVING on yield.
    Stops whatever is still running on exit."""
    started: list[ServiceProcess] = []
    try:
        cand_args = [
            "--checkpoint",
            str(checkpoint),
            "--items",
            str(items),
            "--cache-dir",
            str(tmp_dir / "cache"),
        ]
        cand = ServiceProcess("candidate_service", cand_args, tmp_dir)
        started.append(cand)
        user_args = ["--checkpoint", str(checkpoint), "--cpu-tower", "onnx"]  # the default, not the suite's
        user = ServiceProcess("user_service", user_args, tmp_dir)
        started.append(user)
        cand.wait_serving(120)
        user.wait_serving(120)
        gw_args = ["--user-service", user.address, "--candidate-service", cand.address, "--device", "cpu"]
        gateway = ServiceProcess("retrieval_gateway", gw_args, tmp_dir)
        started.append(gateway)
        gateway.wait_serving(120)
        yield cand, user, gateway
    finally:
        for proc in reversed(started):
            proc.stop()
