"""Server bootstrap: grpc.aio server with health, reflection, the error interceptor, message-size
limits, and graceful shutdown (health NOT_SERVING first, then in-flight RPCs get a grace period)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.server.interceptor import ErrorMappingInterceptor
from shared.server.settings import setting
from shared.tls import ServerTLS

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ServerOptions:
    """Transport settings every service shares; part of each service's config dataclass."""

    # Each field but `tls` is a flag of every service (`<PREFIX>_HOST` ...; the port's default is the
    # service's own); the TLS flags are shared/tls.py's.
    # loopback unless told otherwise
    host: str = field(default="127.0.0.1", metadata=setting("address to bind"))
    # 0 = any free port (tests); the bound port is returned by create_server
    port: int = field(default=0, metadata=setting("0 = any free port, see --port-file"))
    max_message_bytes: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES, metadata=setting("largest gRPC message, both directions")
    )
    grace_seconds: float = field(
        default=5.0, metadata=setting("on SIGTERM/SIGINT, in-flight RPCs may finish within this")
    )
    # Prometheus HTTP endpoint on `host`; None = off, 0 = any free port
    metrics_port: int | None = field(
        default=None, metadata=setting("Prometheus HTTP port; off when not given, 0 = any free port")
    )
    tls: ServerTLS | None = None  # None = plaintext; with client_ca = mutual TLS (client certs required)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be >= 1024")
        if self.grace_seconds < 0:
            raise ValueError("grace_seconds must be >= 0")

    def channel_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]


class _NotServingHealthServicer(health.aio.HealthServicer):
    """grpc's aio HealthServicer starts with "" = SERVING; ours starts with every name NOT_SERVING, so a
    probe that arrives before the service is ready is never told otherwise."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        # No watcher can exist before the server starts, so setting the table directly is safe here.
        self._server_status = {name: health_pb2.HealthCheckResponse.NOT_SERVING for name in names}


class Health:
    """The service's grpc.health.v1 state: NOT_SERVING until `set_serving(True)`."""

    def __init__(self, service_names: Sequence[str]) -> None:
        self.names = ["", *service_names]  # "" = the server as a whole
        self.servicer = _NotServingHealthServicer(self.names)
        self.serving = False

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.names:
            await self.servicer.set(name, status)

    async def shutting_down(self) -> None:
        self.serving = False
        await self.servicer.enter_graceful_shutdown()


def create_grpc_server(
    options: ServerOptions,
    service_names: Sequence[str],
    register: Callable[[grpc.aio.Server], None],
) -> tuple[grpc.aio.Server, int, Health]:
    """Build (not start) a server with the services `register` adds, health and reflection.

    Returns the server, the bound port and the health state (NOT_SERVING until the service says so).
    """
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=options.channel_options())
    register(server)
    state = Health(service_names)
    health_pb2_grpc.add_HealthServicer_to_server(state.servicer, server)
    reflection.enable_server_reflection(
        [*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], server
    )
    address = f"{options.host}:{options.port}"
    try:
        if options.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, options.tls.credentials())
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {address} (port in use or address not available)")
    return server, port, state


async def wait_for_signal(signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> int:
    """Block until one of `signals` arrives; returns it."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[int] = loop.create_future()
    for sig in signals:
        loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s))
    try:
        return await received
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def graceful_stop(server: grpc.aio.Server, state: Health, grace_seconds: float) -> None:
    """Health goes NOT_SERVING (load balancers stop sending), new RPCs are refused, in-flight RPCs get
    `grace_seconds` to finish, then the rest are cancelled."""
    await state.shutting_down()
    await server.stop(grace_seconds)


def start_metrics_http(host: str, port: int | None) -> int | None:
    """Serve Prometheus metrics over HTTP on a daemon thread; returns the bound port (None = off)."""
    if port is None:
        return None
    from prometheus_client import start_http_server

    httpd, _thread = start_http_server(port, addr=host)
    return int(httpd.server_port)
