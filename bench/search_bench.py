"""Benchmark: one `CorpusIndex.search` as the gateway makes it for a MovieLens request, in process.

A synthetic corpus of the MovieLens size (1,682 x 64 fp32 unit vectors, two short attributes per item),
queries of one user each with `--exclusions` excluded posts (a 128-event history) and k=100: the host
work around a small product (masks, the top-k and its tie check, the hits' columns and attributes) is
most of the time here, which index_bench's large random corpora without exclusions do not show.
Prints the median and mean ms per search; compare two commits back to back (a git worktree).

    .venv/bin/python bench/search_bench.py
    .venv/bin/python bench/search_bench.py --n 100000 --batch 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from bench.index_bench import timed  # noqa: E402
from retrieval_gateway.index import CorpusIndex, Query  # noqa: E402

FP = "search-bench"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1682)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch", type=int, default=1, help="queries per search")
    p.add_argument("--exclusions", type=int, default=128, help="excluded posts per query")
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    matrix = torch.nn.functional.normalize(
        torch.from_numpy(rng.standard_normal((args.n, args.dim))).float(), dim=1
    )
    attrs = [{"title": f"Movie {i}", "year": str(1950 + i % 50)} for i in range(args.n)]
    index = CorpusIndex(torch.device("cpu"), "fp32")
    index.load_snapshot(
        1, FP, np.arange(1, args.n + 1, dtype=np.int64), np.arange(args.n, dtype=np.int64) % 97, matrix, attrs
    )
    batches = []
    for _ in range(50):
        batch = []
        for _ in range(args.batch):
            excluded = rng.choice(args.n, min(args.exclusions, args.n), replace=False).astype(np.int64) + 1
            vector = torch.nn.functional.normalize(
                torch.from_numpy(rng.standard_normal(args.dim)).float(), dim=0
            )
            batch.append(Query(vector, FP, args.k, exclude_post_ids=excluded))
        batches.append(batch)
    at = iter(range(1 << 62))
    times = timed(
        lambda: index.search(batches[next(at) % len(batches)]), torch.device("cpu"), 200, args.seconds
    )
    ms = np.asarray(times) * 1e3
    print(
        f"CorpusIndex.search, {args.n:,} x {args.dim} fp32 with attributes, B={args.batch}, k={args.k}, "
        f"{args.exclusions} exclusions per query: median {np.median(ms):.3f} ms, mean {ms.mean():.3f} ms "
        f"({len(ms)} calls)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
