"""The one client of grpc.health.v1 (the servers' side is shared/server/bootstrap.py): `twotower health`,
run-stack's and the benchmarks' wait for SERVING, and the gateway's readiness probe of user_service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.tls import ClientTLS, aio_channel, sync_channel

_SERVING = health_pb2.HealthCheckResponse.SERVING


def serving_status(address: str, timeout: float = 2.0, tls: ClientTLS | None = None) -> str:
    """grpc.health.v1 status of the server at `address` ("SERVING", "NOT_SERVING", ... or "UNREACHABLE";
    a TLS handshake that fails, e.g. for want of a valid client certificate, is UNREACHABLE too)."""
    try:
        with sync_channel(address, (), tls) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
    except grpc.RpcError as exc:
        return (
            "UNREACHABLE"
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            else (exc.code().name)
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def is_serving(channel: grpc.aio.Channel, timeout: float, service: str = "") -> bool:
    """True when the server on `channel` reports `service` ("" = the whole server) SERVING; False when
    it reports anything else or does not answer."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    except grpc.aio.AioRpcError:
        return False
    return reply.status == _SERVING


async def wait_serving(
    address: str, timeout: float, check: Callable[[], None] | None = None, poll_s: float = 0.1
) -> bool:
    """Poll `address` (plaintext) until it reports SERVING: True, or False once `timeout` seconds have
    passed. `check` runs before each poll and may raise to give up early (e.g. the process exited)."""
    began = time.monotonic()
    async with aio_channel(address) as channel:
        while time.monotonic() - began < timeout:
            if check is not None:
                check()
            if await is_serving(channel, timeout=2):
                return True
            await asyncio.sleep(poll_s)
    return False
