"""docker-compose.yml cannot run here (no Docker engine), so check what can go wrong without one: every
service command is a real entry point whose flags parse into a valid config, container and published
ports match that config, ports are published on loopback only, health checks use grpc.health.v1, and
the gateway waits for healthy towers, and the image's Python environment (built as the Dockerfile builds
it, in a temporary venv) runs the health-check command from outside the sources."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOWERS = ("candidate_service", "user_service", "retrieval_gateway")


def _compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", TOWERS)
def test_service_command_parses_into_its_config(name):
    svc = _compose()["services"][name]
    command = svc["command"]
    assert command[:3] == ["python", "-m", name]
    entry = importlib.import_module(f"{name}.__main__")
    config = entry.config_from_args(entry.parse_args(command[3:]))
    port = config.server.port
    assert config.server.host == "0.0.0.0"  # reachable from the other containers
    assert svc["ports"] == [f"127.0.0.1:{port}:{port}"]  # published on loopback only
    assert svc["healthcheck"]["test"] == ["CMD", "twotower", "health", f"127.0.0.1:{port}"]


def test_gpu_override_commands_parse():
    for name, svc in _compose("docker-compose.gpu.yml")["services"].items():
        entry = importlib.import_module(f"{name}.__main__")
        config = entry.config_from_args(entry.parse_args(svc["command"][3:]))
        assert config.device == "cuda"
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_user_service_records_its_models_on_the_volume_so_rollouts_survive_a_restart():
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        command = _compose(name)["services"]["user_service"]["command"]
        entry = importlib.import_module("user_service.__main__")
        config = entry.config_from_args(entry.parse_args(command[3:]))
        assert config.state_file is not None and str(config.state_file).startswith("/artifacts/"), name


def test_gateway_points_at_the_towers_and_waits_for_health():
    services = _compose()["services"]
    gateway = services["retrieval_gateway"]
    entry = importlib.import_module("retrieval_gateway.__main__")
    config = entry.config_from_args(entry.parse_args(gateway["command"][3:]))
    for name, address in (
        ("user_service", config.user_service),
        ("candidate_service", config.candidate_service),
    ):
        host, port = address.rsplit(":", 1)
        assert host == name and int(port) == int(services[name]["ports"][0].rsplit(":", 1)[1])
        assert gateway["depends_on"][name] == {"condition": "service_healthy"}


def test_shared_volume_and_image():
    compose = _compose()
    assert "artifacts" in compose["volumes"]
    for name in (*TOWERS, "prepare"):
        assert "artifacts:/artifacts" in compose["services"][name]["volumes"]
    prepare = compose["services"]["prepare"]["command"]
    assert prepare[:3] == ["python", "-m", "training"]
    assert (ROOT / "training" / "__main__.py").is_file()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER app" in dockerfile and "RUN sh docker/install.sh" in dockerfile
    assert 'twotower = "twotower_cli.cli:main"' in (ROOT / "pyproject.toml").read_text()  # health checks


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions in order, as (KEYWORD, arguments): continuations joined, comments
    dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def _copy(args: str, app: Path) -> None:
    """COPY SRC... DEST from the build context (the repo) into `app`, leaving out what .dockerignore
    leaves out of the sources (bytecode caches)."""
    *sources, dest = args.split()
    target = app / dest
    for source in sources:
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            into = target / src.name if dest.endswith("/") or len(sources) > 1 else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, into)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_environment_runs_the_health_check_outside_the_sources(tmp_path):
    """Replays the Dockerfile's steps in order from WORKDIR to USER in a temporary venv: each COPY into
    a temporary /app, each RUN there (the torch layer before the sources, and the runtime user's creation,
    stand aside: this venv sees the dev venv's packages through a .pth file instead, so that nothing is
    downloaded). Then every compose health check, as the container runs it (the `twotower` script from
    PATH, cwd /app), must get past its imports and report the unused address UNREACHABLE."""
    app, venv, elsewhere = tmp_path / "app", tmp_path / "venv", tmp_path / "elsewhere"
    app.mkdir()
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    purelib = subprocess.run(
        [bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    # Appended after the venv's own site-packages: what the steps install into the venv comes first.
    Path(purelib, "_dev_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHON=str(bin_dir / "python"))

    steps = _dockerfile()
    keywords = [k for k, _ in steps]
    assert ("WORKDIR", "/app") in steps and "USER" in keywords
    first_copy, user = keywords.index("COPY"), keywords.index("USER")
    ran = []
    for keyword, args in steps[first_copy:user]:
        if keyword == "COPY":
            _copy(args, app)
        elif keyword == "RUN" and "useradd" not in args:  # the runtime user needs root: not here
            done = subprocess.run(["sh", "-c", args], cwd=app, env=env, capture_output=True, text=True,
                                  timeout=600)  # fmt: skip
            assert done.returncode == 0, f"RUN {args}\n{done.stdout}\n{done.stderr}"
            ran.append(args)
    assert ran, "no RUN step builds the Python environment"

    checked = []
    for name, svc in _compose()["services"].items():
        if "healthcheck" not in svc:
            continue
        cmd, script, *args = svc["healthcheck"]["test"]
        assert cmd == "CMD" and args[0] == "health"
        executable = shutil.which(script, path=env["PATH"])
        assert executable, f"{name}: health-check command {script} is not on the image's PATH"
        address = f"127.0.0.1:{_unused_port()}"  # nothing listens there: the expected answer is known
        check = subprocess.run(
            [executable, *args[:-1], address],
            cwd=app, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "Traceback" not in check.stderr, f"{name}: {check.stderr}"
        assert (check.returncode, check.stdout.strip()) == (1, "UNREACHABLE"), f"{name}: {check}"
        checked.append(name)
    assert set(TOWERS) <= set(checked)

    # The packages come from /app, not from the dev venv seen through the .pth file.
    where = subprocess.run(
        [bin_dir / "python", "-c", "import shared, twotower; print(shared.__file__, twotower.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert all(Path(f).resolve().is_relative_to(app.resolve()) for f in where.stdout.split()), where.stdout
