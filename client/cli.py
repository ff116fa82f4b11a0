"""``micrograd-rpc eval``: evaluate a graph written as JSON on a running server.

The file holds a ``Graph`` (``{"nodes": [...]}``) or a whole
``EvaluateRequest`` in the proto3 JSON mapping; ``--inputs`` and
``--output`` override what it says. The values and gradients of the
reported nodes are printed as a table (names shown) or as JSON.

``add_eval_parser`` plugs the subcommand into the ``micrograd-rpc`` parser;
the parser's dispatcher calls ``args.func(args)`` and exits with its result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format
from micrograd import ops as _ops
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import graph_pb2

from .client import Client
from .errors import RemoteError
from .result import Result

__all__ = ["add_eval_parser", "main", "read_request", "run_eval"]


def add_eval_parser(subparsers: Any) -> None:
    """Register the ``eval`` subcommand on ``subparsers`` (``ArgumentParser.add_subparsers()``)."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a graph (JSON) on a server and print values and gradients",
        description=__doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else None,
    )
    parser.add_argument("graph", type=Path, help="JSON file: a Graph or an EvaluateRequest")
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument(
        "--inputs",
        default="",
        metavar="NAME=VALUE,...",
        help="bind named inputs, e.g. a=1,b=2 (overrides the file)",
    )
    parser.add_argument(
        "--output", type=int, default=None, metavar="N", help="node to differentiate (default last)"
    )
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument(
        "--precision", type=int, default=4, help="decimals shown in the table (default 4)"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="deadline of the call in seconds"
    )
    parser.set_defaults(func=run_eval)


def parse_inputs(text: str) -> dict[str, float]:
    """``"a=1,b=2"`` as ``{"a": 1.0, "b": 2.0}``; raises ``ValueError`` naming a bad item."""
    inputs: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--inputs item {item!r} is not NAME=VALUE")
        try:
            inputs[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--inputs item {item!r}: {value!r} is not a number") from None
    return inputs


def read_request(text: str) -> pb.EvaluateRequest:
    """JSON text of a ``Graph`` or an ``EvaluateRequest`` as an ``EvaluateRequest``."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("the JSON must be an object: a Graph or an EvaluateRequest")
    nodes = data.get("nodes")
    if isinstance(nodes, list) and all(isinstance(node, dict) for node in nodes) and nodes:
        graph = json_format.ParseDict(data, graph_pb2.Graph())
        return pb.EvaluateRequest(graph=graph)
    return json_format.ParseDict(data, pb.EvaluateRequest())


def _op_names(request: pb.EvaluateRequest) -> dict[int, str]:
    """Op name of each node, when the request carries the graph itself."""
    by_code = {op.code: op.name for op in _ops.OPS}
    source = request.WhichOneof("source")
    if source == "graph":
        return {i: by_code.get(node.op, "?") for i, node in enumerate(request.graph.nodes)}
    if source == "packed_graph":
        codes = np.frombuffer(request.packed_graph.ops, dtype=np.uint8).tolist()
        return {i: by_code.get(code, "?") for i, code in enumerate(codes)}
    return {}


def _number(x: float, precision: int) -> str:
    """A table cell: fixed decimals for ordinary magnitudes, exponent form otherwise."""
    if not math.isfinite(x) or x == 0.0 or 1e-3 <= abs(x) < 1e12:
        return f"{x:.{precision}f}"
    return f"{x:.{precision}e}"


def _json_number(x: float) -> float | str:
    """A double as the proto3 JSON mapping writes it ("NaN", "Infinity" for non-finite)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def table(result: Result, ops: dict[int, str], precision: int = 4) -> str:
    """The result as aligned text: one line per reported node (per row for a batch)."""
    names = {int(result.nodes[pos]): name for name, pos in result.names.items()}
    values = np.atleast_2d(result.values)
    grads = None if result.grads is None else np.atleast_2d(result.grads)
    lines: list[str] = []
    for r in range(values.shape[0]):
        if values.shape[0] > 1:
            lines.append(f"row {r}:")
        rows = [("node", "name", "op", "value", "grad")]
        for j, node in enumerate(result.nodes.tolist()):
            grad = "-" if grads is None else _number(float(grads[r, j]), precision)
            rows.append(
                (
                    str(node),
                    names.get(node, ""),
                    ops.get(node, ""),
                    _number(float(values[r, j]), precision),
                    grad,
                )
            )
        widths = [max(len(row[c]) for row in rows) for c in range(5)]
        for row in rows:
            lines.append(
                "  ".join(
                    cell.rjust(w) if c in (0, 3, 4) else cell.ljust(w)
                    for c, (cell, w) in enumerate(zip(row, widths))
                ).rstrip()
            )
    out_name = names.get(result.output)
    label = f"node {result.output}" + (f" ({out_name})" if out_name else "")
    lines.append(f"output: {label}; graph_id {result.graph_id}")
    return "\n".join(lines)


def as_json(result: Result, ops: dict[int, str]) -> str:
    """The result as JSON: graph facts, then ``nodes`` with index, name, op, value and grad."""
    names = {int(result.nodes[pos]): name for name, pos in result.names.items()}
    values = result.values.T.tolist()
    grads = None if result.grads is None else result.grads.T.tolist()
    nodes: list[dict[str, Any]] = []
    for j, node in enumerate(result.nodes.tolist()):
        v, g = values[j], None if grads is None else grads[j]
        entry: dict[str, Any] = {"node": node}
        if node in names:
            entry["name"] = names[node]
        if node in ops:
            entry["op"] = ops[node]
        if isinstance(v, list):
            entry["value"] = [_json_number(x) for x in v]
            entry["grad"] = None if g is None else [_json_number(x) for x in g]
        else:
            entry["value"] = _json_number(v)
            entry["grad"] = None if g is None else _json_number(g)
        nodes.append(entry)
    doc = {
        "graph_id": result.graph_id,
        "output": result.output,
        "node_count": result.node_count,
        "rows": result.rows,
        "nodes": nodes,
    }
    return json.dumps(doc, indent=2)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``eval`` with parsed arguments; the exit status (0 ok, 1 call failed, 2 bad input)."""
    try:
        request = read_request(args.graph.read_text())
        for name, value in parse_inputs(args.inputs).items():
            request.inputs[name] = value
    except (OSError, ValueError, json_format.ParseError) as exc:
        print(f"micrograd-rpc eval: {args.graph}: {exc}", file=sys.stderr)
        return 2
    if args.output is not None:
        request.output = args.output
    request.binary_output = True
    try:
        with Client(args.target, timeout=args.timeout) as client:
            result = client.send(request)
    except RemoteError as exc:
        print(f"micrograd-rpc eval: {exc}", file=sys.stderr)
        return 1
    ops = _op_names(request)
    print(as_json(result, ops) if args.format == "json" else table(result, ops, args.precision))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m micrograd.client.cli eval ...``: the subcommand without the server's CLI."""
    parser = argparse.ArgumentParser(prog="micrograd-rpc")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
