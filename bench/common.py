"""What the benchmarks share: services as subprocesses on free loopback ports, Prometheus scraping,
RSS sampling, machine info and JSON results.

Services are started exactly as an operator would (`python -m <service> --port 0 --port-file F
--metrics-port P`), each logging to its own file, so the numbers include everything a deployment pays.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from twotower_cli.stack import terminate

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
START_TIMEOUT_S = 300.0  # a 1M-item candidate_service encodes its corpus before it listens
STOP_TIMEOUT_S = 30.0
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (for --metrics-port, which has no port file)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct ports free a moment ago on 127.0.0.1 (all bound at once, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def machine_info() -> dict[str, object]:
    """Where the numbers came from: CPU model and count, load at start, library versions, GPU."""
    import grpc
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grpc": grpc.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def write_json(path: Path, payload: dict) -> Path:
    """Write `payload` (plus a timestamp) as indented JSON, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.write_text(json.dumps(payload, indent=2, default=_json_default))
    return path


def _json_default(obj: object) -> object:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (label sets kept verbatim, as exposed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric_delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def mean_ms(after: dict[str, float], before: dict[str, float], name: str, labels: str = "") -> float | None:
    """Mean of a Prometheus histogram over an interval (two scrapes), in ms; None if nothing observed."""
    count = metric_delta(after, before, f"{name}_count{labels}")
    return metric_delta(after, before, f"{name}_sum{labels}") / count * 1e3 if count else None


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a live process, from /proc/<pid>/status (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process, from /proc/<pid>/stat (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class ServiceProcess:
    """One service as a subprocess: `python -m <module> --port 0 --port-file ... --metrics-port ...`."""

    module: str
    args: list[str]
    workdir: Path
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.module}.log"

    def start(self) -> ServiceProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / f"{self.module}.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(port_file), "--metrics-port", str(self.metrics_port),
               "--log-level", "WARNING", *self.args]  # fmt: skip
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.module} did not listen within {START_TIMEOUT_S:.0f}s")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as page:
            return parse_metrics(page.read().decode())

    def rss(self) -> int | None:
        return None if self.proc is None else rss_bytes(self.proc.pid)

    def cpu(self) -> float | None:
        return None if self.proc is None else cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM (graceful stop), then SIGKILL if it does not exit in time."""
        if self.proc is not None:
            terminate(self.proc, STOP_TIMEOUT_S)


async def wait_serving(service: ServiceProcess, timeout: float = START_TIMEOUT_S) -> float:
    """Poll the standard health service until SERVING; returns the seconds it took."""
    from shared import health

    def check() -> None:
        if service.proc is not None and service.proc.poll() is not None:
            raise RuntimeError(f"{service.module} exited:\n{service.log_tail()}")

    began = time.monotonic()
    if await health.wait_serving(service.address, timeout, check):
        return time.monotonic() - began
    raise TimeoutError(f"{service.module} at {service.address} not SERVING within {timeout:.0f}s")


class RssSampler:
    """Background thread: every `interval_s`, the RSS of each named process, with a phase label."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.25) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.samples: list[dict[str, object]] = []  # {"t": s, "phase": str, name: bytes, ...}
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            row: dict[str, object] = {"t": round(time.monotonic() - self._t0, 3), "phase": self.phase}
            for name, pid in self.pids.items():
                row[name] = rss_bytes(pid)
            self.samples.append(row)
            self._stop.wait(self.interval_s)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per process: MiB at the first and last sample of the measured phases, max, and growth %."""
        out = {}
        measured = [s for s in self.samples if s["phase"] not in ("start", "warmup")] or self.samples
        for name in self.pids:
            values = [s[name] for s in measured if s.get(name)]
            if not values:
                continue
            first, last = values[0] / 2**20, values[-1] / 2**20
            out[name] = {"first_mib": round(first, 1), "last_mib": round(last, 1),
                         "max_mib": round(max(values) / 2**20, 1),
                         "growth_pct": round((last - first) / first * 100, 2) if first else 0.0}  # fmt: skip
        return out
