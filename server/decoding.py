"""Request bytes that do not parse: INVALID_ARGUMENT saying what is wrong, never UNKNOWN.

gRPC answers a request deserializer that raises with UNKNOWN ("Unexpected
<class DecodeError>"). ``tolerant`` rebuilds a method handler, once at
registration, with a deserializer that never raises: bytes that do not
parse become an ``Undecodable`` carrying ``codec.malformed``'s account of the
fault, and the handler's behavior answers it with INVALID_ARGUMENT (a
unary request) or raises it as a ``ServiceError`` from the request iterator
(a client stream), before any work is done.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message
from micrograd.codec.malformed import MalformedMessage, parse

from .handlers import rebuilt
from .service import Code, ServiceError

__all__ = ["Undecodable", "tolerant"]


class Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: MalformedMessage) -> None:
        """``error`` says which field is malformed and how."""
        self.error = error

    def service_error(self) -> ServiceError:
        """The INVALID_ARGUMENT the call is answered with."""
        error = self.error
        field = error.field or "request"
        return ServiceError(Code.INVALID_ARGUMENT, str(error), [(field, error.reason)])


def _deserializer(message_type: type[Message]) -> Callable[[bytes], Any]:
    """Bytes -> message, or ``Undecodable`` when they do not parse."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(message_type, data)
        except MalformedMessage as exc:
            return Undecodable(exc)

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream that raises the ``ServiceError`` of the first undecodable message."""
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.service_error()
        yield request


def tolerant(
    handler: grpc.RpcMethodHandler, status_of: Callable[[ServiceError], grpc.Status]
) -> grpc.RpcMethodHandler:
    """``handler`` with requests that do not parse answered INVALID_ARGUMENT (``status_of``
    turns the error into the status); handlers of non-protobuf requests are left alone."""
    message_type = getattr(handler.request_deserializer, "__self__", None)
    if not (isinstance(message_type, type) and issubclass(message_type, Message)):
        return handler
    if handler.request_streaming:
        inner = handler.stream_stream or handler.stream_unary
    else:
        inner = handler.unary_stream or handler.unary_unary

    async def refuse(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
        await context.abort_with_status(status_of(error))

    if handler.request_streaming and inspect.isasyncgenfunction(inner):

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for response in inner(_checked(requests), context):
                    yield response
            except ServiceError as exc:
                await refuse(context, exc)

        behavior: Callable[..., Any] = stream_stream
    elif handler.request_streaming:

        async def stream_in(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                result = inner(_checked(requests), context)
                return await result if inspect.isawaitable(result) else result
            except ServiceError as exc:
                await refuse(context, exc)

        behavior = stream_in
    elif inspect.isasyncgenfunction(inner):

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await refuse(context, request.service_error())
            async for response in inner(request, context):
                yield response

        behavior = unary_stream
    else:

        async def unary_in(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await refuse(context, request.service_error())
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result

        behavior = unary_in
    return rebuilt(handler, behavior, request_deserializer=_deserializer(message_type))
