"""The outcome of one evaluation, from a single response or reassembled from a stream.

Numbers arrive as little-endian float64 bytes and become numpy arrays with
one copy at most (a stream's chunks are written into one preallocated array
by slice), never a Python float per element.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from micrograd.codec import f64_array, response_arrays
from micrograd.engine import Value
from micrograd.v1 import gradient_service_pb2 as pb

from .errors import RemoteError

try:  # the C write-back onto Value nodes, when the extension is built
    from micrograd.native import assign_values as _native_assign_values
except ImportError:  # pragma: no cover - pure-Python installs
    _native_assign_values = None  # type: ignore[assignment]

__all__ = [
    "Chunk",
    "Result",
    "StreamAssembly",
    "apply_backward",
    "result_from_response",
    "stream_message",
]


@dataclass(frozen=True)
class Result:
    """Values and gradients of the reported nodes of one ``evaluate`` call.

    ``values`` and ``grads`` are ``(k,)`` for one binding or ``(rows, k)``
    for a batch, column j belonging to node ``nodes[j]``; ``grads`` is
    ``None`` when gradients were not asked for. ``by_name`` maps each
    reported named node to ``(value, grad)`` (floats, or ``(rows,)`` arrays
    for a batch); ``names`` maps the same names to their column.
    """

    values: np.ndarray
    grads: np.ndarray | None
    nodes: np.ndarray
    output: int
    graph_id: str
    rows: int
    node_count: int
    by_name: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> tuple[Any, Any]:
        """``result["a"]`` is ``result.by_name["a"]``: the named node's ``(value, grad)``."""
        return self.by_name[name]


def _build(
    header: pb.EvaluateResponse,
    values: np.ndarray,
    grads: np.ndarray | None,
    batched: bool,
) -> Result:
    """Attach indices and names (from the header fields) to the decoded arrays."""
    nodes = (
        np.array(header.nodes, dtype=np.int64)
        if len(header.nodes)
        else np.arange(header.node_count, dtype=np.int64)
    )
    by_name: dict[str, tuple[Any, Any]] = {}
    for name, pos in header.names.items():
        if batched:
            by_name[name] = (values[:, pos], None if grads is None else grads[:, pos])
        else:
            by_name[name] = (float(values[pos]), None if grads is None else float(grads[pos]))
    return Result(
        values=values,
        grads=grads,
        nodes=nodes,
        output=int(header.output),
        graph_id=header.graph_id,
        rows=max(int(header.rows), 1),
        node_count=int(header.node_count),
        by_name=by_name,
        names=dict(header.names),
    )


def result_from_response(
    resp: pb.EvaluateResponse, batched: bool, gradients: bool = True
) -> Result:
    """The ``Result`` of a unary ``Evaluate`` (either wire form of the numbers)."""
    values, grads = response_arrays(resp, batched)
    return _build(resp, values, grads if gradients else None, batched)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A value or gradient chunk of an ``EvaluateStream``, read straight from its bytes."""

    part: int
    offset: int
    data: np.ndarray
    """The chunk's numbers: a read-only view of the received bytes (no copy)."""


_CHUNK_PARTS = frozenset((pb.PART_VALUES, pb.PART_GRADIENTS))


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; ``IndexError`` past the end."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def stream_message(data: bytes) -> pb.EvaluateStreamResponse | Chunk:
    """One ``EvaluateStream`` message from its bytes: a binary chunk (``part``, ``offset``,
    ``data_f64``) as a ``Chunk`` viewing them, anything else parsed by protobuf.

    The protobuf runtime would copy each chunk's numbers into a new ``bytes``
    before they could be read; this reads the three fields in place.
    """
    part = offset = 0
    start = end = -1
    pos, n = 0, len(data)
    try:
        while pos < n:
            tag, pos = _varint(data, pos)
            if tag == 0x08:  # part, varint
                part, pos = _varint(data, pos)
            elif tag == 0x18:  # offset, varint
                offset, pos = _varint(data, pos)
            elif tag == 0x2A:  # data_f64, length-delimited
                size, pos = _varint(data, pos)
                start, end = pos, pos + size
                pos = end
            else:  # a header, doubles, or a field this reader does not know
                return pb.EvaluateStreamResponse.FromString(data)
    except IndexError:
        return pb.EvaluateStreamResponse.FromString(data)
    if pos != n or start < 0 or part not in _CHUNK_PARTS or (end - start) % 8:
        return pb.EvaluateStreamResponse.FromString(data)
    view = np.frombuffer(data, dtype="<f8", count=(end - start) // 8, offset=start)
    return Chunk(part, offset, view)


class StreamAssembly:
    """Collects an ``EvaluateStream`` (header, value chunks, gradient chunks) into a ``Result``."""

    def __init__(self, batched: bool, gradients: bool) -> None:
        """``batched``: the request had a batch; ``gradients``: gradient chunks are expected."""
        self.batched = batched
        self.gradients = gradients
        self.header: pb.EvaluateResponse | None = None
        self.values = np.empty(0)
        self.grads = np.empty(0)
        self.filled = {pb.PART_VALUES: 0, pb.PART_GRADIENTS: 0}

    def add(self, msg: pb.EvaluateStreamResponse | Chunk) -> None:
        """Take one message of the stream (as protobuf gives it, or a ``Chunk``)."""
        if isinstance(msg, Chunk):
            self._put(msg.part, msg.offset, msg.data)
            return
        if msg.part == pb.PART_HEADER:
            self.header = msg.header
            k = len(msg.header.nodes) or int(msg.header.node_count)
            size = k * max(int(msg.header.rows), 1)
            self.values = np.empty(size, dtype=np.float64)
            self.grads = np.empty(size if self.gradients else 0, dtype=np.float64)
            return
        data = f64_array(msg.data_f64) if msg.data_f64 else np.array(msg.data, dtype=np.float64)
        self._put(msg.part, int(msg.offset), data)

    def _put(self, part: int, start: int, data: np.ndarray) -> None:
        """Write one chunk's numbers at ``start`` of the values or the gradients."""
        if self.header is None:
            raise RemoteError("EvaluateStream sent a chunk before its header")
        target = self.values if part == pb.PART_VALUES else self.grads
        if start + data.shape[0] > target.shape[0]:
            raise RemoteError(
                f"EvaluateStream chunk at offset {start} with {data.shape[0]} numbers overruns "
                f"the {target.shape[0]} announced by the header"
            )
        target[start : start + data.shape[0]] = data
        self.filled[part] += data.shape[0]

    def result(self) -> Result:
        """The assembled ``Result``; raises ``RemoteError`` if the stream ended early."""
        if self.header is None:
            raise RemoteError("EvaluateStream ended without sending a header")
        if self.filled[pb.PART_VALUES] != self.values.shape[0] or (
            self.gradients and self.filled[pb.PART_GRADIENTS] != self.grads.shape[0]
        ):
            raise RemoteError(
                f"EvaluateStream ended early: got {self.filled[pb.PART_VALUES]} values and "
                f"{self.filled[pb.PART_GRADIENTS]} gradients of {self.values.shape[0]} each"
            )
        values: np.ndarray = self.values
        grads: np.ndarray = self.grads
        if self.batched:
            rows = max(int(self.header.rows), 1)
            values = values.reshape(rows, -1)
            grads = grads.reshape(rows, -1) if self.gradients else grads
        return _build(self.header, values, grads if self.gradients else None, self.batched)


def apply_backward(order: Sequence[Value], values: np.ndarray, grads: np.ndarray) -> None:
    """Write a remote backward pass onto the ``Value`` nodes (tape order) as ``backward()`` would.

    Every node takes its value; interior nodes take this pass's gradient and
    leaves (inputs and constants) add it to what they hold. In C when the
    extension is built.
    """
    if (
        _native_assign_values is not None
        and isinstance(order, list)
        and values.shape == grads.shape == (len(order),)
        and _native_assign_values(order, values, grads)
    ):
        return
    for v, x, g in zip(order, values.tolist(), grads.tolist()):
        v.data = x
        if v.op.arity:
            v.grad = g
        else:
            v.grad += g
