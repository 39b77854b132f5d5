"""Each setting is declared once (shared/server/settings.py): the flags, their env fallbacks, --help and the
README's tables come from the config dataclasses, and the services' flags behave as they did."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from retrieval_gateway.config import GatewayConfig
from shared.server.bootstrap import ServerOptions
from shared.server.flag_table import README, SERVICES, readme_section, service_parser, service_section
from shared.server.settings import add_settings, flags_of, parse_flags, setting, settings_from_args
from user_service.config import UserServiceConfig

PREFIXES = ("TWOTOWER_", "USER_SERVICE_", "CANDIDATE_", "GATEWAY_", "PROBE_")

SERVER_ENV = "HOST PORT MAX_MESSAGE_BYTES GRACE_SECONDS METRICS_PORT LOG_LEVEL LOG_FORMAT"
SERVER_ENV += " TLS_CERT TLS_KEY TLS_CLIENT_CA"


def _names(prefix: str, words: str) -> set[str]:
    return {f"{prefix}_{word}" for word in f"{SERVER_ENV} {words}".split()}


# Every env name the services read before settings were declared once (plus the gateway's new ones):
# renaming one would silently drop a deployment's setting.
ENV_NAMES = {
    "user_service": {"TWOTOWER_CHECKPOINT"}
    | _names(
        "USER_SERVICE",
        "DEVICE DTYPE MAX_BATCH_SIZE MAX_WAIT_MS MAX_QUEUE MAX_USERS_PER_CALL MAX_HISTORY_EVENTS "
        "TORCH_THREADS CUDA_GRAPHS COMPILE_USER_TOWER CPU_TOWER TOWER_CACHE_DIR STATE_FILE MAX_MODELS",
    ),
    "candidate_service": {"TWOTOWER_CHECKPOINT"}
    | _names(
        "CANDIDATE",
        "CACHE_DIR ITEMS ITEM_STORE ENCODE_BATCH_SIZE MAX_BATCH_ITEMS DELTA_RING_SIZE WATCHER_QUEUE_SIZE "
        "MAX_WATCHERS CACHE_REFRESH_AFTER_CHANGES TORCH_THREADS",
    ),
    "retrieval_gateway": _names(
        "GATEWAY",
        "USER_SERVICE CANDIDATE_SERVICE DEVICE DTYPE FUSED_GEMV TORCH_THREADS MAX_K MAX_EXCLUSIONS "
        "MAX_BATCH_SIZE "
        "MAX_WAIT_MS MAX_LINGER_MS MAX_QUEUE MAX_USER_CALLS_IN_FLIGHT MAX_HISTORY_EVENTS USER_TIMEOUT_S "
        "MAX_CORPUS_ITEMS "
        "RECONNECT_MAX_S UPSTREAM_TLS_CA UPSTREAM_TLS_CERT UPSTREAM_TLS_KEY UPSTREAM_TLS_SERVER_NAME "
        "ROLE SHARD_INDEX NUM_SHARDS SHARD_ADDRESSES",
    ),
}
MINIMAL = {
    "user_service": ["--checkpoint", "ck"],
    "candidate_service": ["--checkpoint", "ck", "--cache-dir", "cache"],
    "retrieval_gateway": ["--user-service", "u:1", "--candidate-service", "c:2"],
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No TWOTOWER_* / service variable of the machine running the tests leaks into a parse."""
    for name in os.environ:
        if name.startswith(PREFIXES):
            monkeypatch.delenv(name)


def _entry(name: str):
    return importlib.import_module(f"{name}.__main__")


def _config(name: str, argv: list[str]):
    entry = _entry(name)
    return entry.config_from_args(entry.parse_args(argv))


# -- the README and --help -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_readme_flag_table_is_the_one_generated_from_the_parser(name):
    documented = readme_section(README.read_text(), name)
    assert documented is not None, f"README.md lacks the <!-- flags: {name} --> section"
    generated = service_section(name)
    if documented != generated:
        diff = "\n".join(
            difflib.unified_diff(
                documented.splitlines(), generated.splitlines(), "README.md", "generated", lineterm=""
            )
        )
        pytest.fail(
            f"README.md's {name} flags differ from --help; run "
            f"`.venv/bin/python -m shared.server.flag_table --write`:\n{diff}"
        )


@pytest.mark.parametrize("name", SERVICES)
def test_help_names_the_env_var_of_every_flag(name):
    parser = service_parser(name)
    flags = flags_of(parser)
    undeclared = [
        a.option_strings
        for a in parser._actions
        if a.dest != "help" and a.dest not in {f.dest for f in flags}
    ]
    assert not undeclared, f"flags added without a declaration: {undeclared}"
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    for flag in flags:
        assert flag.option in text
        assert (f"env {flag.env}" if flag.env else "no env var") in text, flag.option
    assert {f.env for f in flags} - {None} == ENV_NAMES[name]
    assert {f.option for f in flags if f.env is None} == {"--port-file"} | (
        {"--import-items"} if name == "candidate_service" else set()
    )


@pytest.mark.parametrize("name", SERVICES)
def test_flag_defaults_are_the_config_defaults(name):
    config = _config(name, MINIMAL[name])
    defaults = {
        "user_service": lambda: UserServiceConfig(checkpoint=Path("ck"), server=ServerOptions(port=50052)),
        "candidate_service": lambda: importlib.import_module("candidate_service.config").CandidateConfig(
            checkpoint=Path("ck"), cache_dir=Path("cache"), server=ServerOptions(port=50053)
        ),
        "retrieval_gateway": lambda: GatewayConfig(
            user_service="u:1", candidate_service="c:2", server=ServerOptions(port=50051)
        ),
    }[name]()
    assert config == defaults


# -- env fallbacks ---------------------------------------------------------------------------------------


def test_env_fallbacks_of_each_kind_and_flags_win(monkeypatch):
    monkeypatch.setenv("TWOTOWER_CHECKPOINT", "/ckpt")
    monkeypatch.setenv("USER_SERVICE_CUDA_GRAPHS", "0")
    monkeypatch.setenv("USER_SERVICE_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("USER_SERVICE_STATE_FILE", "")  # empty optional path = not given
    monkeypatch.setenv("USER_SERVICE_PORT", "7001")
    config = _config("user_service", [])
    assert (config.checkpoint, config.cuda_graphs, config.max_wait_ms) == (Path("/ckpt"), False, 2.5)
    assert (config.state_file, config.server.port) == (None, 7001)
    config = _config("user_service", ["--cuda-graphs", "--port", "7002", "--checkpoint", "/other"])
    assert (config.cuda_graphs, config.server.port, config.checkpoint) == (True, 7002, Path("/other"))
    assert _config("user_service", ["--no-cuda-graphs"]).cuda_graphs is False

    monkeypatch.setenv("GATEWAY_FUSED_GEMV", "1")
    monkeypatch.setenv("GATEWAY_ROLE", "router")
    monkeypatch.setenv("GATEWAY_SHARD_ADDRESSES", " dns:///shard-0:50051\tipv4:10.0.0.2:50051 ")
    config = _config("retrieval_gateway", ["--user-service", "u:1"])
    assert (config.fused_gemv, config.role) == (True, "router")
    assert config.shard_addresses == ("dns:///shard-0:50051", "ipv4:10.0.0.2:50051")
    config = _config("retrieval_gateway", ["--user-service", "u:1", "--shard-addresses", "a:1", "b:2", "c:3"])
    assert config.shard_addresses == ("a:1", "b:2", "c:3")

    monkeypatch.setenv("CANDIDATE_ITEMS", "items.jsonl")
    config = _config("candidate_service", MINIMAL["candidate_service"])
    assert config.items == Path("items.jsonl") and config.import_items is False


@pytest.mark.parametrize(
    ("name", "var", "value", "message"),
    [
        (
            "user_service",
            "USER_SERVICE_MAX_QUEUE",
            "lots",
            "invalid int value: 'lots' in env USER_SERVICE_MAX_QUEUE",
        ),
        ("user_service", "USER_SERVICE_DEVICE", "tpu", "invalid choice: 'tpu' in env USER_SERVICE_DEVICE"),
        ("user_service", "USER_SERVICE_CUDA_GRAPHS", "maybe", "invalid bool value: 'maybe' in env"),
        ("candidate_service", "CANDIDATE_GRACE_SECONDS", "soon", "invalid float value: 'soon' in env"),
        ("retrieval_gateway", "GATEWAY_DTYPE", "fp64", "invalid choice: 'fp64' in env GATEWAY_DTYPE"),
        ("retrieval_gateway", "GATEWAY_ROLE", "leader", "invalid choice: 'leader' in env GATEWAY_ROLE"),
        ("retrieval_gateway", "GATEWAY_LOG_FORMAT", "xml", "invalid choice: 'xml' in env GATEWAY_LOG_FORMAT"),
    ],
)
def test_a_bad_env_value_is_a_usage_error_naming_the_variable(monkeypatch, capsys, name, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as exited:
        _entry(name).parse_args(MINIMAL[name])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_flag_value_reads_as_argparse_says_it(capsys):
    for argv, message in (
        (["--max-queue", "lots"], "argument --max-queue: invalid int value: 'lots'"),
        (["--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64' (choose from 'fp32', 'bf16')"),
    ):
        with pytest.raises(SystemExit):
            _entry("user_service").parse_args(["--checkpoint", "ck", *argv])
        err = capsys.readouterr().err
        assert message in err and " in env " not in err


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("user_service", [], "--checkpoint (or TWOTOWER_CHECKPOINT) is required"),
        ("user_service", ["--checkpoint", ""], "--checkpoint (or TWOTOWER_CHECKPOINT) is required"),
        ("candidate_service", ["--checkpoint", "ck"], "--cache-dir (or CANDIDATE_CACHE_DIR) is required"),
        ("retrieval_gateway", ["--candidate-service", "c:2"], "--user-service (or GATEWAY_USER_SERVICE) is"),
        (
            "retrieval_gateway",
            ["--user-service", "u:1"],
            "--candidate-service (or GATEWAY_CANDIDATE_SERVICE) is",
        ),
    ],
)
def test_a_missing_required_flag_is_a_usage_error_naming_its_variable(capsys, name, argv, message):
    with pytest.raises(SystemExit) as exited:
        _entry(name).parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


# -- the gateway's targets and roles ---------------------------------------------------------------------


TARGETS = "127.0.0.1:50052 user-service:50052 dns:///user-service:50052 ipv4:127.0.0.1:5001,127.0.0.1:5002"
TARGETS += " unix:/tmp/user.sock unix:///tmp/user.sock [::1]:50052"


@pytest.mark.parametrize("target", TARGETS.split())
def test_gateway_upstreams_are_grpc_targets(target):
    config = GatewayConfig(user_service=target, candidate_service=target)
    assert (config.user_service, config.candidate_service) == (target, target)


@pytest.mark.parametrize("target", ["", "nohostport", "host :1", "host:1\n", "dns:///a:1 dns:///b:1"])
def test_gateway_refuses_what_is_not_a_grpc_target(target):
    with pytest.raises(ValueError, match="user_service must be HOST:PORT or another gRPC target"):
        GatewayConfig(user_service=target, candidate_service="c:2")
    with pytest.raises(ValueError, match="candidate_service must be"):
        GatewayConfig(user_service="u:1", candidate_service=target)


def test_gateway_roles_and_their_shard_settings():
    assert GatewayConfig(user_service="u:1", candidate_service="c:2").role == "single"
    shard = GatewayConfig(
        user_service="u:1", candidate_service="c:2", role="shard", shard_index=2, num_shards=3
    )
    assert (shard.shard_index, shard.num_shards) == (2, 3)
    router = GatewayConfig(user_service="u:1", role="router", shard_addresses=("s0:1", "s1:1"))
    assert router.candidate_service == "" and router.shard_addresses[1] == "s1:1"
    bad = [
        ({"role": "leader"}, "role must be one of single, shard, router"),
        ({"role": "shard", "shard_index": 3, "num_shards": 3}, r"shard_index must be in \[0, num_shards=3\)"),
        ({"role": "shard", "shard_index": -1, "num_shards": 2}, "shard_index must be in"),
        ({"role": "shard", "num_shards": 0}, "num_shards must be >= 1"),
        ({"role": "router"}, "role router needs shard_addresses"),
        ({"role": "router", "shard_addresses": ("s0:1", "bad")}, r"shard_addresses\[1\] must be"),
        ({"role": "router", "shard_addresses": ("s0:1", "s1:1"), "num_shards": 3}, "must match the 2"),
        ({"shard_addresses": ("s0:1",)}, "shard_addresses are for role router, not 'single'"),
        ({"role": "shard", "shard_addresses": ("s0:1",)}, "shard_addresses are for role router"),
        ({"role": "shard", "candidate_service": ""}, "candidate_service must be"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            GatewayConfig(**{"user_service": "u:1", "candidate_service": "c:2", **options})


def test_gateway_flags_make_a_shard_or_a_router(capsys):
    argv = ["--user-service", "dns:///user-service:50052", "--candidate-service", "dns:///candidate:50053"]
    shard = _config(
        "retrieval_gateway", [*argv, "--role", "shard", "--shard-index", "1", "--num-shards", "4"]
    )
    assert (shard.role, shard.shard_index, shard.num_shards) == ("shard", 1, 4)
    router = _config(
        "retrieval_gateway", ["--user-service", "u:1", "--role", "router", "--shard-addresses", "a:1"]
    )
    assert (router.role, router.shard_addresses, router.candidate_service) == ("router", ("a:1",), "")
    main = _entry("retrieval_gateway").main
    assert main(["--user-service", "u:1", "--role", "router", "--log-level", "ERROR"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "retrieval_gateway: invalid configuration: role router needs shard_addresses "
        "(one gRPC target per shard)"
    )


# -- the mechanism on its own -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Probe:
    name: str = field(metadata=setting("a required name", metavar="NAME"))
    count: int = field(default=3, metadata=setting("how many"))
    ratio: float | None = field(default=None, metadata=setting("optional ratio"))
    path: Path | None = field(default=None, metadata=setting("optional path", env="PROBE_SOMEWHERE"))
    mode: str = field(default="a", metadata=setting("a or b", choices=("a", "b")))
    fast: bool = field(default=False, metadata=setting("go fast", env=None))
    targets: tuple[str, ...] = field(default=(), metadata=setting("some targets"))
    internal: int = 7  # not a flag


def _probe(argv: list[str]) -> _Probe:
    parser = argparse.ArgumentParser()
    add_settings(parser, _Probe, "PROBE", defaults={"count": 4})
    return _Probe(**settings_from_args(_Probe, parse_flags(parser, argv)))


def test_a_dataclass_declares_its_flags(monkeypatch):
    assert _probe(["--name", "x"]) == _Probe(name="x", count=4)
    got = _probe(["--name", "x", "--count", "5", "--ratio", "0.5", "--path", "p", "--mode", "b", "--fast",
                  "--targets", "t:1", "t:2"])  # fmt: skip
    assert got == _Probe("x", 5, 0.5, Path("p"), "b", True, ("t:1", "t:2"))
    monkeypatch.setenv("PROBE_NAME", "from-env")
    monkeypatch.setenv("PROBE_SOMEWHERE", "q")
    monkeypatch.setenv("PROBE_RATIO", "0.25")
    monkeypatch.setenv("PROBE_PATH", "ignored: the field names PROBE_SOMEWHERE")
    monkeypatch.setenv("PROBE_FAST", "1")  # no env fallback declared
    monkeypatch.setenv("PROBE_TARGETS", "a:1 b:2")
    assert _probe([]) == _Probe("from-env", 4, 0.25, Path("q"), "a", False, ("a:1", "b:2"))
    assert _probe(["--targets", "c:3"]).targets == ("c:3",)


def test_a_flag_declared_without_a_default_is_required(capsys):
    with pytest.raises(SystemExit):
        _probe([])
    assert "--name (or PROBE_NAME) is required" in capsys.readouterr().err
