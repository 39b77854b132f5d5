"""Intra-op threads sized to each batch's work, on the CPU. No grpc import.

torch runs every op on as many threads as the machine has cores, whatever the op's size. For the small
ops of a serving path that is a loss: each parallel region wakes sleeping threads (about 0.1 ms each on
the 2-core machine this project is measured on), and the threads compete with the process's own event
loop and gRPC threads and with the other services on the host. Measured there (docs/decisions.md):
EncodeUsers for one MovieLens user took 11-14 ms p50 with torch's 2 threads and 6.1 ms with one, and
at c=64 one thread served 13% more calls; a scan of 1M x 128 rows, on the other hand, is 1.5-1.8x
faster on two threads. So each batch asks for the threads its largest op pays for: one per
WORK_PER_THREAD multiply-adds, at least one, at most the limit.

The limit (`--torch-threads`) defaults to torch's own thread count (the cores, or OMP_NUM_THREADS when
set) capped by the CPUs this process may use: its affinity mask, and the cgroup's CPU quota where one
is set (a Kubernetes CPU limit), which torch itself does not read.

`torch.set_num_threads` set from a worker thread applies to that thread's later ops (OpenMP and MKL
keep the count per thread), costs under a microsecond, and is only called when the count changes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

# Multiply-adds of one op that pay for one more thread (~1 ms of one core of the measuring machine).
WORK_PER_THREAD = 1 << 22
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cpus(cpu_max: Path = _CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: the affinity mask, capped by the cgroup v2 CPU quota if any."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or one we do not understand: the affinity
        pass
    return max(1, cpus)


def default_limit() -> int:
    """torch's thread count (OMP_NUM_THREADS if set, else the cores), at most usable_cpus()."""
    return max(1, min(torch.get_num_threads(), usable_cpus()))


class IntraOpThreads:
    """The process's policy: `configure` once at start-up, `use_for(work)` before each batch, in the
    thread that computes it."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit or default_limit()

    def configure(self, limit: int | None) -> None:
        """limit: most threads one batch may use (None: default_limit())."""
        if limit is not None and limit < 1:
            raise ValueError(f"torch threads must be >= 1, got {limit}")
        self.limit = limit or default_limit()

    def threads_for(self, work: int) -> int:
        """Threads for an op of `work` multiply-adds."""
        return max(1, min(self.limit, work // WORK_PER_THREAD))

    def use_for(self, work: int) -> int:
        """Set this thread's torch intra-op threads for an op of `work` multiply-adds; returns them."""
        n = self.threads_for(work)
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n


INTRA_OP = IntraOpThreads()
