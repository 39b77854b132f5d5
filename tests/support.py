"""Helpers for tests that start real services as subprocesses on loopback.

A service started with `--port 0 --port-file F` binds any free port and writes it to F once it listens;
`ServiceProcess` waits for that file and then for grpc.health.v1 SERVING, with bounded timeouts, and
always stops the process (SIGTERM, then SIGKILL) when the test ends. A service that serves TLS is
probed with the `tls` client settings given to `ServiceProcess`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.tls import ClientTLS, sync_channel
from twotower_cli.stack import terminate

REPO_ROOT = Path(__file__).resolve().parents[1]


def health_status(
    address: str, service: str = "", timeout: float = 1.0, tls: ClientTLS | None = None
) -> int | None:
    """The health status of `service` at `address`, or None if it does not answer."""
    try:
        with sync_channel(address, (), tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
    except grpc.RpcError:
        return None


class ServiceProcess:
    def __init__(
        self,
        module: str,
        args: list[str],
        tmp_dir: Path,
        name: str | None = None,
        *,
        tls: ClientTLS | None = None,
    ) -> None:
        """`args` may repeat `--port N` to bind a fixed port (the last --port wins), e.g. on a restart."""
        self.name = name or module
        self.tls = tls  # client settings for health probes of a TLS server
        self.port_file = tmp_dir / f"{self.name}.port"
        self.log_path = tmp_dir / f"{self.name}.log"
        self.port_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0",
             "--port-file", str(self.port_file), *args],
            cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.port: int | None = None

    @property
    def address(self) -> str:
        assert self.port is not None, "service has not reported its port yet"
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_port(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if self.port_file.exists() and self.port_file.read_text().strip():
                self.port = int(self.port_file.read_text())
                return self.port
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not report a port within {timeout}s:\n{self.log()}")

    def wait_serving(self, timeout: float = 60.0) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        if self.port is None:
            self.wait_port(timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if health_status(self.address, tls=self.tls) == health_pb2.HealthCheckResponse.SERVING:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not SERVING within {timeout}s:\n{self.log()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> int:
        """SIGKILL (a crash: no shutdown code runs) and reap; returns the exit code."""
        self.signal(signal.SIGKILL)
        return self.proc.wait(10)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        code = terminate(self.proc, timeout)
        self._log.close()
        return code
