"""Valid requests the fuzz targets start from, and the bounded settings they serve with.

Both graph forms (``Graph`` and ``PackedGraph``), batches, selections, named
inputs and streams, so that mutations start inside every validation path.
"""

from __future__ import annotations

from typing import Any

from micrograd import codec
from micrograd.engine import Value
from micrograd.seed import seed_graph
from micrograd.server.config import Settings
from micrograd.v1 import gradient_service_pb2 as pb

__all__ = ["SETTINGS", "grpc_seeds", "json_seeds"]

SETTINGS = Settings(
    workers=1,
    kernel="native",
    max_nodes=2048,
    max_batch_rows=32,
    max_batch_cells=50_000,
    max_message_bytes=1 << 20,
    max_name_bytes=64,
    max_chunk_size=64,
    default_chunk_size=16,
    graph_cache_entries=8,
    graph_cache_bytes=1 << 20,
    jsonrpc_max_batch=8,
    jsonrpc_max_depth=32,
)
"""Small limits: every input is answered in well under a millisecond or two."""


def _every_op() -> Value:
    """A small graph that uses every unary op and ``**`` with a ``Value`` exponent."""
    x, y = Value(0.5), Value(1.5)
    return ((x.tanh() + y.exp()).log() * x.sigmoid() - (-y)) ** 2 + x**y


def grpc_seeds() -> list[tuple[int, bytes]]:
    """``(kind, serialized request)``: kind 0 Evaluate, 1 EvaluateStream, 2 RegisterGraph."""
    a, b, g = seed_graph()
    packed, tape, _ = codec.encode_value(g, {"a": a, "b": b})
    graph = codec.to_graph(tape)
    ops_packed, ops_tape, _ = codec.encode_value(_every_op())
    requests = [
        pb.EvaluateRequest(packed_graph=packed),
        pb.EvaluateRequest(graph=graph),
        pb.EvaluateRequest(graph=codec.to_graph(ops_tape), binary_output=True),
        pb.EvaluateRequest(packed_graph=ops_packed, selection=pb.SELECTION_INPUTS),
        pb.EvaluateRequest(packed_graph=packed, inputs={"a": 1.5}, selection=pb.SELECTION_NAMED),
        pb.EvaluateRequest(
            graph=graph,
            batch=pb.Batch(columns=["b", "a"], values=[1.0, 2.0, 3.0, 4.0]),
            selection=pb.SELECTION_LISTED,
            nodes=[0, 3, 5],
            output=7,
        ),
        pb.EvaluateRequest(
            packed_graph=packed,
            batch=pb.Batch(values_f64=codec.f64_bytes(codec.f64_array(b"\0" * 32) + 1.0)),
            binary_output=True,
            skip_gradients=True,
        ),
    ]
    seeds = [(0, r.SerializeToString()) for r in requests]
    seeds += [
        (1, pb.EvaluateStreamRequest(request=r, chunk_size=5).SerializeToString())
        for r in requests[:3]
    ]
    seeds += [
        (2, pb.RegisterGraphRequest(packed_graph=packed).SerializeToString()),
        (2, pb.RegisterGraphRequest(graph=graph).SerializeToString()),
    ]
    return seeds


def json_seeds() -> list[dict[str, Any]]:
    """JSON-RPC request objects (proto3 JSON params) for every method and both graph forms;
    the one-message-per-node form only for a small graph (its mapping is slow in Python)."""
    a, b, g = seed_graph()
    packed, _, _ = codec.encode_value(g, {"a": a, "b": b})
    x, y = Value(0.5), Value(-1.5)
    small_packed, small_tape, _ = codec.encode_value((x * y + 2).relu() ** 2, {"x": x, "y": y})
    small = codec.to_graph(small_tape)
    evaluate = [
        pb.EvaluateRequest(packed_graph=packed),
        pb.EvaluateRequest(graph=small, inputs={"x": 2.0}, selection=pb.SELECTION_NAMED),
        pb.EvaluateRequest(
            graph=small,
            batch=pb.Batch(columns=["y"], values=[1.0, 2.0]),
            selection=pb.SELECTION_LISTED,
            nodes=[0, 2],
            output=3,
        ),
        pb.EvaluateRequest(
            packed_graph=small_packed,
            batch=pb.Batch(values_f64=codec.f64_bytes(codec.f64_array(b"\0" * 32) + 1.0)),
            binary_output=True,
            skip_gradients=True,
        ),
    ]
    messages: list[tuple[str, Any]] = [("Evaluate", r) for r in evaluate]
    messages += [
        ("EvaluateStream", pb.EvaluateStreamRequest(request=evaluate[1], chunk_size=2)),
        ("RegisterGraph", pb.RegisterGraphRequest(graph=small)),
        ("RegisterGraph", pb.RegisterGraphRequest(packed_graph=small_packed)),
    ]
    from google.protobuf import json_format

    out = [
        {"jsonrpc": "2.0", "method": m, "params": json_format.MessageToDict(r), "id": i}
        for i, (m, r) in enumerate(messages)
    ]
    out.append({"jsonrpc": "2.0", "method": "GetServerInfo", "id": "info"})
    return out
