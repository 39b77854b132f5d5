"""Benchmark: candidate_service corpus encoding (items/s) and snapshot streaming (MB/s).

1. Encode: the candidate tower of a random-init checkpoint of the DEFAULT TowerConfig encodes N
   synthetic items (random 48-bit post ids, 30-bit author ids) in-process with ItemEncoder (what the
   service runs) at its default batch size and at a small batch, against the peer: the model's own
   `encode_items` at the default batch. Best of 2-3 runs each; the hashing share is measured apart.
2. Snapshot: a real candidate_service process (subprocess, loopback) holding the same N items streams
   its full snapshot to one watcher; MB/s counts the serialized messages received. The service builds
   its cache on the first start (not timed here; its log has the build throughput).

    .venv/bin/python bench/candidate_bench.py           # full: 1M items
    .venv/bin/python bench/candidate_bench.py --quick   # 100k items, well under a minute

Targets: encode >= 100k items/s on CPU; snapshot >= 300 MB/s. Writes results/candidate_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from candidate_service.config import DEFAULT_ENCODE_BATCH_SIZE  # noqa: E402
from candidate_service.encoder import ItemEncoder  # noqa: E402
from shared.model.checkpoint import load_checkpoint, random_model, save_checkpoint  # noqa: E402
from shared.model.config import TowerConfig  # noqa: E402
from shared.model.features import featurize_items  # noqa: E402
from shared.progress import progress_over  # noqa: E402
from tests.support import health_status  # noqa: E402
from twotower.v1 import candidate_tower_pb2 as pb  # noqa: E402

WATCH = "/twotower.v1.CandidateTower/WatchCorpus"
ENCODE_TARGET, SNAPSHOT_TARGET = 100_000, 300.0


def synthetic_ids(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    post_ids = np.unique(rng.integers(1, 1 << 48, size=int(n * 1.01)))[:n]
    rng.shuffle(post_ids)
    return post_ids.astype(np.int64), rng.integers(0, 1 << 30, size=n).astype(np.int64)


def bench_encode(checkpoint: Path, post_ids: np.ndarray, author_ids: np.ndarray, repeats: int) -> list[dict]:
    """Rows: the service's encoder at its default batch and at a small batch, and the peer: the bare
    model call at the default batch (the ratio shows the encoder's own overhead). The three are
    interleaved, best of `repeats`, so that load from other processes hits them alike."""
    loaded = load_checkpoint(checkpoint)
    n, big, small = len(post_ids), DEFAULT_ENCODE_BATCH_SIZE, 256

    def bare_model() -> None:
        with torch.inference_mode():
            for lo in range(0, n, big):
                features = featurize_items(post_ids[lo : lo + big], author_ids[lo : lo + big], loaded.config)
                loaded.model.encode_items(features).numpy()

    runs = {
        f"ItemEncoder, batch {big}": lambda: ItemEncoder(loaded, big).encode(post_ids, author_ids),
        f"ItemEncoder, batch {small}": lambda: ItemEncoder(loaded, small).encode(post_ids, author_ids),
        f"model.encode_items, batch {big}": bare_model,
    }
    ItemEncoder(loaded, big).encode(post_ids[: 2 * big], author_ids[: 2 * big])  # warm-up
    best = dict.fromkeys(runs, 0.0)
    for _ in progress_over(range(repeats), "encode rounds", unit="round"):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = max(best[name], n / (time.perf_counter() - start))
    rows = [{"what": name, "items_per_s": rate} for name, rate in best.items()]
    start = time.perf_counter()
    for lo in range(0, n, big):
        featurize_items(post_ids[lo : lo + big], author_ids[lo : lo + big], loaded.config)
    rows[0]["featurize_share"] = (time.perf_counter() - start) * rows[0]["items_per_s"] / n
    return rows


def bench_snapshot(work: Path, checkpoint: Path, post_ids: np.ndarray, author_ids: np.ndarray) -> dict:
    items = work / "items.jsonl"
    with items.open("w") as f:
        f.writelines(
            f'{{"post_id": {p}, "author_id": {a}}}\n'
            for p, a in zip(post_ids.tolist(), author_ids.tolist(), strict=True)
        )
    port_file = work / "port"
    log = (work / "candidate.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "candidate_service", "--checkpoint", str(checkpoint), "--items", str(items),
         "--cache-dir", str(work / "cache"), "--port", "0", "--port-file", str(port_file)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "candidate.log").read_text())
            time.sleep(0.05)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        while health_status(address) != 1:  # SERVING
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "candidate.log").read_text())
            time.sleep(0.2)
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        best = None
        for _ in range(3):
            with grpc.insecure_channel(address, options=options) as channel:
                watch = channel.unary_stream(WATCH)  # raw bytes: the client does not parse the chunks
                request = pb.WatchCorpusRequest().SerializeToString()
                received, chunks, start = 0, 0, time.perf_counter()
                stream = watch(request, timeout=600)
                for message in stream:
                    received += len(message)
                    chunks += 1
                    if chunks == 1:
                        num_chunks = pb.CorpusEvent.FromString(message).snapshot_chunk.num_chunks
                    if chunks == num_chunks:
                        break
                seconds = time.perf_counter() - start
                stream.cancel()
            run = {
                "bytes": received,
                "chunks": chunks,
                "seconds": seconds,
                "mb_per_s": received / seconds / 1e6,
            }
            best = run if best is None or run["mb_per_s"] > best["mb_per_s"] else best
        return best
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100k items instead of 1M")
    p.add_argument("--items", type=int, default=None)
    p.add_argument("--out", type=Path, default=REPO / "results" / "candidate_bench.json")
    args = p.parse_args()
    n = args.items or (100_000 if args.quick else 1_000_000)
    post_ids, author_ids = synthetic_ids(n)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = work / "ckpt"
        save_checkpoint(random_model(TowerConfig(), seed=0), checkpoint)
        encode = bench_encode(checkpoint, post_ids, author_ids, repeats=2 if args.quick else 3)
        snapshot = bench_snapshot(work, checkpoint, post_ids, author_ids)
    print(f"\ncandidate_service benchmark: {n:,} items, default TowerConfig, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus")  # fmt: skip
    print(f"{'measure':<50}{'value':>14}{'target':>12}")
    for row in encode:
        print(
            f"{'encode: ' + row['what'] + ' (items/s)':<50}{row['items_per_s']:>14,.0f}{ENCODE_TARGET:>12,}"
        )
    service, small, peer = (row["items_per_s"] for row in encode)
    print(f"{'  ratio ItemEncoder / model.encode_items':<50}{service / peer:>14.2f}")
    print(f"{'  ratio batch ' + str(DEFAULT_ENCODE_BATCH_SIZE) + ' / batch 256':<50}{service / small:>14.2f}")
    print(f"{'  featurizer (hashing) share of encode time':<50}{encode[0]['featurize_share']:>14.0%}")
    print(f"{'snapshot to 1 watcher (MB/s)':<50}{snapshot['mb_per_s']:>14,.0f}{SNAPSHOT_TARGET:>12,.0f}")
    print(f"{'  snapshot size (MB) / chunks':<50}{snapshot['bytes'] / 1e6:>8,.1f} / {snapshot['chunks']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "items": n, "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "encode": encode, "snapshot": snapshot,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
