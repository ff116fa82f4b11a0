"""``micrograd-rpc draw``: a picture of a graph with every node's data and gradient.

The file holds a ``Graph`` or an ``EvaluateRequest`` in the proto3 JSON
mapping, as for ``micrograd-rpc eval``. Without ``--target`` the graph is
evaluated here with the tape; with it, on that server. The picture is
written as SVG, PNG (both need Graphviz's ``dot``) or DOT source, chosen
by the output file's extension.

``add_draw_parser`` plugs the subcommand into the ``micrograd-rpc`` parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import graphviz
from google.protobuf import json_format
from micrograd import codec, viz
from micrograd.v1 import gradient_service_pb2 as pb

from .cli import add_connection_arguments, connect, parse_inputs, read_request
from .errors import RemoteError

__all__ = ["FORMATS", "add_draw_parser", "draw_request", "run_draw"]

FORMATS = ("svg", "png", "dot")
"""Output formats, named by the output file's extension."""


def add_draw_parser(subparsers: Any) -> None:
    """Register the ``draw`` subcommand on ``subparsers`` (``ArgumentParser.add_subparsers()``)."""
    parser = subparsers.add_parser(
        "draw",
        help="draw a graph (JSON) with the data and gradient of every node",
        description=(
            "Evaluate a graph written as JSON (a Graph or an EvaluateRequest) and write its "
            "picture with every node's data and gradient: locally with the tape, or on the "
            "server given by --target. The format follows the output file's extension: "
            ".svg, .png (both rendered by Graphviz's dot) or .dot (the DOT source)."
        ),
    )
    parser.add_argument(
        "graph", help="JSON file with a Graph or an EvaluateRequest ('-' reads standard input)"
    )
    parser.add_argument(
        "-o", "--out", required=True, type=Path, metavar="FILE",
        help="where to write the picture: FILE.svg, FILE.png or FILE.dot",
    )
    parser.add_argument(
        "--target", default=None, metavar="HOST:PORT",
        help="evaluate on this gRPC server (default: evaluate locally, no server needed)",
    )
    parser.add_argument(
        "--max-nodes", type=int, default=viz.DEFAULT_MAX_NODES, metavar="N",
        help="draw at most N nodes, those nearest the output, and say how many were left "
        "out (default %(default)s)",
    )
    parser.add_argument(
        "--inputs", default="", metavar="NAME=VALUE,...",
        help="bind named inputs, e.g. a=1,b=2 (overrides the file)",
    )
    parser.add_argument(
        "--rankdir", choices=("LR", "TB"), default="LR",
        help="layout direction: left to right or top to bottom (default %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0,
        help="deadline of the call in seconds, with --target (default %(default)s)",
    )
    add_connection_arguments(parser)
    parser.set_defaults(func=run_draw)


def _graph_of(request: pb.EvaluateRequest) -> Any:
    """The graph message the request carries (a registered ``graph_id`` cannot be drawn)."""
    source = request.WhichOneof("source")
    if source == "graph":
        return request.graph
    if source == "packed_graph":
        return request.packed_graph
    raise ValueError("the request names a registered graph_id; draw needs the graph itself")


def draw_request(
    request: pb.EvaluateRequest,
    client: Any = None,
    max_nodes: int = viz.DEFAULT_MAX_NODES,
    fmt: str = "svg",
    rankdir: str = "LR",
) -> Any:
    """The ``graphviz.Digraph`` of the request's graph, evaluated locally or by ``client``."""
    graph = _graph_of(request)
    if client is None:
        tape = (
            codec.from_graph(request.graph)
            if request.WhichOneof("source") == "graph"
            else codec.unpack(request.packed_graph)
        )
        output = codec.output_index(tape, request)
        values, grads = tape.evaluate(codec.bindings(tape, request), output)
        if values.ndim == 2:
            values, grads = values[0], grads[0]
        pic = viz.picture(tape, values=values, grads=grads, output=output, max_nodes=max_nodes)
    else:
        request.selection = pb.SELECTION_ALL
        request.binary_output = True
        result = client.send(request)
        pic = viz.picture(graph, result, max_nodes=max_nodes)
    return viz.draw_tape(pic, format=fmt, rankdir=rankdir)


def run_draw(args: argparse.Namespace) -> int:
    """Run ``draw`` with parsed arguments; the exit status (0 ok, 1 call failed, 2 bad input)."""
    where = "standard input" if args.graph == "-" else args.graph
    fmt = args.out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        print(
            f"micrograd-rpc draw: {args.out}: the output file must end in .svg, .png or .dot",
            file=sys.stderr,
        )
        return 2
    if args.max_nodes < 1:
        print(f"micrograd-rpc draw: --max-nodes must be at least 1, got {args.max_nodes}",
              file=sys.stderr)
        return 2
    try:
        text = sys.stdin.read() if args.graph == "-" else Path(args.graph).read_text()
        request = read_request(text)
        for name, value in parse_inputs(args.inputs).items():
            request.inputs[name] = value
        client = None if args.target is None else connect(args, timeout=args.timeout)
        try:
            dot = draw_request(
                request, client, args.max_nodes, "svg" if fmt == "dot" else fmt, args.rankdir
            )
        finally:
            if client is not None:
                client.close()
    except (OSError, ValueError, json_format.ParseError) as exc:
        print(f"micrograd-rpc draw: {where}: {exc}", file=sys.stderr)
        return 2
    except RemoteError as exc:
        print(f"micrograd-rpc draw: {exc}", file=sys.stderr)
        return 1
    try:
        if fmt == "dot":
            args.out.write_text(dot.source)
        else:
            args.out.write_bytes(dot.pipe(format=fmt))
    except (OSError, graphviz.ExecutableNotFound, graphviz.CalledProcessError) as exc:
        print(f"micrograd-rpc draw: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    return 0
