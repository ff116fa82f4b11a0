"""Graphs between protobuf messages and tapes, column by column.

``PackedGraph`` maps onto a ``Tape`` with a handful of vectorised numpy
operations (no Python per node). The one-message-per-node ``Graph`` form is
decoded from its wire bytes by the native decoder when it is built, and by a
Python walk otherwise. Both end in ``Tape.from_arrays``, which validates.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Mapping

import numpy as np
from micrograd import ops as _ops
from micrograd.engine import Value
from micrograd.errors import GraphError
from micrograd.tape import Tape
from micrograd.v1 import graph_pb2

from .malformed import shown

try:  # the native decoders, when the C extension is built (they read little-endian hosts' memory)
    from micrograd.native import decode_graph as _native_decode_graph
    from micrograd.native import pack_value as _native_pack_value
    from micrograd.native import unpack_columns as _native_unpack_columns

    if sys.byteorder != "little":  # pragma: no cover
        raise ImportError("native decoders assume a little-endian host")
except ImportError:  # pragma: no cover - exercised on machines without a compiler
    _native_decode_graph = None  # type: ignore[assignment]
    _native_unpack_columns = None  # type: ignore[assignment]
    _native_pack_value = None  # type: ignore[assignment]

__all__ = [
    "GraphTooLarge",
    "encode_value",
    "from_graph",
    "from_graph_bytes",
    "graph_id",
    "pack",
    "pack_value",
    "to_graph",
    "unpack",
]

_VALUE_OPS = [op.name for op in _ops.OPS if op.uses_value]
_VALUE_USERS = ", ".join(_VALUE_OPS[:-1]) + " and " + _VALUE_OPS[-1]
"""The ops whose nodes carry a value, for messages."""
_U32 = np.dtype("<u4")
_F64 = np.dtype("<f8")


class GraphTooLarge(GraphError):
    """A graph with more nodes than the caller allows (a resource limit, not a malformed graph)."""


def _check_size(n: int, max_nodes: int | None, field: str) -> None:
    """Raise ``GraphTooLarge`` when ``n`` nodes exceed ``max_nodes``."""
    if max_nodes is not None and n > max_nodes:
        raise GraphTooLarge(
            None, f"the graph has {n} nodes; this server accepts at most {max_nodes}", field
        )


def pack(tape: Tape) -> graph_pb2.PackedGraph:
    """The tape as a ``PackedGraph``: little-endian byte columns."""
    arity = _ops.ARITY[tape.code]
    if tape.arg2 is None:
        both = np.stack((tape.arg0, tape.arg1), axis=1)
        present = np.stack((arity >= 1, arity == 2), axis=1)
    else:
        both = np.stack((tape.arg0, tape.arg1, tape.arg2), axis=1)
        present = np.stack((arity >= 1, arity >= 2, arity == 3), axis=1)
    return graph_pb2.PackedGraph(
        ops=tape.code.tobytes(),
        args=both[present].astype(_U32).tobytes(),
        values=tape.const[_ops.USES_VALUE[tape.code]].astype(_F64).tobytes(),
        names=[
            graph_pb2.NodeName(node=i, name=name)
            for name, i in sorted(tape.names.items(), key=lambda item: item[1])
        ],
    )


def unpack(
    msg: graph_pb2.PackedGraph, max_nodes: int | None = None, max_name_bytes: int | None = None
) -> Tape:
    """Decode and validate a ``PackedGraph`` (one C pass, or numpy); raises ``GraphError``.

    ``max_nodes`` and ``max_name_bytes`` (UTF-8 bytes of one node name) are the limits."""
    ops, args, values = msg.ops, msg.args, msg.values
    n = len(ops)
    if n == 0:
        raise GraphError(None, "the graph has no nodes (ops is empty)", "ops")
    _check_size(n, max_nodes, "ops")
    if len(args) % 4:
        raise GraphError(
            None, f"args has {len(args)} bytes, not a multiple of 4 (uint32 each)", "args"
        )
    if len(values) % 8:
        raise GraphError(
            None, f"values has {len(values)} bytes, not a multiple of 8 (float64 each)", "values"
        )
    code = np.frombuffer(ops, dtype=np.uint8)
    names = _names(((nn.node, nn.name) for nn in msg.names), "names", max_name_bytes)
    if _native_unpack_columns is not None:
        arg0, arg1, arg2, const = _native_unpack_columns(ops, args, values)
        return Tape.from_checked_columns(code, arg0, arg1, const, names, arg2)
    arg0, arg1, arg2, const = _unpack_numpy(code, args, values)
    return Tape.from_arrays(code, arg0, arg1, const, names, arg2)


def _unpack_numpy(
    code: np.ndarray, args_bytes: bytes, values_bytes: bytes
) -> tuple[np.ndarray, ...]:
    """``(arg0, arg1, arg2, const)`` of packed columns with numpy (no native kernel here)."""
    bad = np.flatnonzero((code < 1) | (code > _ops.MAX_CODE))
    if bad.size:
        i = int(bad[0])
        raise GraphError(i, _ops.unknown_op(int(code[i])), f"ops[{i}]")
    arity = _ops.ARITY[code].astype(np.int64)
    args = np.frombuffer(args_bytes, dtype=_U32)
    needed = int(arity.sum())
    if args.shape[0] != needed:
        raise GraphError(
            None,
            f"args holds {args.shape[0]} indices but the ops need {needed} (their arities)",
            "args",
        )
    start = np.cumsum(arity) - arity
    arg0 = np.full(code.shape[0], -1, dtype=np.int64)
    arg1 = np.full(code.shape[0], -1, dtype=np.int64)
    arg2 = np.full(code.shape[0], -1, dtype=np.int64)
    one, two, three = arity >= 1, arity >= 2, arity == 3
    arg0[one] = args[start[one]]
    arg1[two] = args[start[two] + 1]
    arg2[three] = args[start[three] + 2]
    values = np.frombuffer(values_bytes, dtype=_F64)
    uses = _ops.USES_VALUE[code]
    if values.shape[0] != int(uses.sum()):
        raise GraphError(
            None,
            f"values holds {values.shape[0]} numbers but {int(uses.sum())} nodes use one "
            f"({_VALUE_USERS} nodes, in order)",
            "values",
        )
    const = np.zeros(code.shape[0], dtype=np.float64)
    const[uses] = values
    return arg0, arg1, arg2, const


def from_graph(
    msg: graph_pb2.Graph, max_nodes: int | None = None, max_name_bytes: int | None = None
) -> Tape:
    """Decode and validate a one-message-per-node ``Graph``; raises ``GraphError``."""
    if _native_decode_graph is not None:
        return from_graph_bytes(msg.SerializeToString(), max_nodes, max_name_bytes)
    n = len(msg.nodes)
    if n == 0:
        raise GraphError(None, "the graph has no nodes", "nodes")
    _check_size(n, max_nodes, "nodes")
    code = np.zeros(n, dtype=np.int64)
    arg0 = np.full(n, -1, dtype=np.int64)
    arg1 = np.full(n, -1, dtype=np.int64)
    arg2 = np.full(n, -1, dtype=np.int64)
    const = np.zeros(n, dtype=np.float64)
    named: list[tuple[int, str]] = []
    for i, node in enumerate(msg.nodes):
        code[i] = node.op
        args = node.args
        if len(args) > _ops.MAX_ARITY:
            raise GraphError(
                i,
                f"has {len(args)} arguments; no op takes more than {_ops.MAX_ARITY}",
                f"nodes[{i}].args",
            )
        for col, arg in zip((arg0, arg1, arg2), args):
            col[i] = arg
        const[i] = node.value
        if node.name:
            named.append((i, node.name))
    return _tape_from_columns(code, arg0, arg1, arg2, const, named, max_name_bytes)


def from_graph_bytes(
    data: bytes, max_nodes: int | None = None, max_name_bytes: int | None = None
) -> Tape:
    """Decode a serialized ``Graph`` straight from its wire bytes (native decoder if built)."""
    if _native_decode_graph is None:
        return from_graph(graph_pb2.Graph.FromString(data), max_nodes, max_name_bytes)
    code, arg0, arg1, arg2, const, named = _native_decode_graph(data)  # GraphError if malformed
    n = len(code)
    if n == 0:
        raise GraphError(None, "the graph has no nodes", "nodes")
    _check_size(n, max_nodes, "nodes")
    return _tape_from_columns(code, arg0, arg1, arg2, const, named, max_name_bytes)


def _tape_from_columns(
    code: np.ndarray,
    arg0: np.ndarray,
    arg1: np.ndarray,
    arg2: np.ndarray | None,
    const: np.ndarray,
    named: list[tuple[int, str]],
    max_name_bytes: int | None = None,
) -> Tape:
    """Shared tail of both ``Graph`` decoders: check ops with wire field names, build the tape."""
    bad = np.flatnonzero((code < 1) | (code > _ops.MAX_CODE))
    if bad.size:
        i = int(bad[0])
        raise GraphError(i, _ops.unknown_op(int(code[i])), f"nodes[{i}].op")
    names = _names(named, "nodes", max_name_bytes, per_node=True)
    return Tape.from_arrays(code, arg0, arg1, const, names, arg2)


def _names(
    pairs: Iterable[tuple[int, str]],
    field: str,
    max_name_bytes: int | None = None,
    per_node: bool = False,
) -> dict[str, int]:
    """Collect ``(node, name)`` pairs into a dict, rejecting empty, duplicate and (beyond
    ``max_name_bytes`` of UTF-8) overlong names."""
    names: dict[str, int] = {}
    for j, (node, name) in enumerate(pairs):
        where = f"{field}[{node}].name" if per_node else f"{field}[{j}]"
        if not name:
            raise GraphError(None, "a name must not be empty", where)
        if max_name_bytes is not None and len(name) * 4 > max_name_bytes:
            size = len(name.encode("utf-8", "surrogatepass"))
            if size > max_name_bytes:
                raise GraphError(
                    None,
                    f"the name {shown(name)} is {size} bytes long; this server accepts names "
                    f"of at most {max_name_bytes} bytes (max_name_bytes)",
                    where,
                )
        if name in names:
            raise GraphError(
                node, f"name {shown(name)} is used twice (nodes {names[name]} and {node})", where
            )
        names[name] = int(node)
    return names


def to_graph(tape: Tape) -> graph_pb2.Graph:
    """The tape as a one-message-per-node ``Graph`` (per-node Python: small graphs, tests)."""
    arity = _ops.ARITY.tolist()
    name_of = {i: name for name, i in tape.names.items()}
    nodes = []
    third = [-1] * len(tape) if tape.arg2 is None else tape.arg2.tolist()
    for i, (k, a, b, z, c) in enumerate(
        zip(
            tape.code.tolist(), tape.arg0.tolist(), tape.arg1.tolist(), third, tape.const.tolist()
        )
    ):
        args = [a, b, z][: arity[k]]
        nodes.append(graph_pb2.Node(op=k, args=args, value=c, name=name_of.get(i, "")))
    return graph_pb2.Graph(nodes=nodes)


def graph_id(tape: Tape) -> str:
    """Content hash of a graph, the same whichever wire form it arrived in."""
    h = hashlib.sha256(b"micrograd.v1 graph\0")
    h.update(len(tape).to_bytes(8, "little"))
    # Each column hashed in place (no copy when it already has the hashed dtype).
    h.update(np.ascontiguousarray(tape.code).data)
    h.update(np.ascontiguousarray(tape.arg0, dtype="<i4").data)
    h.update(np.ascontiguousarray(tape.arg1, dtype="<i4").data)
    if tape.arg2 is not None:  # only graphs with a ternary node: older ids stay as they were
        h.update(b"arg2\0")
        h.update(np.ascontiguousarray(tape.arg2, dtype="<i4").data)
    h.update(np.ascontiguousarray(tape.const, dtype=_F64).data)
    for name, i in sorted(tape.names.items()):
        h.update(f"{i}\0{name}\0".encode())
    return "sha256:" + h.hexdigest()


def encode_value(
    root: Value, names: Mapping[str, Value] | None = None
) -> tuple[graph_pb2.PackedGraph, Tape, list[Value]]:
    """Compile ``root``'s graph; return the packed message, the tape and the nodes in tape order."""
    tape, order = Tape.from_value(root, names)
    return pack(tape), tape, order


def pack_value(
    root: Value, names: Mapping[str, Value] | None = None
) -> tuple[graph_pb2.PackedGraph, list[Value]]:
    """``root``'s graph as a ``PackedGraph`` and its nodes in tape order, without a tape.

    The native walk writes the wire columns directly (no Python per node);
    without the extension this is ``encode_value`` minus the tape. The message
    is the one ``pack(Tape.from_value(root, names)[0])`` gives.
    """
    targets = list((names or {}).values())
    walked = _native_pack_value(root, targets) if _native_pack_value is not None else None
    if walked is None:
        message, _, order = encode_value(root, names)
        return message, order
    order, ops, args, values, found = walked
    labels: list[tuple[int, str]] = []
    for name, i in zip((names or {}), found, strict=True):
        if i < 0:
            raise GraphError(None, f"input {name!r} is not part of the graph")
        labels.append((i, name))
    labels.sort(key=lambda item: item[0])
    return (
        graph_pb2.PackedGraph(
            ops=ops,
            args=args,
            values=values,
            names=[graph_pb2.NodeName(node=i, name=name) for i, name in labels],
        ),
        order,
    )
