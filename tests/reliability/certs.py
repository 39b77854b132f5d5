"""Throwaway PKI for TLS tests: a CA, a server certificate for 127.0.0.1 and localhost, a client
certificate, and a second ("rogue") CA with its own client certificate that the servers must refuse."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.tls import ClientTLS, ServerTLS


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # a CA the servers do not trust
    rogue_client_cert: Path  # signed by rogue_ca
    rogue_client_key: Path

    def server(self, mutual: bool = True) -> ServerTLS:
        return ServerTLS(self.server_cert, self.server_key, self.ca if mutual else None)

    def client(self, with_cert: bool = True) -> ClientTLS:
        if not with_cert:
            return ClientTLS(self.ca)
        return ClientTLS(self.ca, self.client_cert, self.client_key)

    def server_flags(self, mutual: bool = True) -> list[str]:
        flags = ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key)]
        return [*flags, "--tls-client-ca", str(self.ca)] if mutual else flags

    def client_flags(self, prefix: str = "") -> list[str]:
        return [f"--{prefix}tls-ca", str(self.ca), f"--{prefix}tls-cert", str(self.client_cert),
                f"--{prefix}tls-key", str(self.client_key)]  # fmt: skip


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path = path.with_suffix(".key")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key_path


def _issue(
    subject: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if issuer is None:  # a CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> PKI:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _issue("twotower test CA", None)
    rogue_key, rogue = _issue("rogue CA", None)
    ca_path, _ = _write(directory / "ca.pem", ca_key, ca)
    rogue_path, _ = _write(directory / "rogue-ca.pem", rogue_key, rogue)
    server = _write(directory / "server.pem", *_issue("twotower server", (ca.subject, ca_key), server=True))
    client = _write(directory / "client.pem", *_issue("twotower client", (ca.subject, ca_key)))
    rogue_client = _write(directory / "rogue-client.pem", *_issue("intruder", (rogue.subject, rogue_key)))
    return PKI(ca_path, *server, *client, rogue_path, *rogue_client)
