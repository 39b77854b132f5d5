"""`--log-format json`: one JSON object a line with time, level, logger, message, the exception and the
gRPC method being handled; a real service started with it logs so from its first line."""

from __future__ import annotations

import json
import logging

import pytest

from shared.server.logs import CURRENT_RPC, configure_logging
from tests.support import ServiceProcess


def test_json_lines_carry_the_fields_and_the_rpc_being_handled(capsys):
    configure_logging("INFO", "json")
    try:
        log = logging.getLogger("probe")
        log.info("outside a call")
        token = CURRENT_RPC.set("/twotower.v1.RetrievalGateway/Retrieve")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("inside a call")
        finally:
            CURRENT_RPC.reset(token)
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        configure_logging("INFO", "plain")
    first, second = lines
    assert {"time", "level", "logger", "message"} <= set(first)
    assert (first["level"], first["logger"], first["message"], first["rpc"]) == (
        "INFO",
        "probe",
        "outside a call",
        None,
    )
    assert (
        second["rpc"] == "/twotower.v1.RetrievalGateway/Retrieve" and "ValueError: boom" in second["exc_info"]
    )


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", "xml")


def test_a_service_started_with_json_logs_writes_json_lines(tiny_checkpoint, tmp_path):
    proc = ServiceProcess("user_service", ["--checkpoint", str(tiny_checkpoint), "--log-format", "json",
                                           "--torch-threads", "1"], tmp_path)  # fmt: skip
    try:
        proc.wait_serving(60)
    finally:
        proc.stop()
    records = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("listening" in r["message"] for r in records)
