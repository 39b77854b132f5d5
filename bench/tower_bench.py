"""Benchmark: the user tower in process, by CPU runtime (eager, ONNX Runtime, torch.compile).

`UserEncoder.encode` (featurize + forward) for batches of users, run back to back and with an idle
gap before each call (what a service sees between requests at low load: caches and the core have
gone cold), p50 over many calls. Models: the MovieLens checkpoint when its artifacts exist, and the
default TowerConfig (random weights). Runtimes are measured one after the other in the same process,
so the ratio against eager is the figure to read.

    .venv/bin/python bench/tower_bench.py [--quick] [--runtimes eager onnx compile]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.fspath(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, machine_info, write_json
from shared.model.checkpoint import load_checkpoint, random_model, save_checkpoint
from shared.model.config import TowerConfig
from shared.model.features import UserContext
from shared.progress import print_above
from shared.threads import INTRA_OP
from user_service.config import CPU_TOWERS
from user_service.encoder import UserEncoder

MOVIELENS = Path(__file__).resolve().parents[1] / "artifacts" / "movielens" / "checkpoint"


def users(cfg: TowerConfig, n: int, history: int, seed: int = 0) -> list[UserContext]:
    rng = np.random.default_rng(seed)
    return [
        UserContext(
            user_id=int(rng.integers(1, 1 << 40)),
            post_ids=rng.integers(1, 1 << 40, history, dtype=np.int64),
            author_ids=rng.integers(0, 1 << 40, history, dtype=np.int64),
            actions=rng.random((history, cfg.num_actions)) < 0.2,
            surfaces=rng.integers(0, cfg.num_product_surfaces, history, dtype=np.int64),
            user_features=tuple(int(v) for v in rng.integers(1, 1 << 40, cfg.num_user_features)),
        )
        for _ in range(n)
    ]


def p50_ms(encoder: UserEncoder, batches: list[list[UserContext]], calls: int, gap_s: float) -> float:
    for batch in batches[:5]:
        encoder.encode(batch)
    times = []
    for i in range(calls):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        encoder.encode(batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer calls per cell")
    p.add_argument("--runtimes", nargs="+", default=["eager", "onnx"], choices=CPU_TOWERS)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--history", type=int, default=128, help="events per user (the tower keeps the last S)")
    p.add_argument("--gap-ms", type=float, default=5.0, help="idle time before each call of the gap column")
    p.add_argument("--out", type=Path, default=RESULTS / "tower_bench.json")
    args = p.parse_args(argv)
    calls = 60 if args.quick else 300
    rows = []
    with tempfile.TemporaryDirectory(prefix="tower_bench_") as tmp:
        models = {"default (random)": Path(tmp) / "default"}
        save_checkpoint(random_model(TowerConfig(), seed=0), models["default (random)"])
        if MOVIELENS.exists():
            models = {"movielens": MOVIELENS, **models}
        for name, path in models.items():
            loaded = load_checkpoint(path)
            cfg = loaded.config
            for runtime in args.runtimes:
                encoder = UserEncoder.from_loaded(
                    loaded, torch.device("cpu"), torch.float32, max(1024, args.history), 0, runtime,
                    Path(tmp) / "tower-cache",
                )  # fmt: skip
                t0 = time.perf_counter()
                encoder.warm_up([1, *args.batches])
                ready_s = time.perf_counter() - t0
                for b in args.batches:
                    batches = [users(cfg, b, args.history, seed) for seed in range(8)]
                    n = max(10, calls // max(1, b // 8))
                    row = {
                        "model": name, "runtime": encoder.runtime, "asked": runtime, "batch": b,
                        "ready_s": ready_s, "threads": INTRA_OP.threads_for(b * (1 + cfg.history_len)
                                                                             * cfg.emb_dim * cfg.ffn_dim),
                        "p50_ms": p50_ms(encoder, batches, n, 0.0),
                        "p50_after_gap_ms": p50_ms(encoder, batches, n, args.gap_ms / 1000),
                    }  # fmt: skip
                    rows.append(row)
                    print_above(
                        f"  {name:17} {encoder.runtime:8} B={b:3}: {row['p50_ms']:7.2f} ms back to back, "
                        f"{row['p50_after_gap_ms']:7.2f} ms after a {args.gap_ms:g} ms gap"
                    )
    print("\nuser tower in process, p50 ms (ratio to eager):")
    for row in rows:
        same = [r for r in rows if (r["model"], r["batch"]) == (row["model"], row["batch"])]
        eager = next((r for r in same if r["runtime"] == "eager"), None)
        ratio = f"{eager['p50_ms'] / row['p50_ms']:.2f}x" if eager else "-"
        print(
            f"  {row['model']:17} {row['runtime']:8} B={row['batch']:3}: {row['p50_ms']:7.2f} / gap "
            f"{row['p50_after_gap_ms']:7.2f}   ({ratio} back to back; ready in {row['ready_s']:.1f} s)"
        )
    write_json(args.out, {"benchmark": "user tower in process", "history": args.history,
                          "gap_ms": args.gap_ms, "rows": rows, "host": machine_info()})  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
