"""What an ``EvaluateRequest`` asks of a tape: input bindings and the node selection."""

from __future__ import annotations

import numpy as np
from micrograd.errors import GraphError
from micrograd.tape import Tape
from micrograd.v1 import gradient_service_pb2 as pb

from .arrays import f64_array
from .malformed import clip, shown

__all__ = ["batch_rows", "bindings", "output_index", "selection_indices"]


def batch_rows(batch: pb.Batch, width: int) -> int:
    """Bindings in ``batch`` when each row holds ``width`` numbers (0 when ``width`` is 0).

    Counts both encodings (``values`` and ``values_f64``), before either is decoded.
    """
    count = len(batch.values) + len(batch.values_f64) // 8
    return count // width if width else 0


def output_index(tape: Tape, request: pb.EvaluateRequest) -> int:
    """The node to differentiate: ``request.output`` if set, else the last node."""
    if not request.HasField("output"):
        return len(tape) - 1
    if request.output >= len(tape):
        raise GraphError(
            None,
            f"output {request.output} is out of range: the graph has {len(tape)} nodes",
            "output",
        )
    return int(request.output)


def selection_indices(tape: Tape, request: pb.EvaluateRequest, output: int) -> np.ndarray | None:
    """Indices of the nodes the response reports, or ``None`` for all nodes in order."""
    sel = request.selection
    if sel in (pb.SELECTION_UNSPECIFIED, pb.SELECTION_ALL):
        return None
    if sel == pb.SELECTION_INPUTS:
        return tape.inputs
    if sel == pb.SELECTION_NAMED:
        return np.array(sorted(tape.names.values()), dtype=np.int64)
    if sel == pb.SELECTION_OUTPUT:
        return np.array([output], dtype=np.int64)
    if sel == pb.SELECTION_LISTED:
        nodes = np.array(request.nodes, dtype=np.int64)
        bad = np.flatnonzero(nodes >= len(tape))
        if bad.size:
            j = int(bad[0])
            raise GraphError(
                None,
                f"node {int(nodes[j])} is out of range: the graph has {len(tape)} nodes",
                f"nodes[{j}]",
            )
        return nodes
    raise GraphError(None, f"unknown selection {sel}", "selection")


def _input_position(tape: Tape, name: str, field: str) -> int:
    """Position of the input called ``name`` among the tape's inputs."""
    node = tape.names.get(name)
    if node is None:
        inputs = set(tape.inputs.tolist())
        known = clip(", ".join(sorted(n for n, i in tape.names.items() if i in inputs)))
        raise GraphError(
            None, f"no input is named {shown(name)} (named inputs: {known or 'none'})", field
        )
    pos = int(np.searchsorted(tape.inputs, node))
    if pos >= tape.inputs.shape[0] or tape.inputs[pos] != node:
        raise GraphError(node, f"{shown(name)} names node {node}, which is not an input", field)
    return pos


def bindings(tape: Tape, request: pb.EvaluateRequest) -> np.ndarray | None:
    """Input values for ``Tape.evaluate``: ``None`` (defaults), ``(k,)``, or ``(B, k)``."""
    has_batch = request.HasField("batch")
    if not request.inputs and not has_batch:
        return None
    base = tape.const[tape.inputs].copy()
    for name, value in request.inputs.items():
        base[_input_position(tape, name, f"inputs[{clip(name)}]")] = value
    if not has_batch:
        return base
    batch = request.batch
    if batch.columns:
        cols = [
            _input_position(tape, name, f"batch.columns[{j}]")
            for j, name in enumerate(batch.columns)
        ]
        if len(set(cols)) != len(cols):
            raise GraphError(None, "an input appears twice in batch.columns", "batch.columns")
    else:
        cols = list(range(tape.inputs.shape[0]))
    if batch.values and batch.values_f64:
        raise GraphError(
            None, "give batch values either as values or as values_f64, not both", "batch"
        )
    if len(batch.values_f64) % 8:
        raise GraphError(
            None,
            f"{len(batch.values_f64)} bytes is not a multiple of 8 "
            "(little-endian float64 each)",
            "batch.values_f64",
        )
    data = (
        f64_array(batch.values_f64)
        if batch.values_f64
        else np.array(batch.values, dtype=np.float64)
    )
    width = len(cols)
    if width == 0 or data.shape[0] == 0 or data.shape[0] % width:
        raise GraphError(
            None,
            f"batch has {data.shape[0]} values for {width} column(s); it needs a whole, non-zero "
            "number of rows",
            "batch.values",
        )
    rows = data.shape[0] // width
    out = np.repeat(base[None, :], rows, axis=0)
    out[:, cols] = data.reshape(rows, width)
    return out
