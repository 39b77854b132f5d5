"""The whole run: data -> split -> train -> evaluate (model and baselines) -> export."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from shared.model.config import TowerConfig
from shared.model.towers import TwoTowerModel
from training.data import MovieLens
from training.dataset import MIN_POSITIVES, POSITIVE_RATING, build_timelines, split
from training.evaluate import Catalog, ItemKNNScorer, ModelScorer, PopularityScorer, evaluate, format_table
from training.export import export
from training.train import SELECTION_METRIC, TrainConfig, train

logger = logging.getLogger(__name__)

# Sized for MovieLens-100K (943 users, 1,682 movies) and a 2-core CPU: hash tables a few times the id
# counts (2 hashes each, so a pair of rows almost never collides), D = 64, the last 32 events.
# MovieLens has no authors: one real author row (never used, author ids are all 0 = padding).
MOVIELENS_TOWER = TowerConfig(
    emb_dim=64,
    history_len=32,
    user_vocab_size=4_096,
    post_vocab_size=8_192,
    author_vocab_size=2,
    num_user_features=3,
    user_feature_vocab_size=256,
    num_layers=2,
    num_q_heads=2,
    num_kv_heads=2,
    head_dim=32,
)


def run(
    data: MovieLens,
    out: str | Path,
    tower: TowerConfig = MOVIELENS_TOWER,
    cfg: TrainConfig | None = None,
    progress: bool = True,
) -> dict:
    """Train, evaluate against the baselines on validation and test, export; returns the metrics."""
    cfg = cfg or TrainConfig()
    timelines = build_timelines(data, tower.num_actions)
    s = split(timelines)
    if not s.validation:
        raise ValueError(
            f"no user has {MIN_POSITIVES} positives (rating >= {POSITIVE_RATING}): nothing to evaluate"
        )
    catalog = Catalog(np.asarray([m.item_id for m in data.movies], dtype=np.int64))
    logger.info(
        "%d users, %d movies, %d ratings; %d evaluation users",
        len(timelines), len(catalog.post_ids), len(data.ratings.user_ids), len(s.test),
    )  # fmt: skip

    model = TwoTowerModel(tower)
    result = train(model, s, catalog, cfg, progress=progress)
    scorers = [ModelScorer(model, catalog), PopularityScorer(s, catalog), ItemKNNScorer(s, catalog)]
    results = {
        name: {scorer.name: evaluate(scorer, s, cases, catalog) for scorer in scorers}
        for name, cases in (("validation", s.validation), ("test", s.test))
    }
    print(format_table(results), flush=True)
    metrics = {
        "dataset": {
            "users": len(timelines),
            "movies": len(catalog.post_ids),
            "ratings": len(data.ratings.user_ids),
            "evaluation_users": len(s.test),
            "training_examples": result.num_examples,
            "sha256": data.digests,
        },
        "protocol": (
            f"per user with >= {MIN_POSITIVES} positives (rating >= {POSITIVE_RATING}): last positive = test "
            "target, the one before = validation target, history = every event before the target "
            "(order: timestamp, then item id); rank all movies except the history; training uses only "
            "events before the validation target"
        ),
        "results": results,
        "training": {
            "seconds": round(result.seconds, 1),
            "epochs_run": len(result.epochs),
            "best_epoch": result.best_epoch,
            "selected_on": f"validation {SELECTION_METRIC}",
            "epochs": [vars(e) for e in result.epochs],
        },
        "train_config": cfg.to_dict(),
        "tower_config": tower.to_dict(),
        "parameters": model.num_parameters(),
        "seed": cfg.seed,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    metrics["fingerprint"] = export(out, model, data, s, metrics)
    logger.info(
        "wrote %s (fingerprint %s) in %.1f s of training", out, metrics["fingerprint"], result.seconds
    )
    return metrics
