"""Corpora of the end-to-end benchmark: the files a stack serves (checkpoint, items.jsonl) and the
Retrieve requests that drive it.

- `movielens`: the artifacts of `python -m training` (trained checkpoint, items.jsonl and, when
  present, histories.jsonl for real user histories).
- `synthetic`: N items (post ids 1..N, random authors) and a random-init default TowerConfig with
  history_len 64; every request carries 64 events drawn from the corpus.
Synthetic files are written once per (n, seed) under the work directory and reused, so a rerun hits
candidate_service's fingerprint-keyed cache instead of re-encoding the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import REPO
from twotower.v1 import common_pb2, retrieval_gateway_pb2

SYNTHETIC_HISTORY = 64
MAX_REQUESTS = 1024  # distinct users per corpus; the load generator cycles through them


class CorpusMissing(Exception):
    pass


@dataclass(frozen=True)
class Corpus:
    name: str
    checkpoint: Path
    items: Path
    requests: list[retrieval_gateway_pb2.RetrieveRequest]
    description: str


def movielens(artifacts: Path, k: int, train_if_missing: bool) -> Corpus:
    checkpoint, items = artifacts / "checkpoint", artifacts / "items.jsonl"
    if not (checkpoint.is_dir() and items.is_file()):
        if not train_if_missing:
            raise CorpusMissing(
                f"{artifacts} has no checkpoint/ and items.jsonl: run `make train` "
                f"(or `.venv/bin/python -m training --out {artifacts}`), or pass --train-if-missing"
            )
        print(f"training MovieLens artifacts into {artifacts} (python -m training) ...", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "training",
            "--out",
            str(artifacts),
            "--no-progress",
            "--log-level",
            "WARNING",
        ]
        subprocess.run(cmd, cwd=REPO, check=True)
    histories = artifacts / "histories.jsonl"
    if histories.is_file():
        requests = _movielens_requests(histories, k)
        source = "histories.jsonl (real user histories)"
    else:  # older artifacts: synthesise histories over the real item ids
        post_ids = np.array([json.loads(line)["post_id"] for line in items.open()], np.int64)
        requests = _random_requests(post_ids, 32, k, exclude_history=True, seed=1)
        source = "random 32-event histories over items.jsonl"
    n_items = sum(1 for _ in items.open())
    description = f"MovieLens: {n_items:,} items, trained checkpoint, requests from {source}, k={k}"
    return Corpus("movielens", checkpoint, items, requests, description)


def _movielens_requests(path: Path, k: int) -> list[retrieval_gateway_pb2.RetrieveRequest]:
    out = []
    with path.open() as f:
        for line in f:
            record = json.loads(line)
            if not record["history"]:
                continue
            user = common_pb2.UserContext(
                user_id=record["user_id"], user_features=record.get("user_features", [])
            )
            for e in record["history"]:
                user.history.add(post_id=e["post_id"], action_names=e.get("actions", []),
                                 timestamp_ms=e.get("timestamp_ms", 0))  # fmt: skip
            out.append(retrieval_gateway_pb2.RetrieveRequest(user=user, k=k, exclude_history=True))
            if len(out) >= MAX_REQUESTS:
                break
    if not out:
        raise CorpusMissing(f"{path} has no user with a history")
    return out


def synthetic(workdir: Path, n: int, k: int, seed: int = 0, attributes: bool = False) -> Corpus:
    """n random items (with `attributes`: each with a title and a kind, like a real catalogue's) and
    requests for a random-init default model."""
    from shared.model.checkpoint import random_model, save_checkpoint
    from shared.model.config import TowerConfig

    root = workdir / f"synthetic_{n}_{seed}{'_attributes' if attributes else ''}"
    checkpoint, items, done = root / "checkpoint", root / "items.jsonl", root / ".complete"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(TowerConfig(), history_len=SYNTHETIC_HISTORY)
        save_checkpoint(random_model(config, seed=seed), checkpoint)
        authors = np.random.default_rng(seed).integers(0, 1 << 20, size=n)
        extra = ', "attributes": {{"title": "synthetic item {0}", "kind": "{1}"}}' if attributes else ""
        kinds = ("video", "photo", "text")
        with items.open("w") as f:  # f-strings: json.dumps per line would take ~10 s for 1M items
            for start in range(0, n, 100_000):
                stop = min(n, start + 100_000)
                f.write(
                    "".join(
                        f'{{"post_id": {i + 1}, "author_id": {a}{extra.format(i + 1, kinds[i % 3])}}}\n'
                        for i, a in zip(range(start, stop), authors[start:stop].tolist(), strict=True)
                    )
                )
        done.write_text("ok\n")
    requests = _random_requests(np.arange(1, n + 1, dtype=np.int64), SYNTHETIC_HISTORY, k, False, seed + 1)
    return Corpus("synthetic", checkpoint, items, requests,
                  f"synthetic: {n:,} items, random-init default TowerConfig with history_len "
                  f"{SYNTHETIC_HISTORY}, {SYNTHETIC_HISTORY} events per request, k={k}"
                  f"{', two attributes per item' if attributes else ''}")  # fmt: skip


def _random_requests(
    post_ids: np.ndarray, history: int, k: int, exclude_history: bool, seed: int
) -> list[retrieval_gateway_pb2.RetrieveRequest]:
    """Distinct users, each with `history` events over `post_ids` (1-2 actions, a surface, rising times)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(MAX_REQUESTS // 4):
        user = common_pb2.UserContext(user_id=int(rng.integers(1, 1 << 40)))
        ts = 1_700_000_000_000 + np.sort(rng.integers(0, 10**9, history))
        for j, post in enumerate(rng.choice(post_ids, size=history)):
            user.history.add(post_id=int(post), author_id=int(rng.integers(0, 1 << 20)),
                             action_ids=rng.choice(19, size=int(rng.integers(1, 3)), replace=False).tolist(),
                             product_surface=int(rng.integers(0, 16)), timestamp_ms=int(ts[j]))  # fmt: skip
        out.append(retrieval_gateway_pb2.RetrieveRequest(user=user, k=k, exclude_history=exclude_history))
    return out
