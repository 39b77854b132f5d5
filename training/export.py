"""Write the artifacts the stack serves: checkpoint, corpus (items.jsonl), histories, metrics.

Everything is written into a fresh sibling directory and swapped in at the end, so an interrupted run
never leaves a half-written artifacts directory that looks complete (`metrics.json` is the marker the
Makefile checks).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from shared.model.actions import ACTION_NAMES
from shared.model.checkpoint import save_checkpoint
from shared.model.towers import TwoTowerModel
from training.data import MovieLens, UserInfo
from training.dataset import Split

CHECKPOINT_DIR = "checkpoint"
ITEMS_FILE = "items.jsonl"
HISTORIES_FILE = "histories.jsonl"
METRICS_FILE = "metrics.json"
GENRE_SEPARATOR = "|"  # MovieLens' own separator; genre names contain no "|"


def item_records(data: MovieLens) -> Iterable[dict]:
    """The common items format; MovieLens has no author, so author_id is left out (0 = unknown)."""
    for movie in data.movies:
        attributes = {"title": movie.title, "year": movie.year, "genres": GENRE_SEPARATOR.join(movie.genres)}
        yield {"post_id": movie.item_id, "attributes": attributes}


def history_records(split: Split, users: dict[int, UserInfo]) -> Iterable[dict]:
    """Per user: the history the test evaluation used (events before the held-out test target, or
    every event for a user without one), the user-feature ids, and the held-out target."""
    tests = {case.user: case for case in split.test}
    for u, t in enumerate(split.timelines):
        case = tests.get(u)
        end = case.cut if case else len(t.post_ids)
        info = users.get(t.user_id)
        yield {
            "user_id": t.user_id,
            "user_features": list(t.user_features),
            "user_attributes": (
                {"age": str(info.age), "gender": info.gender, "occupation": info.occupation} if info else {}
            ),
            "history": [
                {
                    "post_id": int(t.post_ids[i]),
                    "actions": [ACTION_NAMES[a] for a in t.actions[i].nonzero()[0].tolist()],
                    "timestamp_ms": int(t.timestamps[i]) * 1000,
                    "rating": float(t.ratings[i]),
                }
                for i in range(end)
            ],
            "test_target": case.target if case else None,
        }


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def export(out: str | Path, model: TwoTowerModel, data: MovieLens, split: Split, metrics: dict) -> str:
    """Write all artifacts to `out` (replacing what is there); returns the checkpoint fingerprint."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the services may run as another user
    try:
        fingerprint = save_checkpoint(model, staging / CHECKPOINT_DIR)
        _write_jsonl(staging / ITEMS_FILE, item_records(data))
        _write_jsonl(staging / HISTORIES_FILE, history_records(split, data.users))
        metrics = {**metrics, "fingerprint": fingerprint}
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old / "previous")
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return fingerprint
