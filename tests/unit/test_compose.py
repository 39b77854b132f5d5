"""docker-compose.yml cannot run here (no Docker engine), so check what can go wrong without one: every
service command is a real entry point whose flags parse into a valid config, container and published
ports match that config, ports are published on loopback only, health checks use grpc.health.v1, and
the gateway waits for healthy towers."""

from __future__ import annotations

import importlib
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
    assert "USER app" in dockerfile and "grpc_tools.protoc" in dockerfile
    assert 'twotower = "shared.client.cli:main"' in (ROOT / "pyproject.toml").read_text()  # health checks
