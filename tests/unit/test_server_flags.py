import argparse

import pytest

from shared.server.flags import add_server_flags, run_service, server_options_from_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_server_flags(p, "PROBE", default_port=50099)
    return p


def test_defaults_flags_and_env_fallbacks(monkeypatch):
    opts = server_options_from_args(_parser().parse_args([]))
    assert (opts.host, opts.port, opts.grace_seconds, opts.metrics_port, opts.tls) == (
        "127.0.0.1",
        50099,
        5.0,
        None,
        None,
    )
    monkeypatch.setenv("PROBE_PORT", "7001")
    monkeypatch.setenv("PROBE_MAX_MESSAGE_BYTES", "65536")
    args = _parser().parse_args(["--grace-seconds", "1.5", "--metrics-port", "0"])
    opts = server_options_from_args(args)
    assert (opts.port, opts.max_message_bytes, opts.grace_seconds, opts.metrics_port) == (7001, 65536, 1.5, 0)


def test_bad_env_value_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("PROBE_PORT", "http")
    with pytest.raises(SystemExit):
        _parser().parse_args([])


def test_run_service_exit_codes(capsys):
    args = _parser().parse_args(["--log-level", "ERROR"])

    def bad_config(_args):
        raise ValueError("max_queue must be >= 1")

    assert run_service("probe", args, bad_config, None, ()) == 2
    assert "probe: invalid configuration: max_queue must be >= 1" in capsys.readouterr().err

    async def cannot_start(_config):
        raise OSError("cannot listen on 127.0.0.1:1")

    assert run_service("probe", args, lambda a: a, cannot_start, ()) == 1
