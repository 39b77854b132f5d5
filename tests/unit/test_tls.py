"""TLS and mutual TLS on a real in-process server (loopback): who gets in, who is refused, and the
flags and files that configure it. Also: every service binds 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.server.bootstrap import ServerOptions, create_grpc_server
from shared.tls import (
    ClientTLS,
    ServerTLS,
    TLSConfigError,
    add_client_tls_flags,
    add_server_tls_flags,
    aio_channel,
    client_tls_from_args,
    server_tls_from_args,
)
from tests.reliability.certs import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _probe_all(server_tls: ServerTLS, clients: dict[str, ClientTLS | None], host: str = "127.0.0.1"):
    """Start a server with `server_tls`; the health-check outcome of each client: SERVING or a code name."""

    async def main() -> dict[str, str]:
        server, port, health = create_grpc_server(ServerOptions(tls=server_tls), [], lambda s: None)
        await server.start()
        await health.set_serving(True)
        outcome = {}
        try:
            for name, tls in clients.items():
                async with aio_channel(f"{host}:{port}", (), tls) as channel:
                    try:
                        reply = await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(), timeout=5
                        )
                        outcome[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    except grpc.aio.AioRpcError as exc:
                        outcome[name] = exc.code().name
        finally:
            await server.stop(0)
        return outcome

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_trusted_ca(pki):
    rogue = ClientTLS(pki.ca, pki.rogue_client_cert, pki.rogue_client_key)
    wrong_ca = ClientTLS(pki.rogue_ca, pki.client_cert, pki.client_key)  # does not trust the server
    outcome = _probe_all(
        pki.server(mutual=True),
        {"good": pki.client(), "no cert": pki.client(with_cert=False), "rogue cert": rogue,
         "plaintext": None, "untrusting": wrong_ca},
    )  # fmt: skip
    assert outcome == {
        "good": "SERVING",
        "no cert": "UNAVAILABLE",
        "rogue cert": "UNAVAILABLE",
        "plaintext": "UNAVAILABLE",
        "untrusting": "UNAVAILABLE",
    }


def test_server_only_tls_verifies_the_server_by_ip_and_by_name(pki):
    clients = {"ca only": pki.client(with_cert=False), "plaintext": None}
    assert _probe_all(pki.server(mutual=False), clients) == {"ca only": "SERVING", "plaintext": "UNAVAILABLE"}
    by_name = _probe_all(pki.server(mutual=False), {"localhost": pki.client(with_cert=False)}, "localhost")
    assert by_name == {"localhost": "SERVING"}
    # The certificate names 127.0.0.1 and localhost only: expecting another name must fail.
    other = ClientTLS(pki.ca, server_name="other.example")
    assert _probe_all(pki.server(mutual=False), {"other": other}) == {"other": "UNAVAILABLE"}


def test_bad_files_are_refused_at_start_up_with_the_path(pki, tmp_path):
    with pytest.raises(TLSConfigError, match="cannot read TLS key"):
        ServerTLS(pki.server_cert, tmp_path / "missing.key")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(TLSConfigError, match=r"garbage\.pem is not a PEM file"):
        ServerTLS(garbage, pki.server_key)
    with pytest.raises(TLSConfigError, match="TLS client CA"):
        ServerTLS(pki.server_cert, pki.server_key, garbage)
    with pytest.raises(TLSConfigError, match="both a cert and a key"):
        ClientTLS(pki.ca, cert=pki.client_cert)
    with pytest.raises(TLSConfigError, match="TLS CA"):
        ClientTLS(tmp_path / "nope.pem")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_server_tls_flags(p, "TEST")
    add_client_tls_flags(p, "upstream-", "TEST", "upstreams")
    return p


def test_flags_build_the_tls_settings_and_refuse_half_configurations(pki, monkeypatch):
    for var in ("TEST_TLS_CERT", "TEST_TLS_KEY", "TEST_TLS_CLIENT_CA", "TEST_UPSTREAM_TLS_CA"):
        monkeypatch.delenv(var, raising=False)
    args = _parser().parse_args([])
    assert server_tls_from_args(args) is None and client_tls_from_args(args, "upstream-") is None
    args = _parser().parse_args(pki.server_flags(mutual=True) + pki.client_flags("upstream-"))
    assert server_tls_from_args(args) == pki.server(mutual=True)
    assert client_tls_from_args(args, "upstream-") == pki.client()
    for bad in (
        ["--tls-cert", str(pki.server_cert)],
        ["--tls-client-ca", str(pki.ca)],
    ):
        with pytest.raises(TLSConfigError):
            server_tls_from_args(_parser().parse_args(bad))
    with pytest.raises(TLSConfigError, match="need --upstream-tls-ca"):
        client_tls_from_args(_parser().parse_args(["--upstream-tls-cert", "x"]), "upstream-")
    monkeypatch.setenv("TEST_UPSTREAM_TLS_CA", str(pki.ca))
    assert client_tls_from_args(_parser().parse_args([]), "upstream-") == ClientTLS(pki.ca)


def test_services_bind_loopback_unless_told_otherwise(tiny_checkpoint, tmp_path, monkeypatch):
    import candidate_service.__main__ as cand
    import retrieval_gateway.__main__ as gw
    import user_service.__main__ as user

    for var in ("USER_SERVICE_HOST", "CANDIDATE_HOST", "GATEWAY_HOST"):
        monkeypatch.delenv(var, raising=False)
    ck = str(tiny_checkpoint)
    configs = [
        user.config_from_args(user.parse_args(["--checkpoint", ck])),
        cand.config_from_args(cand.parse_args(["--checkpoint", ck, "--items", "x", "--cache-dir", "y"])),
        gw.config_from_args(gw.parse_args(["--user-service", "a:1", "--candidate-service", "b:2"])),
    ]
    assert [c.server.host for c in configs] == ["127.0.0.1"] * 3
    assert [c.server.tls for c in configs] == [None] * 3
    assert ServerOptions().host == "127.0.0.1"
