"""The whole run: data -> split -> train -> evaluate (model and baselines) -> export.

Reported per model and split: the served seed's metrics (`results`) and the mean ± std over `seeds`
seeds (`spread`): the served model's other seeds and SASRec's seeds come from training/replicates.py's
cache when the data, code and config are unchanged (EASE, item-kNN and popularity are deterministic).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from shared.model.config import TowerConfig
from shared.model.towers import TwoTowerModel
from training.data import MovieLens
from training.dataset import MIN_POSITIVES, POSITIVE_RATING, build_timelines, split
from training.ease import select_ease
from training.evaluate import (
    Catalog,
    ItemKNNScorer,
    ModelScorer,
    PopularityScorer,
    evaluate,
    format_spread_table,
    format_table,
)
from training.export import export
from training.replicates import SASREC_CODE, TWO_TOWER_CODE, cached_run, run_key, spread
from training.sasrec import SASRecConfig, SASRecScorer, train_sasrec
from training.train import SELECTION_METRIC, TrainConfig, train

DEFAULT_SEEDS = 3
SPLITS = ("validation", "test")
# SASRec as chosen on validation (max_len 50 over 200; lr 2e-3 over 1e-3), epochs by early stopping.
SASREC = SASRecConfig(max_len=50, learning_rate=2e-3, dropout=0.2, max_epochs=35, patience=10)

logger = logging.getLogger(__name__)

# Sized for MovieLens-100K (943 users, 1,682 movies) and a 2-core CPU: hash tables a few times the id
# counts (2 hashes each, so a pair of rows almost never collides), D = 64, the last 16 events.
# MovieLens has no authors: one real author row (never used, author ids are all 0 = padding).
MOVIELENS_TOWER = TowerConfig(
    emb_dim=64,
    history_len=16,  # chosen on validation: 16 > 24 > 32 > 48 > 64 > 100 with mean pooling
    user_vocab_size=4_096,
    post_vocab_size=8_192,
    author_vocab_size=2,
    num_user_features=3,
    user_feature_vocab_size=256,
    num_layers=2,
    num_q_heads=2,
    num_kv_heads=2,
    head_dim=32,
    causal=True,  # the dense objective reads every prefix's embedding from one pass
)


def run(
    data: MovieLens,
    out: str | Path,
    tower: TowerConfig = MOVIELENS_TOWER,
    cfg: TrainConfig | None = None,
    progress: bool = True,
    seeds: int = DEFAULT_SEEDS,
    cache_dir: str | Path | None = None,
    sasrec: SASRecConfig | None = SASREC,
) -> dict:
    """Train, evaluate against the baselines on validation and test, export; returns the metrics.

    seeds: the served model is cfg.seed; seeds - 1 more seeds of it (and `seeds` of SASRec) give the
    spread, cached in cache_dir (None: no cache). sasrec=None leaves SASRec out.
    """
    cfg = cfg or TrainConfig()
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
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

    def both_splits(scorer) -> dict[str, dict[str, float]]:
        return {name: evaluate(scorer, s, getattr(s, name), catalog) for name in SPLITS}

    model = TwoTowerModel(tower)
    result = train(model, s, catalog, cfg, progress=progress)
    served = both_splits(ModelScorer(model, catalog))
    runs: dict[str, list[dict]] = {
        "two-tower": [
            {"seed": cfg.seed, **served, "best_epoch": result.best_epoch, "seconds": result.seconds}
        ]
    }
    for extra in range(1, seeds):
        seed_cfg = dataclasses.replace(cfg, seed=cfg.seed + extra)

        def two_tower_run(seed_cfg: TrainConfig = seed_cfg) -> dict:
            replica = TwoTowerModel(tower)
            r = train(replica, s, catalog, seed_cfg, progress=progress)
            return {"seed": seed_cfg.seed, **both_splits(ModelScorer(replica, catalog)),
                    "best_epoch": r.best_epoch, "seconds": r.seconds}  # fmt: skip

        config = {"tower": tower.to_dict(), "train": seed_cfg.to_dict()}
        key = run_key("two-tower", data.digests, config, seed_cfg.seed, TWO_TOWER_CODE)
        runs["two-tower"].append(cached_run(cache_dir, "two-tower", key, two_tower_run))
    if sasrec is not None:
        runs["SASRec"] = []
        for seed in range(seeds):
            seed_cfg = dataclasses.replace(sasrec, seed=seed)

            def sasrec_run(seed_cfg: SASRecConfig = seed_cfg) -> dict:
                logger.info("training SASRec, seed %d (cached afterwards)", seed_cfg.seed)
                m, r = train_sasrec(s, catalog, seed_cfg, progress=progress)
                return {"seed": seed_cfg.seed, **both_splits(SASRecScorer(m, catalog)),
                        "best_epoch": r.best_epoch, "seconds": r.seconds}  # fmt: skip

            key = run_key("sasrec", data.digests, seed_cfg.to_dict(), seed, SASREC_CODE)
            runs["SASRec"].append(cached_run(cache_dir, "sasrec", key, sasrec_run))
    ease, lambda_scores = select_ease(s, catalog)
    for scorer in (ease, ItemKNNScorer(s, catalog), PopularityScorer(s, catalog)):
        runs[scorer.name] = [both_splits(scorer)]

    results = {name: {model_name: r[0][name] for model_name, r in runs.items()} for name in SPLITS}
    spreads = {
        name: {model_name: spread([x[name] for x in r]) for model_name, r in runs.items()} for name in SPLITS
    }
    print(format_table(results), flush=True)
    print(f"mean ± std over seeds (two-tower, SASRec: {seeds}; the others are deterministic)")
    print(format_spread_table(spreads), flush=True)
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
        "spread": spreads,
        "runs": runs,
        "baselines": {
            "EASE": {
                "lambda": ease.lam,
                "validation_score_by_lambda": {str(k): v for k, v in lambda_scores.items()},
            },
            "SASRec": sasrec.to_dict() if sasrec is not None else None,
        },
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
