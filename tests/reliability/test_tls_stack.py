"""Mutual TLS on every channel of the real stack: client -> gateway, gateway -> user_service and
candidate_service, the client library and the CLI. Clients without a valid certificate, plaintext
clients, and a gateway without a client certificate are all refused."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest

from shared.client import TwoTowerClient
from shared.health import serving_status as health
from shared.tls import ClientTLS
from tests.reliability.harness import Stack, write_items
from tests.support import REPO_ROOT, ServiceProcess
from twotower_cli.cli import main as cli_main

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory, pki):
    from shared.model.checkpoint import random_model, save_checkpoint
    from shared.model.config import TowerConfig
    from tests.conftest import TINY

    tmp = tmp_path_factory.mktemp("tls")
    save_checkpoint(random_model(TowerConfig(**TINY), seed=0), tmp / "ckpt")
    s = Stack(tmp, tmp / "ckpt", write_items(tmp / "items.jsonl", range(1, 51)),
              tls_flags=pki.server_flags(mutual=True), upstream_flags=pki.client_flags("upstream-"),
              tls=pki.client())  # fmt: skip
    s.start_all()  # SERVING means the gateway reached both towers over mutual TLS
    yield s
    s.stop_all()


def test_client_library_over_mutual_tls(tls_stack, pki):
    with TwoTowerClient(tls_stack.address("gateway"), tls_stack.address("candidate"), tls=pki.client()) as c:
        assert len(c.retrieve(user_id=3, k=5).items) == 5
        version = c.upsert([{"post_id": 999, "author_id": 1}]).version
        assert c.corpus_info().version == version


def test_clients_without_a_valid_certificate_are_refused(tls_stack, pki):
    rogue = ClientTLS(pki.ca, pki.rogue_client_cert, pki.rogue_client_key)
    for name in ("gateway", "user", "candidate"):
        address = tls_stack.address(name)
        assert health(address, tls=pki.client()) == "SERVING"
        for tls in (None, pki.client(with_cert=False), rogue):
            assert health(address, tls=tls) == "UNREACHABLE", (name, tls)
    for tls in (None, pki.client(with_cert=False), rogue):
        with TwoTowerClient(tls_stack.address("gateway"), timeout=3, tls=tls) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.retrieve(user_id=3, k=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cli_over_mutual_tls(tls_stack, pki, capsys):
    addresses = ["--gateway", tls_stack.address("gateway"), "--candidate", tls_stack.address("candidate"),
                 "--user-service", tls_stack.address("user"), "--timeout", "5"]  # fmt: skip
    assert cli_main([*addresses, *pki.client_flags(), "retrieve", "--user-id", "4", "-k", "3"]) == 0
    assert "corpus version" in capsys.readouterr().out
    assert cli_main([*addresses, *pki.client_flags(), "status"]) == 0
    assert capsys.readouterr().out.count("SERVING") == 3
    assert cli_main([*addresses, "retrieve", "--user-id", "4", "-k", "3"]) == 1  # plaintext: refused
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert cli_main([*pki.client_flags(), "health", tls_stack.address("gateway")]) == 0
    assert cli_main(["--tls-ca", "/nonexistent.pem", "health", tls_stack.address("gateway")]) == 1
    assert "cannot read TLS CA /nonexistent.pem" in capsys.readouterr().err


def test_gateway_without_a_client_certificate_cannot_reach_the_towers(tls_stack, pki, tmp_path):
    gw = ServiceProcess("retrieval_gateway", [
        "--user-service", tls_stack.address("user"), "--candidate-service", tls_stack.address("candidate"),
        "--device", "cpu", "--upstream-tls-ca", str(pki.ca),
        *pki.server_flags(mutual=True),
    ], tmp_path, "gateway-no-client-cert", tls=pki.client())  # fmt: skip
    try:
        gw.wait_port(120)
        time.sleep(3.0)  # several reconnect attempts and health polls
        assert health(gw.address, tls=pki.client()) == "NOT_SERVING"
        with TwoTowerClient(gw.address, timeout=3, tls=pki.client()) as client:
            assert not client.gateway_status().candidate_service_connected
    finally:
        gw.stop()


def test_bad_tls_flags_are_a_one_line_configuration_error(tmp_path, pki):
    out = subprocess.run(
        [sys.executable, "-m", "retrieval_gateway", "--user-service", "a:1", "--candidate-service", "b:2",
         "--tls-cert", str(pki.server_cert)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "retrieval_gateway: invalid configuration: --tls-cert and --tls-key go together"
    ]
