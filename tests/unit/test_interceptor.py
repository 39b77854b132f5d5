"""The interceptor's mapping of every domain error, checked through a real aio server on port 0."""

import asyncio

import grpc
import pytest

from shared import errors
from shared.server.bootstrap import ServerOptions, create_grpc_server, graceful_stop
from shared.server.interceptor import STATUS_BY_ERROR, status_for

SERVICE = "test.Probe"
CASES = {
    "invalid": (errors.InvalidInput("k must be >= 1"), grpc.StatusCode.INVALID_ARGUMENT),
    "notready": (errors.NotReady("corpus not loaded"), grpc.StatusCode.UNAVAILABLE),
    "mismatch": (errors.ModelMismatch("fingerprint a != b"), grpc.StatusCode.FAILED_PRECONDITION),
    "overloaded": (errors.Overloaded("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    "deadline": (errors.DeadlineExpired("deadline passed"), grpc.StatusCode.DEADLINE_EXCEEDED),
    "bug": (ZeroDivisionError("secret detail"), grpc.StatusCode.INTERNAL),
}


def _register(server: grpc.aio.Server) -> None:
    async def unary(request: bytes, context) -> bytes:
        key = request.decode()
        if key == "ok":
            return b"fine"
        raise CASES[key][0]

    async def stream(request: bytes, context):
        yield b"first"
        raise CASES[request.decode()][0]

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def test_every_error_class_is_mapped():
    """Each domain error gets a deliberate code (its own entry or its base class's), never INTERNAL."""
    base = errors.ServiceError
    found = vars(errors).values()
    classes = [c for c in found if isinstance(c, type) and issubclass(c, base) and c is not base]
    for cls in classes:
        code, message = status_for(cls("why"))
        assert code != grpc.StatusCode.INTERNAL and message == "why", cls
    assert errors.ModelMismatch in classes and errors.PreconditionFailed in STATUS_BY_ERROR


def test_mapping_through_a_live_server():
    async def main():
        server, port, health = create_grpc_server(ServerOptions(), [SERVICE], _register)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                unary = channel.unary_unary(f"/{SERVICE}/Unary")
                stream = channel.unary_stream(f"/{SERVICE}/Stream")
                assert await unary(b"ok", timeout=5) == b"fine"
                for key, (exc, code) in CASES.items():
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await unary(key.encode(), timeout=5)
                    assert info.value.code() == code, key
                    if code is grpc.StatusCode.INTERNAL:
                        assert "secret" not in info.value.details()
                    else:
                        assert info.value.details() == str(exc)
                    got = []
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        async for item in stream(key.encode(), timeout=5):
                            got.append(item)
                    assert got == [b"first"] and info.value.code() == code
        finally:
            await graceful_stop(server, health, 0)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_health_is_not_serving_until_set():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def main():
        server, port, health = create_grpc_server(ServerOptions(), [SERVICE], _register)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                statuses = []
                for _ in range(2):
                    for name in ("", SERVICE):
                        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                        statuses.append(reply.status)
                    await health.set_serving(True)
        finally:
            await graceful_stop(server, health, 0)
        NOT, OK = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
        assert statuses == [NOT, NOT, OK, OK]

    asyncio.run(asyncio.wait_for(main(), 30))
