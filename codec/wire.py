"""Serialized messages with big number arrays, written straight from numpy.

A ``repeated double`` field (packed, as proto3 packs it) and a ``bytes``
field holding little-endian float64s have the same wire form: a tag, a
length, the raw numbers. Protobuf also parses concatenated encodings as one
message (fields may come in any order). So a response is its small header
message serialized as usual, followed by each array as one such field, joined
with a single copy; the protobuf runtime would instead copy each array into
the message and again while serializing it (about 30 ms for 16 MB here,
against under 1 ms).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

__all__ = ["Wire", "after_header", "varint", "with_arrays", "with_fields", "with_message"]

_F64 = np.dtype("<f8")
_LENGTH_DELIMITED = 2
_ARRAY_FIELD_TYPES = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_BYTES)


@dataclass(frozen=True, slots=True)
class Wire:
    """A serialized message, sent as it is."""

    data: bytes


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def with_arrays(head: Message, arrays: Iterable[tuple[str, np.ndarray]]) -> Wire:
    """``head`` serialized, then each ``(field name, array)`` as that field's float64 content.

    Each named field must be a ``repeated double`` or a ``bytes`` field left
    empty in ``head``; arrays are written row-major as little-endian float64.
    """
    return after_header(head.SerializeToString(), head.DESCRIPTOR, arrays)


def after_header(
    header: bytes, descriptor: Descriptor, arrays: Iterable[tuple[str, np.ndarray]]
) -> Wire:
    """``with_arrays`` for a header already serialized (``descriptor``: its message type)."""
    parts: list[bytes | memoryview] = [header]
    for name, array in arrays:
        tag = _array_tag(descriptor, name)
        flat = np.ascontiguousarray(array, dtype=_F64).reshape(-1)
        if not flat.size:
            continue
        parts.append(tag + varint(flat.nbytes))
        parts.append(memoryview(flat).cast("B"))  # type: ignore[arg-type]
    return Wire(b"".join(parts))


def with_fields(head: Message, arrays: Iterable[tuple[str, np.ndarray]]) -> Message:
    """``head`` with each ``(field name, array)`` set in its field, as ``with_arrays`` writes
    them, for callers that need the message itself (the JSON mapping); returns ``head``."""
    fields = head.DESCRIPTOR.fields_by_name
    for name, array in arrays:
        flat = np.ascontiguousarray(array, dtype=_F64).reshape(-1)
        if fields[name].type == FieldDescriptor.TYPE_BYTES:
            setattr(head, name, flat.tobytes())
        else:
            getattr(head, name).extend(flat.tolist())
    return head


@functools.cache
def _array_tag(descriptor: Descriptor, name: str) -> bytes:
    """The tag bytes of array field ``name`` of ``descriptor`` (computed once per field)."""
    field = descriptor.fields_by_name[name]
    if field.type not in _ARRAY_FIELD_TYPES:
        raise TypeError(f"{descriptor.name}.{name} is not a double or bytes field")
    return varint((field.number << 3) | _LENGTH_DELIMITED)


def with_message(head: Message, field: str, message: bytes) -> Wire:
    """``head`` serialized, then ``message`` (already serialized) as its message field ``field``.

    Sends a big embedded message (a graph) without copying it into ``head``
    first, which costs the protobuf runtime more than serializing it.
    """
    descriptor = head.DESCRIPTOR.fields_by_name[field]
    if descriptor.type != FieldDescriptor.TYPE_MESSAGE:
        raise TypeError(f"{head.DESCRIPTOR.name}.{field} is not a message field")
    tag = varint((descriptor.number << 3) | _LENGTH_DELIMITED)
    return Wire(b"".join([head.SerializeToString(), tag, varint(len(message)), message]))
