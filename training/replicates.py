"""Seeded runs whose results are cached on disk: SASRec's seeds and the served model's extra seeds.

A run's metrics depend only on the data, the code and the configuration, so they are cached under a
key that digests all three (the data files' SHA-256, the source of every module the run executes, the
config as JSON): `make train` pays for them once, and any change to the data, the code or the config
retrains them. Only metrics are cached, never weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
# What a seeded run executes: the two towers run the training package, the model and the gateway's
# top-k; SASRec no model code and only part of the package (so a change elsewhere keeps its cache).
TWO_TOWER_CODE = ("training/*.py", "shared/model/*.py", "retrieval_gateway/topk*.py")
SASREC_CODE = (
    "training/sasrec.py", "training/windows.py", "training/dataset.py", "training/evaluate.py",
    "shared/progress.py", "retrieval_gateway/topk*.py",
)  # fmt: skip


def code_digest(globs: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for pattern in globs:
        for path in sorted(ROOT.glob(pattern)):
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run_key(kind: str, data_digests: dict[str, str], config: dict, seed: int, code: Iterable[str]) -> str:
    payload = json.dumps({"kind": kind, "data": data_digests, "config": config, "seed": seed}, sort_keys=True)
    return hashlib.sha256((payload + code_digest(code)).encode()).hexdigest()[:20]


def cached_run(cache_dir: str | Path | None, kind: str, key: str, compute: Callable[[], dict]) -> dict:
    """compute() once per key; its (JSON-able) result is kept in cache_dir/<kind>-<key>.json."""
    path = Path(cache_dir) / f"{kind}-{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable cache file %s", path)
    result = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)  # atomic: a reader sees the whole file or none
    return result


def spread(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric: mean and population std over the seeds' metric dicts."""
    out = {}
    for name in runs[0]:
        values = np.asarray([r[name] for r in runs], dtype=np.float64)
        out[name] = {"mean": float(values.mean()), "std": float(values.std())}
    return out
