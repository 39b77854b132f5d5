"""Where a request's host time goes in the running stack: py-spy on the gateway and user_service while
bench/e2e_bench.py drives one concurrency level.

The e2e benchmark runs as a child process; once its stack is SERVING (and a moment of warm-up), py-spy
samples retrieval_gateway and user_service at --rate Hz for --seconds, one thread at a time. The
summary gives, per service, each thread's share of the window and the frames where the sampled
time goes, as milliseconds per request (samples / rate / requests answered in the window, from the
e2e level's QPS). Idle threads (waiting in epoll, on a lock or a queue) are not sampled.

    .venv/bin/python bench/spy_stack.py --corpus movielens                    # this machine
    python3 bench/spy_stack.py --device cuda --out DIR                         # a GPU machine

Needs py-spy (the `bench` extra; bench/gpu_check.sh carries its wheel) and permission to trace the
services (same user, ptrace allowed). Writes spy_<service>.txt (py-spy's raw stacks) and
spy_summary.txt to --out.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("retrieval_gateway", "user_service")
PROJECT = ("retrieval_gateway/", "user_service/", "candidate_service/", "shared/")  # frames worth reading
WARM_UP_S = 3.0


@dataclass(frozen=True)
class Profile:
    """Aggregated py-spy raw stacks: samples per thread, per leaf frame, per frame anywhere on a stack."""

    total: int
    threads: collections.Counter
    leaves: collections.Counter
    inclusive: collections.Counter


def aggregate(raw_lines: list[str]) -> Profile:
    """py-spy `--format raw --threads` lines ("thread (id): name;frame;frame... count") -> Profile."""
    threads: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw_lines:
        line = line.rstrip()
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0]] += n
        leaves[frames[-1]] += n
        for frame in set(frames[1:]):  # a recursive frame counts once per sample
            inclusive[frame] += n
    return Profile(total, threads, leaves, inclusive)


def summary(name: str, profile: Profile, rate: float, requests: float, top: int = 15) -> str:
    """The profile as text, in ms per request."""

    def ms(samples: int) -> str:
        return f"{samples / rate / max(requests, 1.0) * 1e3:7.3f}"

    out = [f"== {name}: {profile.total} samples, {requests:.0f} requests in the window (ms per request)"]
    out += ["threads:"] + [f"  {ms(v)}  {k}" for k, v in profile.threads.most_common(top)]
    out += ["leaf frames:"] + [f"  {ms(v)}  {k}" for k, v in profile.leaves.most_common(top)]
    # The project's own frames below a service's entry points (which hold nearly all of a thread's samples)
    roots = 0.8 * max(profile.threads.values(), default=0)
    ours = [
        (frame, n)
        for frame, n in profile.inclusive.most_common()
        if frame.split("(", 1)[-1].startswith(PROJECT) and n < roots
    ]
    out += ["the project's frames anywhere on the stack:"] + [f"  {ms(v)}  {k}" for k, v in ours[:top]]
    return "\n".join(out)


def service_pids(parent: int) -> dict[str, int]:
    """The services started by the e2e benchmark (children of `parent`), by module name."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid != parent or b"-m" not in cmdline:
            continue
        module = cmdline[cmdline.index(b"-m") + 1].decode()
        if module in SERVICES:
            found[module] = int(entry.name)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="synthetic", choices=["synthetic", "movielens"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=6.0, help="sampling window")
    p.add_argument("--rate", type=float, default=400.0, help="samples per second")
    p.add_argument("--synthetic-items", type=int, default=1_000_000)
    p.add_argument("--py-spy", default=None, help="the py-spy binary (default: on PATH or beside python)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "spy")
    args = p.parse_args(argv)
    spy = args.py_spy or shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists() and not shutil.which(spy):
        print("spy_stack: py-spy not found (pip install py-spy, or --py-spy PATH)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="spy_stack_"))
    level_s = args.seconds + WARM_UP_S + 4.0  # the level outlasts the window
    log = (args.out / "e2e.log").open("w")
    e2e = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "e2e_bench.py"), "--quick", "--corpus", args.corpus,
         "--device", args.device, "--synthetic-items", str(args.synthetic_items),
         "--concurrency", str(args.concurrency), "--seconds", str(level_s), "--baseline-seconds", "1",
         "--workdir", str(work / "e2e"), "--out-dir", str(work / "out")],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while "stack SERVING" not in (args.out / "e2e.log").read_text():
            if e2e.poll() is not None or time.monotonic() > deadline:
                print("spy_stack: the stack did not start; see e2e.log", file=sys.stderr)
                return 1
            time.sleep(0.5)
        time.sleep(WARM_UP_S)
        pids = service_pids(e2e.pid)
        spies = {}
        for name, pid in pids.items():
            raw = str(args.out / f"spy_{name}.txt")
            cmd = [spy, "record", "-p", str(pid), "-d", str(int(args.seconds)), "-r", str(int(args.rate)),
                   "-f", "raw", "-o", raw, "--threads", "--nonblocking"]  # fmt: skip
            spies[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for s in spies.values():
            s.wait(timeout=args.seconds + 60)
        e2e.wait(timeout=level_s + 120)
    finally:
        if e2e.poll() is None:
            e2e.terminate()
            e2e.wait(timeout=30)
        log.close()
    text = (args.out / "e2e.log").read_text()
    qps = _level_qps(text)
    parts = [
        f"e2e: {args.corpus}, {args.device}, c={args.concurrency}, {qps:.1f} QPS; window {args.seconds:.0f} s"
    ]
    for name in SERVICES:
        raw = args.out / f"spy_{name}.txt"
        if raw.exists():
            parts.append(
                summary(name, aggregate(raw.read_text().splitlines()), args.rate, qps * args.seconds)
            )
    (args.out / "spy_summary.txt").write_text("\n\n".join(parts) + "\n")
    print("\n\n".join(parts))
    return 0


def _level_qps(e2e_log: str) -> float:
    """The QPS of the (one) stack level in e2e_bench's output, 0 when absent."""
    for line in e2e_log.splitlines():
        if line.strip().startswith("stack") and "QPS" in line:
            return float(line.split(":", 1)[1].split("QPS")[0])
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
