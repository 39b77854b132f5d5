"""Benchmark: host memory of the gateway's corpus per item, this design against the old one.

N items x D bf16 embeddings with short attributes ({"title": "movie <id>"}), each (design, N) in a
fresh process so that its RSS is its own; one process at a time.

- `rows` (this design): a CorpusIndex loaded the way the follower loads it: embeddings staged in
  bf16, attributes encoded chunk by chunk (shared.corpus_rows.AttributeColumnBuilder), everything
  handed to `load_snapshot(..., copy=False)`.
- `dicts` (the old design, modelled): what CorpusIndex kept before: the same bf16 matrix, numpy id
  and author columns, a torch copy of the post ids (tie order), a dict post id -> row and one dict
  per item's attributes (keys as fresh strings, as protobuf map decoding makes them). Its snapshot
  path staged the embeddings in the wire's fp32 and kept the list of dicts while building.

Per row: RSS after imports (base), RSS once loaded (steady), bytes per item beyond the matrix
((steady - base - matrix bytes) / N), the same less the encoded attribute bytes (the issue's budget:
<= 64), and the peak RSS while a second snapshot of the same size is built aside and swapped in
(VmHWM after resetting it through /proc/self/clear_refs; a sampling thread where that is refused).
Peak/steady is given for the whole process and for the corpus alone (RSS less the base).

    .venv/bin/python bench/memory_bench.py            # 1M x 64
    .venv/bin/python bench/memory_bench.py --full     # 1M and 10M x 64 (about 10 GB at the peak)

Writes results/memory_bench.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from bench.common import machine_info, write_json  # noqa: E402
from shared.progress import print_above, progress_over  # noqa: E402

FP = "memory-bench"
CHUNK = 16_384  # rows per snapshot chunk: ~4 MiB at D=64 fp32, candidate_service's chunk size
MIB = 1 << 20


def _trimmed_rss() -> int:
    """RSS after handing glibc's free heap memory back (malloc_trim): the memory the corpus holds,
    not what earlier temporaries left in the allocator's free lists."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS as it is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak RSS over a block: VmHWM reset through clear_refs, else sampled every millisecond."""

    def __enter__(self) -> PeakRSS:
        self.peak = _status_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._sampler = None
        except OSError:
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _status_bytes("VmRSS"))

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            self.peak = max(self.peak, _status_bytes("VmHWM"))
        else:
            self._stop.set()
            self._sampler.join()
        self.method = "VmHWM" if self._sampler is None else "sampled"


def _ids(n: int, seed: int) -> np.ndarray:
    """n distinct post ids in random order (sparse, as real ids are)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(1, 1 << 40, n + 4096))  # ~n^2 / 2^41 collisions: a few at 10M
    if len(ids) < n:
        raise RuntimeError("not enough distinct ids drawn")
    return ids[rng.permutation(len(ids))[:n]]


def _chunks(n: int, dim: int, seed: int):
    """(lo, hi, fp32 embeddings) per chunk, as the wire delivers them."""
    rng = np.random.default_rng(seed + 1)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        yield lo, hi, rng.standard_normal((hi - lo, dim), dtype=np.float32)


# ---- the designs, each building one snapshot as its follower path did ---------------------------


def _load_rows(index, version: int, post_ids: np.ndarray, dim: int, seed: int) -> None:
    import torch

    from shared.corpus_rows import AttributeColumnBuilder

    n = len(post_ids)
    author_ids = post_ids % 100_003
    staged = torch.empty(n, dim, dtype=torch.bfloat16)
    attrs = AttributeColumnBuilder(n)
    for lo, hi, emb in _chunks(n, dim, seed):
        staged[lo:hi] = torch.from_numpy(emb).bfloat16()
        attrs.extend({"title": f"movie {p}"} for p in post_ids[lo:hi].tolist())
    index.load_snapshot(version, FP, post_ids, author_ids, staged, attrs.finish(), copy=False)


class _OldCorpus:
    """The old CorpusIndex's bookkeeping for one snapshot (row_of dict, one dict per item)."""

    def __init__(self, post_ids: np.ndarray, dim: int, seed: int) -> None:
        import torch

        n = len(post_ids)
        staged = torch.empty(n, dim)  # the old assembler staged the wire's fp32
        attributes: list[dict[str, str]] = []
        key = "title "
        for lo, hi, emb in _chunks(n, dim, seed):
            staged[lo:hi] = torch.from_numpy(emb)
            # key[:5] is a fresh str per item, as dict(ScalarMap) makes them
            attributes.extend({key[:5]: f"movie {p}"} for p in post_ids[lo:hi].tolist())
        # The old load_snapshot built its corpus while the follower's assembler still held the fp32
        # staging and the list of dicts; both went only when it returned (here: with __init__).
        self.matrix = staged.to(torch.bfloat16)
        self.post_ids_dev = torch.from_numpy(post_ids).clone()
        self.post_ids = post_ids
        self.author_ids = post_ids % 100_003
        self.attributes = list(attributes)
        self.row_of = dict(zip(post_ids.tolist(), range(n), strict=True))


def worker(design: str, n: int, dim: int, swap: bool) -> dict:
    import torch

    from retrieval_gateway.index import CorpusIndex, Query

    # Warm up torch's kernels and allocator on a tiny corpus, so the base includes them.
    warm = CorpusIndex("cpu", "bf16")
    warm.load_snapshot(1, FP, np.arange(1, 65), np.zeros(64, np.int64), torch.randn(64, dim), [{}] * 64)
    warm.search([Query(torch.randn(dim), FP, 5)])
    del warm
    base = _trimmed_rss()
    out: dict = {"design": design, "n": n, "dim": dim, "base_rss": base, "matrix_bytes": n * dim * 2}

    t0 = time.perf_counter()
    if design == "rows":
        index = CorpusIndex("cpu", "bf16")
        _load_rows(index, 1, _ids(n, 1), dim, seed=1)
        rows = index._corpus.rows
        out["attribute_bytes"] = rows.attribute_bytes_used
        out["rows_nbytes"] = rows.nbytes
        del rows  # or the swap below would keep the old rows alive
        hits = index.search([Query(torch.randn(dim), FP, 10)])[0].hits
        assert len(hits) == 10 and hits[0].attributes["title"].startswith("movie ")
    else:
        corpus = _OldCorpus(_ids(n, 1), dim, seed=1)
        digits = np.floor(np.log10(corpus.post_ids)).astype(np.int64) + 1
        out["attribute_bytes"] = int(digits.sum()) + len("title" + "movie ") * n  # UTF-8 of keys and values
    out["load_s"] = time.perf_counter() - t0
    gc.collect()
    out["steady_rss_untrimmed"] = _status_bytes("VmRSS")
    out["steady_rss"] = _trimmed_rss()

    if swap:
        ids = _ids(n, 2)  # drawn outside the window: the bench's temporaries are not the design's
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            if design == "rows":
                _load_rows(index, 2, ids, dim, seed=2)
            else:
                new = _OldCorpus(ids, dim, seed=2)
                corpus, new = new, None
            gc.collect()
        out["swap_s"] = time.perf_counter() - t0
        out["swap_peak_rss"], out["peak_method"] = peak.peak, peak.method
        out["after_swap_rss"] = _trimmed_rss()
    return out


# ---- the parent: one worker process at a time, then the table ----------------------------------


def run_worker(design: str, n: int, dim: int, swap: bool, timeout_s: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", design, "--n", str(n), "--dim", str(dim)]
    if not swap:
        cmd.append("--no-swap")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{design} worker at n={n} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def derive(r: dict) -> dict:
    corpus = r["steady_rss"] - r["base_rss"]
    beyond = (corpus - r["matrix_bytes"]) / r["n"]
    r["bytes_per_item_beyond_matrix"] = beyond
    r["bytes_per_item_beyond_matrix_and_attributes"] = beyond - r["attribute_bytes"] / r["n"]
    if "swap_peak_rss" in r:
        r["peak_over_steady_process"] = r["swap_peak_rss"] / r["steady_rss"]
        r["peak_over_steady_corpus"] = (r["swap_peak_rss"] - r["base_rss"]) / corpus
    return r


def table(rows: list[dict]) -> str:
    head = (
        "| items | design | matrix MiB | steady RSS MiB (corpus) | B/item beyond matrix | "
        "same less attributes | swap peak MiB | peak/steady process (corpus) | load s |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        peak = "-"
        ratio = "-"
        if "swap_peak_rss" in r:
            peak = f"{r['swap_peak_rss'] / MIB:,.0f}"
            ratio = f"{r['peak_over_steady_process']:.2f}x ({r['peak_over_steady_corpus']:.2f}x)"
        lines.append(
            f"| {r['n']:,} | {r['design']} | {r['matrix_bytes'] / MIB:,.0f} | "
            f"{r['steady_rss'] / MIB:,.0f} ({(r['steady_rss'] - r['base_rss']) / MIB:,.0f}) | "
            f"{r['bytes_per_item_beyond_matrix']:.0f} | "
            f"{r['bytes_per_item_beyond_matrix_and_attributes']:.0f} | "
            f"{peak} | {ratio} | {r['load_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="add the 10M-item level (about 10 GB at the peak)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--levels", type=int, nargs="*", help="item counts (default: 1M, plus 10M with --full)")
    p.add_argument(
        "--old-swap-max",
        type=int,
        default=2_000_000,
        help="measure the old design's swap peak only up to this size (it needs ~3x its steady RSS)",
    )
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per worker process")
    p.add_argument("--out", default=str(REPO / "results" / "memory_bench.json"))
    p.add_argument("--worker", choices=["rows", "dicts"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-swap", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()  # fmt: skip

    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.dim, not args.no_swap)))
        return 0

    levels = args.levels or ([1_000_000, 10_000_000] if args.full else [1_000_000])
    results = []
    cells = [(n, design) for n in levels for design in ("rows", "dicts")]
    for n, design in progress_over(cells, "memory levels", unit="level"):
        swap = design == "rows" or n <= args.old_swap_max
        print_above(f"{design} at {n:,} x {args.dim} bf16 ...", file=sys.stderr)
        results.append(derive(run_worker(design, n, args.dim, swap, args.timeout_s)))
    text = table(results)
    print(text)
    path = write_json(
        Path(args.out),
        {
            "bench": "memory_bench",
            "machine": machine_info(),
            "dim": args.dim,
            "results": results,
            "table": text,
        },
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
