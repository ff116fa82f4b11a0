"""gRPC method handlers, wrapped once at registration: errors to statuses, metrics, raw bytes.

This is the one module that knows gRPC's four handler kinds. ``Registrar``
stands in for the server while the generated ``add_*_to_server`` functions
register services, so that every method handler is wrapped once, when it is
registered, rather than per call (grpc.aio's per-call interceptor path costs
about 75 us a call, a quarter of a small Evaluate). Three things wrap them:

* ``ServiceErrors``: a ``ServiceError`` raised by a servicer method becomes
  its gRPC status here and only here (``status_of``), with a
  ``google.rpc.BadRequest`` detail naming the offending fields; any other
  exception is logged and becomes INTERNAL.
* ``MetricsInterceptor``: counts, times and logs every call in ``Metrics``, reading
  the status the call ended with (``status_name``).
* the response serializer sends serialized responses (``codec.Wire``) as
  they are.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from micrograd.codec.wire import Wire

from .metrics import Metrics
from .service import ServiceError, nodes_evaluated

__all__ = [
    "HandlerWrapper",
    "MetricsInterceptor",
    "Registrar",
    "ServiceErrors",
    "rebuilt",
    "status_name",
    "status_of",
]

log = logging.getLogger("micrograd.server")


def rebuilt(
    handler: grpc.RpcMethodHandler,
    behavior: Callable[..., Any] | None = None,
    response_serializer: Callable[[Any], bytes] | None = None,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind, with ``behavior`` and/or the (de)serializers replaced."""
    deserialize = request_deserializer or handler.request_deserializer
    serialize = response_serializer or handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            behavior or handler.stream_stream, deserialize, serialize
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            behavior or handler.stream_unary, deserialize, serialize
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            behavior or handler.unary_stream, deserialize, serialize
        )
    return grpc.unary_unary_rpc_method_handler(
        behavior or handler.unary_unary, deserialize, serialize
    )


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The function that serves ``handler``, whichever of the four kinds it is."""
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


class HandlerWrapper(Protocol):
    """Something that wraps a method handler, once, when its service is registered."""

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler to serve ``path`` (``/pkg.Service/Method``) with instead of ``handler``."""
        ...


# -- errors to statuses ---------------------------------------------------------------------


def status_of(error: ServiceError) -> grpc.Status:
    """The gRPC status for a ``ServiceError``, with a ``BadRequest`` detail for its violations."""
    code = grpc.StatusCode[error.code.value]
    detail = status_pb2.Status(code=code.value[0], message=error.message)
    if error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=text)
                for field, text in error.violations
            ]
        )
        detail.details.add().Pack(bad)
    return rpc_status.to_status(detail)


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """End the call with the status for ``error`` (raises, as ``abort`` does)."""
    if isinstance(error, ServiceError):
        if error.violations:
            await context.abort_with_status(status_of(error))
        await context.abort(grpc.StatusCode[error.code.value], error.message)
    log.exception("internal error while serving a call", exc_info=error)
    # The type only: a repr can carry server paths; the log above has the traceback.
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error ({type(error).__name__}); the server's log has the details",
    )


class ServiceErrors:
    """Ends a call of the services under ``prefix`` with the status of what it raised."""

    def __init__(self, prefix: str) -> None:
        """Wrap the methods whose path starts with ``prefix`` (``/pkg.Service/``)."""
        self.prefix = prefix

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` with its exceptions turned into statuses (other services unchanged)."""
        if not path.startswith(self.prefix):
            return handler
        behavior = _behavior(handler)
        if handler.response_streaming:
            return rebuilt(handler, _streaming_errors(behavior))
        return rebuilt(handler, _unary_errors(behavior))


def _unary_errors(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def answered(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc

    return answered


def _streaming_errors(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def answered(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return answered


# -- metrics ----------------------------------------------------------------------------------


def status_name(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The status a finished gRPC call ends with, as a code name (``OK``, ``NOT_FOUND``…)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int) and not isinstance(code, bool):
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return str(candidate.name)
    if error is None:
        return "OK"
    if isinstance(error, grpc.aio.AbortError):
        return "UNKNOWN"
    if type(error).__name__ == "CancelledError":
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"
    return "UNKNOWN"


def _metadata_request_id(context: grpc.aio.ServicerContext) -> str | None:
    """The ``x-request-id`` the caller sent as metadata, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str):
            return value
    return None


class MetricsInterceptor:
    """Counts, times and logs every gRPC call of the server it is installed in."""

    def __init__(self, metrics: Metrics) -> None:
        """Record into ``metrics`` with transport ``grpc``."""
        self.metrics = metrics

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler of the method at ``path`` (``/pkg.Service/Method``), recording each call."""
        method = path.rsplit("/", 1)[-1]
        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream
            return rebuilt(handler, self._streaming(method, inner))
        inner = handler.unary_unary or handler.stream_unary
        return rebuilt(handler, self._unary(method, inner))

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """``behavior`` (one response) recorded as a call of ``method``."""
        metrics = self.metrics

        async def recorded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with metrics.call("grpc", method, _metadata_request_id(context)) as call:
                try:
                    response = behavior(request, context)
                    if inspect.isawaitable(response):
                        response = await response
                except BaseException as exc:
                    call.finish(status_name(context, exc))
                    raise
                call.finish(status_name(context, None), nodes_evaluated(response))
                return response

        return recorded

    def _streaming(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """``behavior`` (a response stream) recorded as a call of ``method``."""
        metrics = self.metrics

        async def recorded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with metrics.call("grpc", method, _metadata_request_id(context)) as call:
                nodes = 0
                try:
                    responses = behavior(request, context)
                    if hasattr(responses, "__aiter__"):
                        async for response in responses:
                            nodes += nodes_evaluated(response)
                            yield response
                    elif inspect.isawaitable(responses):
                        await responses
                    else:
                        for response in responses:
                            nodes += nodes_evaluated(response)
                            yield response
                except BaseException as exc:
                    call.finish(status_name(context, exc))
                    raise
                call.finish(status_name(context, None), nodes)

        return recorded


# -- registration -------------------------------------------------------------------------------


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped on first use, then reused."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrappers: Sequence[HandlerWrapper]) -> None:
        self.inner = inner
        self.wrappers = wrappers
        self.done: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path = details.method  # type: ignore[attr-defined]
        if path not in self.done:
            handler = self.inner.service(details)
            self.done[path] = None if handler is None else _wrapped(path, handler, self.wrappers)
        return self.done[path]


def _wrapped(
    path: str, handler: grpc.RpcMethodHandler, wrappers: Sequence[HandlerWrapper]
) -> grpc.RpcMethodHandler:
    """``handler`` wrapped by every wrapper (the first outermost), sending bytes as they are."""
    for wrapper in reversed(wrappers):
        handler = wrapper.wrap(path, handler)
    return rebuilt(
        handler, response_serializer=_serializer_passing_wire(handler.response_serializer)
    )


def _serializer_passing_wire(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """A response serializer that sends serialized responses (``codec.Wire``) as they are."""

    def serializer(response: Any) -> bytes:
        if isinstance(response, Wire):
            return response.data
        return serialize(response) if serialize is not None else response

    return serializer


class Registrar:
    """Stands in for the server while generated ``add_*_to_server`` functions register
    services, so that every handler is wrapped once, at registration."""

    def __init__(self, server: grpc.aio.Server, wrappers: Sequence[HandlerWrapper]) -> None:
        """Register into ``server``, wrapping with ``wrappers`` (the first outermost)."""
        self.server = server
        self.wrappers = wrappers

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Register generic handlers, wrapped."""
        self.server.add_generic_rpc_handlers(
            tuple(_WrappedGeneric(h, self.wrappers) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """Register a service's method handlers, wrapped."""
        self.server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service,
            {m: _wrapped(f"/{service}/{m}", h, self.wrappers) for m, h in handlers.items()},
        )
