"""Server reflection, v1 and v1alpha, serving descriptors that carry each field's ``json_name``.

grpcio-reflection serves ``grpc.reflection.v1alpha.ServerReflection`` from
the process's default descriptor pool, whose descriptors (as protoc embeds
them) leave ``json_name`` out; tools such as grpcurl then print snake_case
field names instead of the proto3 JSON mapping (``nodeCount``) that the docs
and JSON-RPC use. This module serves from a pool of the same files with
every ``json_name`` filled in, and answers the v1 service as well: its
messages are the v1alpha ones under another package (same fields, same
numbers), so the same servicer handles both.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = [
    "V1ALPHA_SERVICE_NAME",
    "V1_SERVICE_NAME",
    "add_reflection",
    "json_name",
    "pool_with_json_names",
]

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
"""``grpc.reflection.v1alpha.ServerReflection``."""
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
"""``grpc.reflection.v1.ServerReflection``, answered by the same servicer."""
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def json_name(field_name: str) -> str:
    """The proto3 JSON name protoc derives from a field name: ``values_f64`` -> ``valuesF64``."""
    head, *rest = field_name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _fill(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    """Set ``json_name`` on every field of ``messages`` and their nested messages."""
    stack = list(messages)
    while stack:
        message = stack.pop()
        for field in message.field:
            if not field.HasField("json_name"):
                field.json_name = json_name(field.name)
        stack.extend(message.nested_type)


def _proto(file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    _fill(proto.message_type)
    return proto


def pool_with_json_names(files: Iterable[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """A pool of ``files`` and everything they import, every field with its ``json_name``.

    It also holds the v1 reflection file (the v1alpha one under the v1 package).
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for top in files:
        # Dependencies before dependents, without recursion: a post-order walk on a stack.
        stack: list[tuple[FileDescriptor, bool]] = [(top, False)]
        while stack:
            file, ready = stack.pop()
            if file.name in added:
                continue
            if ready:
                pool.Add(_proto(file))
                added.add(file.name)
                continue
            stack.append((file, True))
            stack.extend((dep, False) for dep in file.dependencies if dep.name not in added)
    v1 = _proto(reflection_pb2.DESCRIPTOR)
    v1.name = _V1_FILE
    v1.package = "grpc.reflection.v1"
    v1.options.Clear()
    pool.Add(v1)
    return pool


def add_reflection(server: Any, services: Iterable[str], files: Iterable[FileDescriptor]) -> None:
    """Register reflection v1alpha and v1 on ``server`` for ``services`` (plus both reflections).

    ``files`` are the descriptors of those services; ``server`` is a
    ``grpc.aio.Server`` or anything with ``add_generic_rpc_handlers``.
    """
    names = (*services, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(
        names, pool=pool_with_json_names([*files, reflection_pb2.DESCRIPTOR])
    )
    for service in (V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME):
        handlers = {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        if hasattr(server, "add_registered_method_handlers"):
            server.add_registered_method_handlers(service, handlers)
