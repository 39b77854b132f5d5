"""One interceptor for every service: maps domain errors to status codes and counts RPCs.

ServiceError subclasses carry caller-safe messages and keep them; anything else becomes INTERNAL with
a generic message (the details go to the log, never to the caller).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable

import grpc
from prometheus_client import Counter, Histogram

from shared import errors
from shared.server.logs import CURRENT_RPC

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
}

RPC_TOTAL = Counter("twotower_rpc_total", "RPCs handled, by method and status code", ["method", "code"])
RPC_SECONDS = Histogram(
    "twotower_rpc_seconds",
    "RPC handling time (unary: whole call; stream: until the stream ends)",
    ["method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message for an exception raised by a handler."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls], str(exc)
    return grpc.StatusCode.INTERNAL, "internal error (see server log)"


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # health, reflection and other library handlers pass through


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message: grpc would answer UNKNOWN for a
    deserializer that raises, so the handler wrapper raises InvalidInput (INVALID_ARGUMENT) instead."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a custom deserializer raises
            return _Undecodable(exc)

    return deserialize


def _check_decoded(request) -> None:
    if isinstance(request, _Undecodable):
        raise errors.InvalidInput(f"the request is not a valid protobuf message ({request.error})")


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.exception("unhandled error in %s", method, exc_info=exc)
    RPC_TOTAL.labels(method, code.name).inc()
    await context.abort(code, message)


def _wrap_unary(behavior: Callable, method: str) -> Callable:
    async def wrapper(request, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        CURRENT_RPC.set(method)  # request-scoped log field (each call runs in its own task)
        try:
            _check_decoded(request)
            response = await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # the handler aborted deliberately with its own status
        except Exception as exc:
            await _abort(context, method, exc)
        else:
            code = context.code() if hasattr(context, "code") else None
            RPC_TOTAL.labels(method, (code or grpc.StatusCode.OK).name).inc()
            return response
        finally:
            RPC_SECONDS.labels(method).observe(time.perf_counter() - start)

    return wrapper


def _wrap_stream(behavior: Callable, method: str) -> Callable:
    async def wrapper(request, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        CURRENT_RPC.set(method)
        try:
            _check_decoded(request)
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, method, exc)
        else:
            RPC_TOTAL.labels(method, grpc.StatusCode.OK.name).inc()
        finally:
            RPC_SECONDS.labels(method).observe(time.perf_counter() - start)

    return wrapper
