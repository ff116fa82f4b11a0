"""Rebuilding gRPC method handlers: the one place that knows grpc's four handler kinds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["rebuilt"]


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
