"""user_service as a real process: starts from flags, serves, stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import urllib.request

import grpc
import pytest

from bench.common import free_port
from shared import codec
from tests.support import ServiceProcess, health_status
from twotower.v1 import common_pb2, user_tower_pb2, user_tower_pb2_grpc


def test_serves_then_stops_gracefully_on_sigterm(tiny_checkpoint, tmp_path):
    metrics_port = free_port()
    proc = ServiceProcess(
        "user_service",
        ["--checkpoint", str(tiny_checkpoint), "--max-batch-size", "8", "--torch-threads", "1",
         "--metrics-port", str(metrics_port)],
        tmp_path,
    )  # fmt: skip
    try:
        proc.wait_serving(60)
        with grpc.insecure_channel(proc.address) as channel:
            stub = user_tower_pb2_grpc.UserTowerStub(channel)
            request = user_tower_pb2.EncodeUsersRequest(
                users=[
                    common_pb2.UserContext(user_id=u, history=[common_pb2.Engagement(post_id=u)])
                    for u in (1, 2)
                ]
            )
            response = stub.EncodeUsers(request, timeout=10)
        assert codec.decode_numpy(response.embeddings, "embeddings").shape == (2, 16)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
            text = page.read().decode()
        assert "twotower_user_batch_size_bucket" in text and 'code="OK"' in text
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(15) == 0
        assert health_status(proc.address) is None  # no longer listening
        assert "user_service stopped" in proc.log()
    finally:
        proc.stop()


def test_a_bad_checkpoint_exits_non_zero_with_a_clear_message(tmp_path):
    proc = ServiceProcess("user_service", ["--checkpoint", str(tmp_path / "missing")], tmp_path)
    try:
        code = proc.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("user_service kept running with a missing checkpoint")
    finally:
        proc.stop()
    assert code == 1 and "checkpoint file missing" in proc.log()
