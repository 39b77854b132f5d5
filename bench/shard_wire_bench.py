"""Benchmark (issue 15): a shard's answer on the wire, in process. Building it on the shard and reading
it on the router, as columns (ShardHitColumns, what shards send) against one message per hit (the
previous release's form, which routers still read), in the same run, B queries x k hits, items
without attributes and with two short ones (a title and a kind). Then a shard's whole answer (its
index's search and the answer built from it), its hits' attributes decoded and encoded again against
passed on as stored.

    .venv/bin/python bench/shard_wire_bench.py            # B=8, k=100
    .venv/bin/python bench/shard_wire_bench.py --batch 32 --k 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval_gateway.index import CorpusIndex, Query, SearchResult
from retrieval_gateway.shard_client import hits_from_response, score_response
from shared.corpus_rows import AttributeColumn
from twotower.v1 import retrieval_gateway_pb2


def per_hit_response(
    results: list[SearchResult], shard_index: int = 0, version: int = 1, fingerprint: str = "m"
) -> retrieval_gateway_pb2.ScoreShardResponse:
    """The previous release's shard answer: one ShardHits per query, one map message per hit."""
    response = retrieval_gateway_pb2.ScoreShardResponse(
        corpus_version=version, model_fingerprint=fingerprint, shard_index=shard_index
    )
    for r in results:
        hits = response.results.add()
        hits.post_ids.extend(r.post_ids.tolist())
        hits.author_ids.extend(r.author_ids.tolist())
        hits.scores.extend(r.scores.tolist())
        add = hits.attributes.add
        for a in r.attributes:
            entry = add()
            if a:
                entry.attributes.update(a)
    return response


def results(batch: int, k: int, attributes: bool, seed: int = 0) -> list[SearchResult]:
    rng = np.random.default_rng(seed)
    kinds = ("video", "photo", "text")
    out = []
    for _ in range(batch):
        posts = rng.integers(1, 1 << 40, k)
        attrs = [
            {"title": f"synthetic item {p}", "kind": kinds[p % 3]} if attributes else {}
            for p in posts.tolist()
        ]
        scores = np.sort(rng.random(k, dtype=np.float32))[::-1].copy()
        out.append(SearchResult(posts, posts % 1000, scores, attrs, version=1, fingerprint="m"))
    return out


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def measure(res: list[SearchResult], reps: int) -> dict[str, tuple[float, float]]:
    """(per-hit messages, columns) ms p50 of building the answer and of reading it back."""
    parse = retrieval_gateway_pb2.ScoreShardResponse.FromString
    old = parse(per_hit_response(res).SerializeToString())
    new = parse(score_response(res, 0, 1, "m").SerializeToString())
    return {
        "build (shard)": (median_ms(lambda: per_hit_response(res), reps),
                          median_ms(lambda: score_response(res, 0, 1, "m"), reps)),
        "read (router)": (median_ms(lambda: hits_from_response(old, len(res)), reps),
                          median_ms(lambda: hits_from_response(new, len(res)), reps)),
    }  # fmt: skip


def shard_answer(batch: int, k: int, items: int, reps: int, seed: int = 0) -> tuple[float, float]:
    """A shard's whole answer, in process, ms p50: its index's search plus score_response, the hits'
    attributes decoded into maps and encoded again as JSON (what shards did) against passed on as
    stored (CorpusIndex.search(encoded=True), what they do). Items with two attributes each."""
    rng = np.random.default_rng(seed)
    dim = 64
    posts = rng.permutation(items).astype(np.int64) * 7919 + 1
    kinds = ("video", "photo", "text")
    attrs = AttributeColumn.encode(
        {"title": f"synthetic item {p}", "kind": kinds[p % 3]} for p in posts.tolist()
    )
    index = CorpusIndex("cpu")
    index.load_snapshot(1, "m", posts, posts % 1000, torch.randn(items, dim), attrs, copy=False)
    queries = [Query(torch.randn(dim), "m", k) for _ in range(batch)]

    def answer(encoded: bool) -> object:
        return score_response(index.search(queries, encoded=encoded), 0, 1, "m")

    assert answer(False) == answer(True)
    return median_ms(lambda: answer(False), reps), median_ms(lambda: answer(True), reps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--items", type=int, default=50_000, help="the shard's corpus for its whole answer")
    args = p.parse_args(argv)
    print(f"{args.batch} queries x {args.k} hits, ms p50 (per-hit messages / columns)")
    for attributes in (False, True):
        what = "two attributes per item" if attributes else "no attributes"
        for step, (a, b) in measure(results(args.batch, args.k, attributes), args.reps).items():
            print(f"  {what:24s} {step}: {a:6.3f} / {b:6.3f} ms  ({a / b:.1f}x)")
    a, b = shard_answer(args.batch, args.k, args.items, max(20, args.reps // 10))
    print(
        f"shard's search + answer over {args.items:,} items with two attributes each, ms p50 (attributes "
        f"decoded and encoded again / passed on as stored): {a:6.3f} / {b:6.3f} ms  (saves {a - b:.3f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
