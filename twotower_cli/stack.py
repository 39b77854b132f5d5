"""`make run-stack`: start candidate_service, user_service and retrieval_gateway on loopback, wait until
each reports SERVING, say where they listen and how to query them, stay in the foreground, and stop all
three cleanly on Ctrl-C (or when any of them dies). Each service logs to its own file."""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.health import serving_status

SERVICES = ("candidate_service", "user_service", "retrieval_gateway")


@dataclass
class Managed:
    name: str
    port: int
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()  # the child holds its own descriptor

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout)


def terminate(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM (a service's graceful stop), then SIGKILL if it has not exited within `timeout` s;
    returns the exit code (at once if it had already exited). Benchmarks and tests stop services so too."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


class StackError(Exception):
    pass


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_serving(services: list[Managed], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(services)
    while pending:
        for svc in list(pending):
            code = svc.exited()
            if code is not None:
                raise StackError(f"{svc.name} exited with code {code} while starting; log {svc.log_path}:\n"
                                 f"{svc.log_tail()}")  # fmt: skip
            if serving_status(svc.address, timeout=1.0) == "SERVING":
                print(f"  {svc.name:<18} SERVING on {svc.address}", flush=True)
                pending.remove(svc)
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            raise StackError(
                f"not SERVING within {timeout:.0f}s: {names} (see their logs in {pending[0].log_path.parent})"
            )
        time.sleep(0.2)


def build(args: argparse.Namespace) -> list[Managed]:
    py, logs = sys.executable, Path(args.log_dir)
    common = ["--host", "127.0.0.1", "--log-level", args.log_level]
    candidate = Managed("candidate_service", args.candidate_port, [
        py, "-m", "candidate_service", *common, "--port", str(args.candidate_port),
        "--checkpoint", args.checkpoint, "--items", args.items, "--cache-dir", args.cache_dir,
    ], logs / "candidate_service.log")  # fmt: skip
    user = Managed("user_service", args.user_port, [
        py, "-m", "user_service", *common, "--port", str(args.user_port), "--checkpoint", args.checkpoint,
        "--device", args.device,
        # the models it holds, recorded: `twotower rollout` needs it, and a restart keeps the rolled-out one
        "--state-file", str(Path(args.cache_dir) / "user_service" / "state.json"),
    ], logs / "user_service.log")  # fmt: skip
    gateway = Managed("retrieval_gateway", args.gateway_port, [
        py, "-m", "retrieval_gateway", *common, "--port", str(args.gateway_port),
        "--user-service", user.address, "--candidate-service", candidate.address, "--device", args.device,
    ], logs / "retrieval_gateway.log")  # fmt: skip
    return [candidate, user, gateway]


def run(args: argparse.Namespace) -> int:
    for path in (args.checkpoint, args.items):
        if not Path(path).exists():
            raise StackError(f"{path} not found: run `make train` first (make run-stack does it for you)")
    services = build(args)
    taken = [f"{s.name} port {s.port}" for s in services if not port_is_free(s.port)]
    if taken:
        raise StackError(f"port already in use: {', '.join(taken)} (choose others with --*-port flags)")

    stop_requested = False

    def request_stop(signum, frame):
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        print("starting candidate_service and user_service ...", flush=True)
        for svc in services[:2]:
            svc.start()
        wait_serving(services[:2], args.startup_timeout)
        print("starting retrieval_gateway ...", flush=True)
        services[2].start()
        wait_serving(services[2:], args.startup_timeout)
        _print_ready(services, args)
        while not stop_requested:
            for svc in services:
                code = svc.exited()
                if code is not None:
                    raise StackError(
                        f"{svc.name} exited with code {code}; log {svc.log_path}:\n{svc.log_tail()}"
                    )
            time.sleep(0.5)
        print("\nstopping ...", flush=True)
        return 0
    finally:
        for svc in reversed(services):  # gateway first: it depends on the other two
            svc.stop(args.grace_seconds + 5)
        print("all services stopped", flush=True)


def installed_script(name: str) -> str:
    """The absolute path of console script `name` of this installation (beside the interpreter in a
    venv, else on PATH), so that a printed command works from any directory."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name) or name


def _print_ready(services: list[Managed], args: argparse.Namespace) -> None:
    candidate, user, gateway = services
    defaults = (args.gateway_port, args.user_port, args.candidate_port) == (50051, 50052, 50053)
    cli = shlex.quote(installed_script("twotower")) + (
        "" if defaults
        else f" --gateway {gateway.address} --user-service {user.address} --candidate {candidate.address}"
    )  # fmt: skip
    # Absolute paths throughout: the commands are meant to be pasted into another terminal, anywhere.
    artifacts = shlex.quote(str(Path(args.artifacts).absolute()))
    print(f"""
The stack is up (Ctrl-C stops all three):
  retrieval_gateway  {gateway.address}   log {gateway.log_path.absolute()}
  user_service       {user.address}   log {user.log_path.absolute()}
  candidate_service  {candidate.address}   log {candidate.log_path.absolute()}

Try, in another terminal:
  {cli} retrieve --movielens-user 42 --artifacts {artifacts} -k 10 --exclude-history
  {cli} retrieve --user-id 7 --history 50:favorite 172:favorite,click 181:click -k 5
  {cli} status
""", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--artifacts", default="artifacts/movielens")
    p.add_argument("--checkpoint", help="default: ARTIFACTS/checkpoint")
    p.add_argument("--items", help="default: ARTIFACTS/items.jsonl")
    p.add_argument("--cache-dir", default="artifacts/cache")
    p.add_argument("--log-dir", default="artifacts/logs")
    p.add_argument("--gateway-port", type=int, default=50051)
    p.add_argument("--user-port", type=int, default=50052)
    p.add_argument("--candidate-port", type=int, default=50053)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--grace-seconds", type=float, default=5.0)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    args.checkpoint = args.checkpoint or str(Path(args.artifacts) / "checkpoint")
    args.items = args.items or str(Path(args.artifacts) / "items.jsonl")
    try:
        return run(args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
