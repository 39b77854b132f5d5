"""Benchmark: what an ONNX export of the user tower costs the requests served meanwhile.

A new model on a CPU user_service (its first start, a LoadModel during a rollout) is exported to ONNX
(user_service/onnx_tower.py). This measures one-user `UserEncoder.encode` calls of a model already
serving (ONNX Runtime tower, a call every 5 ms, as a lightly loaded service sees them) while another
thread exports a second model, both ways, in the same process, one after the other:

- in process: `onnx_export.export_in_process` on the calling thread (the exporter holds the GIL for
  much of its seconds of tracing and graph rewriting);
- child: `onnx_tower.export_dense_tower`, which runs the same export in a child process.

It reports each way's export time and the serving calls' p50 / p99 / max during it, with the same
calls measured while nothing is exported as the reference.

    .venv/bin/python bench/export_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.fspath(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, machine_info, write_json
from bench.tower_bench import MOVIELENS, users
from shared.model.checkpoint import load_checkpoint, random_model
from shared.model.config import TowerConfig
from shared.model.features import featurize_users
from user_service import onnx_export, onnx_tower
from user_service.encoder import UserEncoder


def serve_while(encoder: UserEncoder, work: Callable[[], None] | None, idle_s: float, gap_s: float) -> dict:
    """Encode one user every gap_s until `work` (run on another thread) returns, or for idle_s."""
    batches = [users(encoder.config, 1, 128, seed) for seed in range(8)]
    done = threading.Event()
    elapsed = [0.0]

    def run() -> None:
        t0 = time.perf_counter()
        try:
            if work is not None:
                work()
            else:
                time.sleep(idle_s)
        finally:
            elapsed[0] = time.perf_counter() - t0
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    times = []
    while not done.is_set():
        t0 = time.perf_counter()
        encoder.encode(batches[len(times) % len(batches)])
        times.append(time.perf_counter() - t0)
        time.sleep(gap_s)
    thread.join()
    ms = np.asarray(times) * 1e3
    p50, p99 = (round(float(v), 2) for v in np.percentile(ms, [50, 99]))
    return {"seconds": round(elapsed[0], 2), "calls": len(times), "p50_ms": p50, "p99_ms": p99,
            "max_ms": round(float(ms.max()), 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a shorter idle reference")
    p.add_argument("--gap-ms", type=float, default=5.0, help="idle time between serving calls")
    p.add_argument("--out", type=Path, default=RESULTS / "export_bench.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    serving = load_checkpoint(MOVIELENS).model if MOVIELENS.exists() else random_model(TowerConfig(), seed=0)
    encoder = UserEncoder(serving, "0" * 16, torch.device("cpu"), torch.float32, 1024, cpu_tower="onnx")
    encoder.warm_up([1])  # exports the serving model once (not measured), in a child
    new = random_model(TowerConfig(), seed=1).eval()  # the model being loaded
    example = featurize_users(users(new.config, 2, 128), new.config)

    def in_process() -> None:
        with torch.inference_mode():
            inputs = onnx_tower._inputs(new, example)
        onnx_export.export_in_process(new.user_tower, inputs)

    gap = args.gap_ms / 1e3
    rows = {
        "nothing exported": serve_while(encoder, None, 3.0 if args.quick else 10.0, gap),
        "export in process": serve_while(encoder, in_process, 0, gap),
        "export in a child": serve_while(
            encoder, lambda: onnx_tower.export_dense_tower(new, example), 0, gap
        ),
    }
    print(f"\nserving {encoder.runtime} tower ({'MovieLens' if MOVIELENS.exists() else 'default'}), "
          f"one user every {args.gap_ms:g} ms, while a default-config model is exported:")  # fmt: skip
    print(f"  {'':18} | {'export s':>8} | {'calls':>5} | {'p50 ms':>7} | {'p99 ms':>7} | {'max ms':>7}")
    for name, r in rows.items():
        secs = "-" if name == "nothing exported" else f"{r['seconds']:.1f}"
        print(f"  {name:18} | {secs:>8} | {r['calls']:5d} | {r['p50_ms']:7.2f} | {r['p99_ms']:7.2f} | "
              f"{r['max_ms']:7.2f}")  # fmt: skip
    write_json(args.out, {"machine": machine_info(), "gap_ms": args.gap_ms, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
