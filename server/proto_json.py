"""Strict proto3 JSON: the checks ``json_format`` leaves out, and a bound on nesting.

``json_format.ParseDict`` accepts ``true`` for an enum (as 1), ``3.5`` for an
enum (as 3), ``true`` for a double and ``[]`` for a message. ``type_problem``
walks the params against the message descriptor first (iteratively) and
names the first value whose JSON type does not belong in its field.

``nesting_depth`` measures how deep a body's arrays and objects nest without
parsing it (strings removed by one regular expression, brackets counted with
numpy), so that a body nested 100,000 deep is refused before ``json.loads``
can recurse into it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor

__all__ = ["nesting_depth", "type_problem"]

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_CHUNK = 1 << 20
_SMALL = 4096
"""Up to this many brackets are counted in Python (numpy costs more for few)."""
_OPENING = frozenset(b"[{")


def nesting_depth(body: bytes) -> int:
    """How deep the arrays and objects of the JSON text ``body`` nest (0 for a scalar)."""
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    deepest = level = 0
    if len(brackets) <= _SMALL:
        for byte in brackets:
            level += 1 if byte in _OPENING else -1
            deepest = max(deepest, level)
        return deepest
    for start in range(0, len(brackets), _CHUNK):
        codes = np.frombuffer(brackets, dtype=np.uint8)[start : start + _CHUNK]
        steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
        levels = np.cumsum(steps) + level
        deepest = max(deepest, int(levels.max()))
        level = int(levels[-1])
    return deepest


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_STRINGS = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


def _unpaired(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (``"\\ud800"``): no UTF-8 spelling exists."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_UNPAIRED = "the string holds an unpaired surrogate (\\ud800-\\udfff), which is not Unicode text"


def _scalar_problem(fd: FieldDescriptor, value: Any) -> str | None:
    """Why ``value`` cannot be the JSON of one scalar of field ``fd``, or ``None``."""
    if isinstance(value, str) and _unpaired(value):
        return _UNPAIRED
    kind = fd.type
    if kind == fd.TYPE_BOOL:
        ok = isinstance(value, bool)
        return None if ok else f"expected true or false, got {_json_type(value)}"
    if kind in _STRINGS:
        return None if isinstance(value, str) else f"expected a string, got {_json_type(value)}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        want = "an enum name or number" if kind == fd.TYPE_ENUM else "a number"
        return f"expected {want}, got {_json_type(value)}"
    if kind in _FLOATS or isinstance(value, str):
        return None
    if isinstance(value, float) and not value.is_integer():
        return f"expected a whole number, got {_json_type(value)}"
    return None


def _fields(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    """A message's fields by JSON name and by proto name (both are accepted)."""
    table: dict[str, FieldDescriptor] = {}
    for fd in descriptor.fields:
        table[fd.name] = fd
        table[fd.json_name] = fd
    return table


_TABLES: dict[str, dict[str, FieldDescriptor]] = {}


def type_problem(params: Any, descriptor: Descriptor) -> tuple[str, str] | None:
    """``(path, reason)`` of the first value of ``params`` (parsed JSON) whose type does not
    fit ``descriptor``'s message in the proto3 JSON mapping, or ``None``. Unknown fields and
    values are left to ``json_format`` (which reports them)."""
    stack: list[tuple[Any, Descriptor, str]] = [(params, descriptor, "")]
    while stack:
        value, desc, path = stack.pop()
        if not isinstance(value, dict):
            return path or "params", f"expected an object ({desc.name}), got {_json_type(value)}"
        table = _TABLES.get(desc.full_name)
        if table is None:
            table = _TABLES[desc.full_name] = _fields(desc)
        for key, item in value.items():
            if _unpaired(key):
                return path or "params", f"a member name: {_UNPAIRED}"
            fd = table.get(key)
            if fd is None or item is None:
                continue
            where = f"{path}.{key}" if path else key
            entry = fd.message_type
            if entry is not None and entry.GetOptions().map_entry:
                if not isinstance(item, dict):
                    return where, f"expected an object (a map), got {_json_type(item)}"
                value_fd = entry.fields_by_name["value"]
                for k, v in item.items():
                    if _unpaired(k):
                        return where, f"a map key: {_UNPAIRED}"
                    if value_fd.message_type is not None:
                        stack.append((v, value_fd.message_type, f"{where}[{k}]"))
                        continue
                    problem = _scalar_problem(value_fd, v)
                    if problem is not None:
                        return f"{where}[{k}]", problem
                continue
            if fd.is_repeated:
                if not isinstance(item, list):
                    return where, f"expected an array, got {_json_type(item)}"
                if entry is not None:
                    stack.extend(
                        (v, entry, f"{where}[{i}]") for i, v in reversed(list(enumerate(item)))
                    )
                    continue
                if fd.type in _FLOATS and set(map(type, item)) <= {int, float, str}:
                    continue  # the common case of a long numeric column, checked at C speed
                for i, v in enumerate(item):
                    problem = _scalar_problem(fd, v)
                    if problem is not None:
                        return f"{where}[{i}]", problem
                continue
            if entry is not None:
                stack.append((item, entry, where))
                continue
            problem = _scalar_problem(fd, item)
            if problem is not None:
                return where, problem
    return None
