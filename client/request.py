"""Building requests: whatever the caller holds, turned into ``micrograd.v1`` messages.

A graph may be given as a ``Graph`` or ``PackedGraph`` message, a ``Tape``,
a ``Value`` (its whole expression graph) or the ``graph_id`` of a graph
registered earlier. ``prepare`` brings each to one shape, ``evaluate_request``
fills in inputs, batch, selection and output, and ``upload_pieces`` cuts a
large ``PackedGraph`` into ``UploadGraph`` messages.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from micrograd import codec
from micrograd.engine import Value
from micrograd.tape import Tape
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import graph_pb2

__all__ = [
    "GraphLike",
    "Prepared",
    "SelectionLike",
    "evaluate_request",
    "packed",
    "prepare",
    "register_request",
    "split_request",
    "stream_request",
    "upload_pieces",
    "with_source",
]

GraphLike: TypeAlias = graph_pb2.Graph | graph_pb2.PackedGraph | Tape | Value | str
"""Anything ``evaluate`` accepts as its graph."""

SelectionLike: TypeAlias = str | Sequence[int] | np.ndarray
"""``"all"``, ``"inputs"``, ``"named"``, ``"output"`` or a list of node indices."""

_SELECTIONS = {
    "all": pb.SELECTION_ALL,
    "inputs": pb.SELECTION_INPUTS,
    "named": pb.SELECTION_NAMED,
    "output": pb.SELECTION_OUTPUT,
}


@dataclass
class Prepared:
    """A graph ready to send: a message, or only an id; ``order`` maps a ``Value`` graph back."""

    message: graph_pb2.Graph | graph_pb2.PackedGraph | None
    graph_id: str | None = None
    order: list[Value] | None = None

    @property
    def node_count(self) -> int | None:
        """Number of nodes, when the graph itself is at hand."""
        if isinstance(self.message, graph_pb2.PackedGraph):
            return len(self.message.ops)
        if isinstance(self.message, graph_pb2.Graph):
            return len(self.message.nodes)
        return None

    def byte_size(self) -> int:
        """Encoded size of the graph message (0 for an id), within a few bytes per name."""
        message = self.message
        if isinstance(message, graph_pb2.PackedGraph):  # ByteSize() would walk 8 MB for 1M nodes
            columns = len(message.ops) + len(message.args) + len(message.values)
            return columns + 16 + sum(len(n.name) + 12 for n in message.names)
        return 0 if message is None else message.ByteSize()


def prepare(
    graph: GraphLike,
    names: Mapping[str, Value] | None = None,
    request: pb.EvaluateRequest | None = None,
) -> Prepared:
    """Bring any accepted graph form to a ``Prepared``; ``names`` label a ``Value`` graph.

    A ``Value`` graph has no names of its own: inputs that ``request`` binds
    by a name ``names`` does not give raise ``ValueError`` saying so.
    """
    if isinstance(graph, str):
        return Prepared(None, graph_id=graph)
    if isinstance(graph, Value):
        if request is not None:
            bound = [*request.inputs, *request.batch.columns]
            unnamed = sorted({name for name in bound if name not in (names or {})})
            if unnamed:
                first = unnamed[0]
                raise ValueError(
                    f"no input is named {', '.join(map(repr, unnamed))}: the nodes of a Value "
                    "graph have no names until you give them with names=, e.g. "
                    f"evaluate(g, inputs={{{first!r}: 2.0}}, names={{{first!r}: {first}}})"
                )
        message, order = codec.pack_value(graph, names)
        return Prepared(message, order=order)
    if names:
        raise TypeError("names= applies to a Value graph; name nodes inside the graph instead")
    if isinstance(graph, Tape):
        return Prepared(codec.pack(graph))
    if isinstance(graph, (graph_pb2.Graph, graph_pb2.PackedGraph)):
        return Prepared(graph)
    raise TypeError(
        "graph must be a micrograd.v1 Graph or PackedGraph, a Tape, a Value or a graph_id "
        f"string, not {type(graph).__name__}"
    )


def register_request(message: graph_pb2.Graph | graph_pb2.PackedGraph) -> pb.RegisterGraphRequest:
    """The ``RegisterGraphRequest`` carrying ``message``."""
    if isinstance(message, graph_pb2.PackedGraph):
        return pb.RegisterGraphRequest(packed_graph=message)
    return pb.RegisterGraphRequest(graph=message)


def packed(message: graph_pb2.Graph | graph_pb2.PackedGraph) -> graph_pb2.PackedGraph:
    """The graph as a ``PackedGraph`` (a ``Graph`` is decoded, validated and repacked)."""
    if isinstance(message, graph_pb2.PackedGraph):
        return message
    return codec.pack(codec.from_graph(message))


def _selection(request: pb.EvaluateRequest, selection: SelectionLike) -> None:
    """Set ``selection`` (and the listed ``nodes``) on the request."""
    if isinstance(selection, str):
        try:
            request.selection = _SELECTIONS[selection]
        except KeyError:
            raise ValueError(
                f"unknown selection {selection!r}; use one of {', '.join(_SELECTIONS)} "
                "or a list of node indices"
            ) from None
        return
    request.selection = pb.SELECTION_LISTED
    request.nodes.extend(np.asarray(selection, dtype=np.int64).tolist())


def _batch(request: pb.EvaluateRequest, batch: Mapping[str, Sequence[float]] | np.ndarray) -> None:
    """Fill ``request.batch``: named columns from a mapping, or a ``(rows, inputs)`` array."""
    if isinstance(batch, Mapping):
        columns = list(batch)
        if not columns:
            raise ValueError("batch has no columns")
        data = np.column_stack([np.asarray(batch[c], dtype=np.float64) for c in columns])
        request.batch.columns.extend(columns)
    else:
        data = np.asarray(batch, dtype=np.float64)
        if data.ndim != 2:
            raise ValueError(
                f"a batch array must be 2-D (rows, one column per input node), got {data.shape}"
            )
    request.batch.values_f64 = codec.f64_bytes(data)


def evaluate_request(
    *,
    inputs: Mapping[str, float] | None = None,
    output: int | None = None,
    selection: SelectionLike = "all",
    batch: Mapping[str, Sequence[float]] | np.ndarray | None = None,
    gradients: bool = True,
    binary_output: bool = True,
) -> pb.EvaluateRequest:
    """An ``EvaluateRequest`` without its graph source (set by ``with_source``)."""
    request = pb.EvaluateRequest(binary_output=binary_output, skip_gradients=not gradients)
    if inputs:
        for name, value in inputs.items():
            request.inputs[name] = float(value)
    if output is not None:
        request.output = int(output)
    _selection(request, selection)
    if batch is not None:
        _batch(request, batch)
    return request


def with_source(
    request: pb.EvaluateRequest,
    source: graph_pb2.Graph | graph_pb2.PackedGraph | str,
) -> pb.EvaluateRequest | codec.Wire:
    """``request`` evaluating ``source``: a graph_id is set on a copy; a graph message is
    appended already serialized (``codec.with_message``), the fast way to send a big one."""
    if isinstance(source, str):
        out = pb.EvaluateRequest()
        out.CopyFrom(request)
        out.graph_id = source
        return out
    field = "packed_graph" if isinstance(source, graph_pb2.PackedGraph) else "graph"
    return codec.with_message(request, field, source.SerializeToString())


def stream_request(
    request: pb.EvaluateRequest | codec.Wire,
) -> pb.EvaluateStreamRequest | codec.Wire:
    """The ``EvaluateStreamRequest`` around ``request`` (kept serialized if it is)."""
    if isinstance(request, codec.Wire):
        return codec.with_message(pb.EvaluateStreamRequest(), "request", request.data)
    return pb.EvaluateStreamRequest(request=request)


def split_request(request: pb.EvaluateRequest) -> tuple[Prepared, pb.EvaluateRequest]:
    """A complete ``EvaluateRequest`` as its graph source and the rest of the request."""
    source = request.WhichOneof("source")
    if source is None:
        raise ValueError("the EvaluateRequest has no graph: set graph, packed_graph or graph_id")
    prepared = prepare(getattr(request, source))
    rest = pb.EvaluateRequest()
    rest.CopyFrom(request)
    rest.ClearField(source)
    return prepared, rest


def upload_pieces(
    graph: graph_pb2.PackedGraph, piece_bytes: int
) -> Iterator[pb.UploadGraphRequest]:
    """``graph`` as ``UploadGraph`` messages of about ``piece_bytes`` each.

    The server appends each column to what earlier pieces sent, so the
    columns are cut independently: piece k carries the k-th of m equal runs
    of ``ops``, of ``args`` and of ``values`` (cut at whole elements), with
    no per-node work; names follow in pieces of their own.
    """
    columns = ((graph.ops, 1), (graph.args, 4), (graph.values, 8))
    total = sum(len(data) for data, _ in columns)
    m = max(-(-total // max(piece_bytes, 1)), 1)
    cuts = [
        [len(data) // size * k // m * size for k in range(m)] + [len(data)]
        for data, size in columns
    ]
    for k in range(m):
        ops, args, values = (data[cut[k] : cut[k + 1]] for (data, _), cut in zip(columns, cuts))
        yield pb.UploadGraphRequest(piece=graph_pb2.PackedGraph(ops=ops, args=args, values=values))
    names = graph.names
    per_piece = max(piece_bytes // 64, 1)
    for start in range(0, len(names), per_piece):
        yield pb.UploadGraphRequest(
            piece=graph_pb2.PackedGraph(names=names[start : start + per_piece])
        )
