"""Why bytes are not a valid protobuf message, said precisely, and echoed input kept short.

The protobuf runtime only says "Error parsing message". ``parse`` runs it
and, when it fails, walks the bytes once more with the message's descriptor
to name the first fault: the field path (``graph.nodes[3].name``), the byte
offset, and what is wrong there (a truncated varint, a length past the end,
an invalid wire type, invalid UTF-8 in a string, groups nested too deep).
The walk is iterative and bounded (``_MAX_FIELDS``), and runs only for bytes
the runtime already rejected, so valid requests pay nothing.

``clip`` shortens any client-supplied text before it is echoed in an error,
so that a 1 MiB name cannot blow up a status trailer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

__all__ = ["ECHO_LIMIT", "MAX_DEPTH", "MalformedMessage", "clip", "explain", "parse", "shown"]

ECHO_LIMIT = 200
"""Characters of client input an error message echoes; longer text ends in an ellipsis."""

MAX_DEPTH = 100
"""Nesting of messages and groups the protobuf runtime parses (its recursion limit)."""

_MAX_FIELDS = 1_000_000
"""Fields the explaining walk visits before it gives up locating the fault."""

M = TypeVar("M", bound=Message)

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_FIXED = {
    FieldDescriptor.TYPE_DOUBLE: 8,
    FieldDescriptor.TYPE_FIXED64: 8,
    FieldDescriptor.TYPE_SFIXED64: 8,
    FieldDescriptor.TYPE_FLOAT: 4,
    FieldDescriptor.TYPE_FIXED32: 4,
    FieldDescriptor.TYPE_SFIXED32: 4,
}
_VARINTS = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_ENUM,
}


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters plus an ellipsis and its full length, and with
    characters that cannot be written as UTF-8 (lone surrogates) escaped."""
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text)} characters)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` as an error message echoes it: clipped (see ``clip``)."""
    return clip(repr(value), limit)


class MalformedMessage(ValueError):
    """Bytes that do not parse as the message: ``field`` (a path, or ``""``) and ``reason``."""

    def __init__(self, type_name: str, field: str, reason: str) -> None:
        """A fault at ``field`` (``graph.nodes[3].name``; ``""`` for the message as a whole)."""
        self.type_name = type_name
        self.field = field
        self.reason = reason
        where = f"{field}: " if field else ""
        super().__init__(f"the request is not a valid {type_name}: {where}{reason}")


def parse(message_type: type[M], data: bytes) -> M:
    """``data`` parsed as ``message_type``; ``MalformedMessage`` naming the fault if it is not."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        descriptor = message_type.DESCRIPTOR
        found = explain(descriptor, data)
        if found is None:
            found = ("", f"the protobuf runtime rejects the {len(data)} bytes ({clip(str(exc))})")
        raise MalformedMessage(descriptor.full_name, *found) from None


@dataclass
class _Frame:
    """One message (or group) being walked: where it ends and how its fields are named."""

    descriptor: Descriptor | None
    end: int
    path: str
    group: int = 0
    """The field number of the group this frame is (0: a length-delimited message)."""
    seen: dict[int, int] = field(default_factory=dict)
    """Occurrences so far of each repeated field, for ``nodes[i]`` paths."""


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int] | str:
    """``(value, next position)`` of the varint at ``pos``, or what is wrong with it."""
    value = shift = 0
    start = pos
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if pos - start >= 10:
            return f"a varint at byte {start} is longer than 10 bytes"
    return f"a varint at byte {start} is cut off by the end of the data (byte {end})"


def _name(frame: _Frame, fd: FieldDescriptor | None, number: int) -> str:
    """The path of field ``number`` within ``frame`` (indexed when repeated)."""
    if fd is None:
        return f"{frame.path}<field {number}>"
    if fd.is_repeated:
        i = frame.seen.get(number, 0)
        frame.seen[number] = i + 1
        return f"{frame.path}{fd.name}[{i}]"
    return frame.path + fd.name


def explain(descriptor: Descriptor, data: bytes) -> tuple[str, str] | None:
    """``(field path, reason)`` of the first fault in ``data`` read as ``descriptor``'s
    message, or ``None`` if the walk finds none (or gives up after ``_MAX_FIELDS`` fields)."""
    stack = [_Frame(descriptor, len(data), "")]
    pos = 0
    visited = 0
    while stack:
        frame = stack[-1]
        if pos >= frame.end:
            if frame.group:
                return frame.path.rstrip("."), (
                    f"group {frame.group} is not closed before byte {frame.end}"
                )
            stack.pop()
            continue
        visited += 1
        if visited > _MAX_FIELDS:
            return None
        tag_at = pos
        got = _varint(data, pos, frame.end)
        if isinstance(got, str):
            return frame.path.rstrip("."), f"a field tag: {got}"
        tag, pos = got
        number, wire = tag >> 3, tag & 7
        if number == 0:
            return frame.path.rstrip("."), f"field number 0 (byte {tag_at}) is not allowed"
        if wire > _I32:
            return frame.path.rstrip("."), (
                f"wire type {wire} (byte {tag_at}, field {number}) does not exist"
            )
        fd = frame.descriptor.fields_by_number.get(number) if frame.descriptor else None
        if wire == _EGROUP:
            if frame.group != number:
                return frame.path.rstrip("."), (
                    f"an end-group tag for field {number} (byte {tag_at}) closes no open group"
                )
            stack.pop()
            continue
        path = _name(frame, fd, number)
        if wire == _VARINT:
            got = _varint(data, pos, frame.end)
            if isinstance(got, str):
                return path, got
            pos = got[1]
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if pos + size > frame.end:
                return path, (
                    f"a {size * 8}-bit value at byte {pos} is cut off by the end of the data "
                    f"(byte {frame.end})"
                )
            pos += size
        elif wire == _SGROUP:
            if len(stack) > MAX_DEPTH:
                return path, f"messages and groups nest more than {MAX_DEPTH} deep (byte {tag_at})"
            group = fd.message_type if fd is not None and fd.type == fd.TYPE_GROUP else None
            inner = path + "." if group is not None else frame.path
            stack.append(_Frame(group, frame.end, inner, group=number))
        else:
            got = _varint(data, pos, frame.end)
            if isinstance(got, str):
                return path, f"a length: {got}"
            length, pos = got
            if length > frame.end - pos:
                return path, (
                    f"a length of {length} bytes at byte {tag_at} runs past the end of the data "
                    f"({frame.end - pos} bytes left)"
                )
            problem = _contents(fd, data, pos, length)
            if problem is not None:
                return path, problem
            if fd is not None and fd.type == fd.TYPE_MESSAGE:
                if len(stack) > MAX_DEPTH:
                    return path, (
                        f"messages and groups nest more than {MAX_DEPTH} deep (byte {tag_at})"
                    )
                stack.append(_Frame(fd.message_type, pos + length, path + "."))
                continue
            pos += length
    return None


def _contents(fd: FieldDescriptor | None, data: bytes, pos: int, length: int) -> str | None:
    """What is wrong with the contents of a length-delimited scalar field, if anything."""
    if fd is None:
        return None
    if fd.type == fd.TYPE_STRING:
        try:
            data[pos : pos + length].decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"the string is not valid UTF-8 (byte {pos + exc.start})"
        return None
    size = _FIXED.get(fd.type)
    if size is not None and length % size:
        return f"{length} bytes of packed {size * 8}-bit values is not a whole number of them"
    if fd.type in _VARINTS:
        at, end = pos, pos + length
        while at < end:
            got = _varint(data, at, end)
            if isinstance(got, str):
                return f"packed values: {got}"
            at = got[1]
    return None
