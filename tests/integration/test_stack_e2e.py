"""End to end through the client library and the CLI: the three real services as subprocesses with a
small random-init checkpoint and corpus, compared with the same model computed in this process. The CLI
and the stack supervisor run as a user runs them: the installed console scripts, from a directory
outside the repository."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.common import free_ports
from shared.client import HistoryEvent, TwoTowerClient
from shared.health import serving_status as health
from shared.model.checkpoint import load_checkpoint
from shared.model.features import UserContext, featurize_items, featurize_users
from tests.integration.stacks import launch_stack, write_items
from tests.support import REPO_ROOT

pytestmark = pytest.mark.slow  # three processes, each importing torch

N = 80
HISTORY = [HistoryEvent(3, 3, ("favorite",)), HistoryEvent(11, 3, ("reply", "click")), HistoryEvent(40, 0)]
BOUND_S = 10.0
# The console scripts of the installation under test: beside the interpreter, in its venv's bin/.
SCRIPTS = Path(sys.executable).parent


def installed(name: str) -> str:
    path = SCRIPTS / name
    assert path.is_file(), f"console script {name} not installed beside {sys.executable}: run `make setup`"
    return str(path)


def outside(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A working directory outside the repository and an environment with nothing that would put the
    repository on sys.path: the installation alone must make the packages (and the protos) importable."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    assert not cwd.resolve().is_relative_to(REPO_ROOT.resolve())
    return cwd, {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def expected_top(checkpoint, k: int, exclude: set[int]) -> tuple[list[int], np.ndarray]:
    """The same model, in this process: user tower on the history, candidate tower on the corpus,
    exact top-k (descending score, ties by ascending post id)."""
    model = load_checkpoint(checkpoint).model
    ctx = UserContext.build(
        7, [e.post_id for e in HISTORY], [e.author_id for e in HISTORY],
        [[{"favorite": 0, "reply": 1, "click": 4}[a] for a in e.actions] for e in HISTORY],
    )  # fmt: skip
    posts = np.arange(1, N + 1)
    with torch.inference_mode():
        user = model.encode_users(featurize_users([ctx], model.config))[0].double().numpy()
        items = model.encode_items(featurize_items(posts, posts % 4, model.config)).double().numpy()
    scores = items @ user
    keep = ~np.isin(posts, list(exclude))
    order = np.lexsort((posts[keep], -scores[keep]))[:k]
    return posts[keep][order].tolist(), scores[keep][order]


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not visible within {BOUND_S}s")


def test_stack_end_to_end(tmp_path, tiny_checkpoint):
    items = write_items(tmp_path / "items.jsonl", N)
    with launch_stack(tmp_path, tiny_checkpoint, items) as (cand, user, gateway):
        assert [health(s.address) for s in (cand, user, gateway)] == ["SERVING"] * 3
        with TwoTowerClient(gateway=gateway.address, candidate=cand.address) as client:
            # k distinct items, descending score, equal to the in-process model
            result = client.retrieve(7, HISTORY, k=10)
            ids = [it.post_id for it in result.items]
            want_ids, want_scores = expected_top(tiny_checkpoint, 10, exclude=set())
            assert ids == want_ids and len(set(ids)) == 10
            np.testing.assert_allclose([it.score for it in result.items], want_scores, atol=1e-5)
            assert all(a.score >= b.score for a, b in zip(result.items, result.items[1:], strict=False))
            assert result.model_fingerprint == load_checkpoint(tiny_checkpoint).fingerprint

            # history items excluded when asked
            excluded = client.retrieve(7, HISTORY, k=N, exclude_history=True)
            assert {3, 11, 40}.isdisjoint(it.post_id for it in excluded.items) and len(
                excluded.items
            ) == N - 3
            assert [it.post_id for it in excluded.items][:10] == expected_top(
                tiny_checkpoint, 10, {3, 11, 40}
            )[0]

            # an upsert becomes retrievable, a delete disappears, within a bounded time
            version = client.upsert([{"post_id": 9001, "author_id": 1, "attributes": {"n": "new"}}]).version
            wait_until(
                lambda: any(it.post_id == 9001 for it in client.retrieve(7, HISTORY, k=N + 1).items), "upsert"
            )
            fresh = client.retrieve(7, HISTORY, k=N + 1)
            assert fresh.corpus_version >= version
            assert [it.attributes for it in fresh.items if it.post_id == 9001] == [{"n": "new"}]
            client.delete([9001, ids[0]])
            wait_until(lambda: len(client.retrieve(7, HISTORY, k=N + 1).items) == N - 1, "delete")
            assert {9001, ids[0]}.isdisjoint(it.post_id for it in client.retrieve(7, HISTORY, k=N + 1).items)

        # the installed CLI, run from another directory, prints a readable table against the same stack
        cwd, env = outside(tmp_path)
        cli = subprocess.run(
            [installed("twotower"), "--gateway", gateway.address,
             "--candidate", cand.address, "--user-service", user.address,
             "retrieve", "--user-id", "7", "--history", "3:favorite", "-k", "3"],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.splitlines()[1].split()[0] == "rank" and "corpus version" in cli.stdout

        # every service shuts down cleanly on SIGTERM (gateway first, as an operator would)
        for svc in (gateway, user, cand):
            assert svc.stop() == 0, svc.log()
            assert "Traceback" not in svc.log(), svc.log()


def test_run_stack_supervisor_starts_serves_and_stops(tmp_path, tiny_checkpoint):
    """What `make run-stack` runs, as the installed `twotower-stack` from outside the repository: all
    three up, every command it prints works as printed from yet another directory, Ctrl-C stops
    everything."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    os.symlink(tiny_checkpoint, artifacts / "checkpoint")
    write_items(artifacts / "items.jsonl", N)
    history = [{"post_id": 3, "actions": ["favorite"]}, {"post_id": 11, "actions": ["click"]}]
    (artifacts / "histories.jsonl").write_text(json.dumps({"user_id": 42, "history": history}) + "\n")
    g, u, c = free_ports(3)
    cwd, env = outside(tmp_path)
    proc = subprocess.Popen(
        [installed("twotower-stack"), "--artifacts", str(artifacts),
         "--cache-dir", str(tmp_path / "cache"), "--log-dir", str(tmp_path / "logs"),
         "--gateway-port", str(g), "--user-port", str(u), "--candidate-port", str(c), "--device", "cpu"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().endswith(" status"):  # the last example the supervisor prints
                break
        assert any("The stack is up" in ln for ln in lines), "".join(lines)
        printed = [ln for ln in lines[lines.index("Try, in another terminal:\n") + 1 :] if ln.strip()]
        assert len(printed) == 3, lines
        # run every printed command exactly as a person would paste it, in another directory
        paste_dir = tmp_path / "another"
        paste_dir.mkdir()
        outputs = []
        for command in printed:
            argv = shlex.split(command)
            assert argv[0] == installed("twotower") and f"127.0.0.1:{g}" in argv, command
            done = subprocess.run(argv, cwd=paste_dir, env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
            outputs.append(done.stdout)
        movielens, explicit, status = outputs
        assert movielens.startswith("user 42, 2 history events"), movielens  # histories.jsonl was found
        assert explicit.startswith("user 7, 3 history events"), explicit
        for table in (movielens, explicit):
            assert table.splitlines()[1].split()[0] == "rank" and "corpus version" in table, table
        assert status.count("SERVING") == 3, status
        for name in ("candidate_service", "user_service", "retrieval_gateway"):
            assert (tmp_path / "logs" / f"{name}.log").stat().st_size > 0
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
    assert "all services stopped" in out
    for port in (g, u, c):  # nothing left listening
        assert health(f"127.0.0.1:{port}", timeout=0.5) == "UNREACHABLE"


def test_every_console_script_runs_from_outside_the_repository(tmp_path):
    """Each [project.scripts] entry, installed, imports everything it needs (the generated protos
    included) from any directory: `--help` exits 0 without a traceback."""
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "twotower" in scripts and "twotower-stack" in scripts
    cwd, env = outside(tmp_path)
    for name in scripts:
        done = subprocess.run([installed(name), "--help"], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0 and "Traceback" not in done.stderr, f"{name}: {done.stderr}"
        assert "usage:" in done.stdout, f"{name}: {done.stdout}"
