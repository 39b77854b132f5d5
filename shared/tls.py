"""TLS and mutual TLS for every channel: server credentials, client credentials, and the flags for both.

One place builds credentials so every server (the three services) and every client side (the gateway's
channels to the towers, the client library, the CLI, health probes) behaves the same:

- a server with `--tls-cert/--tls-key` serves TLS only; adding `--tls-client-ca` makes it *require* a
  client certificate signed by that CA (mutual TLS) and refuse every other client at the handshake;
- a client with a CA verifies the server's certificate (and its name: the host of the address, or
  `server_name` when the certificate names another host); with a cert and key it also presents a
  client certificate.

Files are read once, when credentials are built (at start-up); a missing or non-PEM file is a clear
start-up error, never a handshake failure later.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from shared.server.settings import Flag, add_flag


class TLSConfigError(ValueError):
    """A TLS flag combination or file is unusable (raised at start-up)."""


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"{what} {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """TLS for a server. `client_ca` set = mutual TLS: clients must present a cert signed by it."""

    cert: Path  # PEM certificate chain of this server
    key: Path  # PEM private key of `cert`
    client_ca: Path | None = None  # PEM CA bundle that client certificates must chain to

    def __post_init__(self) -> None:
        self.credentials()  # unreadable or non-PEM files are a configuration error at start-up

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read_pem(self.key, "TLS key"), _read_pem(self.cert, "TLS certificate"))
        if self.client_ca is None:
            return grpc.ssl_server_credentials([pair])
        ca = _read_pem(self.client_ca, "TLS client CA")
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=True)


@dataclass(frozen=True)
class ClientTLS:
    """TLS for a client: verify the server against `ca`; present `cert`/`key` for mutual TLS."""

    ca: Path  # PEM CA bundle the server's certificate must chain to
    cert: Path | None = None  # PEM client certificate (mutual TLS)
    key: Path | None = None  # PEM private key of `cert`
    server_name: str | None = None  # expected name in the server cert when it differs from the host

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TLSConfigError("a client certificate needs both a cert and a key")
        self.credentials()  # unreadable or non-PEM files are a configuration error, not a failed call

    def credentials(self) -> grpc.ChannelCredentials:
        ca = _read_pem(self.ca, "TLS CA")
        if self.cert is None or self.key is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        return grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=_read_pem(self.key, "TLS client key"),
            certificate_chain=_read_pem(self.cert, "TLS client certificate"),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]


def secure_channel_args(
    tls: ClientTLS | None, options: Sequence[tuple[str, object]]
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, object]]]:
    """(credentials or None for plaintext, options) for a channel."""
    if tls is None:
        return None, list(options)
    return tls.credentials(), [*options, *tls.channel_options()]


def aio_channel(
    address: str, options: Sequence[tuple[str, object]] = (), tls: ClientTLS | None = None
) -> grpc.aio.Channel:
    """An asyncio channel: TLS when `tls` is given, plaintext otherwise."""
    creds, opts = secure_channel_args(tls, options)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=opts)
    return grpc.aio.secure_channel(address, creds, options=opts)


def sync_channel(
    address: str, options: Sequence[tuple[str, object]] = (), tls: ClientTLS | None = None
) -> grpc.Channel:
    """A blocking channel: TLS when `tls` is given, plaintext otherwise."""
    creds, opts = secure_channel_args(tls, options)
    if creds is None:
        return grpc.insecure_channel(address, options=opts)
    return grpc.secure_channel(address, creds, options=opts)


# -- flags -------------------------------------------------------------------------------------------


def add_server_tls_flags(parser: argparse.ArgumentParser, env_prefix: str) -> None:
    """`--tls-cert --tls-key [--tls-client-ca]` with `<env_prefix>_TLS_CERT` ... fallbacks."""
    g = parser.add_argument_group("TLS (plaintext when --tls-cert is not given)")
    for name, text in (
        ("cert", "PEM server certificate"),
        ("key", "PEM key of --tls-cert"),
        ("client-ca", "PEM CA: require client certificates signed by it (mutual TLS)"),
    ):
        env = f"{env_prefix}_TLS_{name.upper().replace('-', '_')}"
        add_flag(g, Flag(f"--tls-{name}", text, env=env))


def server_tls_from_args(args: argparse.Namespace) -> ServerTLS | None:
    if not args.tls_cert and not args.tls_key:
        if args.tls_client_ca:
            raise TLSConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (args.tls_cert and args.tls_key):
        raise TLSConfigError("--tls-cert and --tls-key go together")
    client_ca = Path(args.tls_client_ca) if args.tls_client_ca else None
    return ServerTLS(Path(args.tls_cert), Path(args.tls_key), client_ca)


def add_client_tls_flags(parser: argparse.ArgumentParser, prefix: str, env_prefix: str, what: str) -> None:
    """`--<prefix>tls-ca [--<prefix>tls-cert --<prefix>tls-key] [--<prefix>tls-server-name]`."""
    env = f"{env_prefix}_{prefix.upper().replace('-', '_')}TLS"
    g = parser.add_argument_group(f"TLS to {what} (plaintext when --{prefix}tls-ca is not given)")
    for name, text in (
        ("ca", "PEM CA that server certs chain to"),
        ("cert", "PEM client cert (mutual TLS)"),
        ("key", "PEM key of the client cert"),
        ("server-name", "name expected in the server certificate; not given: the host of the address"),
    ):
        add_flag(g, Flag(f"--{prefix}tls-{name}", text, env=f"{env}_{name.upper().replace('-', '_')}"))


def client_tls_from_args(args: argparse.Namespace, prefix: str = "") -> ClientTLS | None:
    p = prefix.replace("-", "_")
    ca, cert, key, name = (getattr(args, f"{p}tls_{f}") for f in ("ca", "cert", "key", "server_name"))
    if not ca:
        if cert or key or name:
            raise TLSConfigError(f"--{prefix}tls-cert/-key/-server-name need --{prefix}tls-ca")
        return None
    return ClientTLS(Path(ca), Path(cert) if cert else None, Path(key) if key else None, name or None)
