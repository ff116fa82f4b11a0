"""``micrograd-rpc eval`` and ``health``: evaluate a graph written as JSON, check health.

The file holds a ``Graph`` (``{"nodes": [...]}``) or a whole
``EvaluateRequest`` in the proto3 JSON mapping; ``--inputs`` and
``--output`` override what it says. The values and gradients of the
reported nodes are printed as a table (names shown) or as JSON.

``micrograd-rpc health`` runs the grpc.health.v1 check (exit 0 when
SERVING), for container HEALTHCHECKs and probes. Both take the security
flags of ``add_connection_arguments``: ``--tls``, ``--tls-ca``, a client
certificate (``--tls-cert``/``--tls-key``) and a bearer token (``--token``,
``--token-file`` or ``$MICROGRAD_RPC_TOKEN``).

``add_eval_parser`` and ``add_health_parser`` plug the subcommands into the
``micrograd-rpc`` parser; its dispatcher calls ``args.func(args)`` and exits
with its result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format
from micrograd import ops as _ops
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import graph_pb2

from .channel import TOKEN_ENV
from .client import Client
from .errors import RemoteError
from .result import Result

__all__ = [
    "add_connection_arguments",
    "add_eval_parser",
    "add_health_parser",
    "connect",
    "main",
    "read_request",
    "run_eval",
    "run_health",
    "security_options",
]


def add_eval_parser(subparsers: Any) -> None:
    """Register the ``eval`` subcommand on ``subparsers`` (``ArgumentParser.add_subparsers()``)."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a graph (JSON) on a server and print values and gradients",
        description=(
            "Evaluate a graph written as JSON on a running server and print the value and "
            "gradient of every reported node. The file holds a Graph ({\"nodes\": [...]}) or a "
            "whole EvaluateRequest in the proto3 JSON mapping (camelCase names, as JSON-RPC "
            "takes them); --inputs and --output override what it says."
        ),
    )
    parser.add_argument(
        "graph", help="JSON file with a Graph or an EvaluateRequest ('-' reads standard input)"
    )
    parser.add_argument(
        "--target", default="127.0.0.1:50051", metavar="HOST:PORT",
        help="the server's gRPC address (default %(default)s)",
    )
    parser.add_argument(
        "--inputs",
        default="",
        metavar="NAME=VALUE,...",
        help="bind named inputs, e.g. a=1,b=2 (overrides the file)",
    )
    parser.add_argument(
        "--output", type=int, default=None, metavar="N", help="node to differentiate (default last)"
    )
    parser.add_argument(
        "--format", choices=("table", "json"), default="table",
        help="table: aligned columns node, name, op, value, grad; json: one object with "
        "graphId, output, nodeCount, rows and nodes, in JSON-RPC's camelCase (default "
        "%(default)s)",
    )
    parser.add_argument(
        "--precision", type=int, default=4, help="decimals shown in the table (default 4)"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="deadline of the call in seconds"
    )
    add_connection_arguments(parser)
    parser.set_defaults(func=run_eval)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say how to reach a server securely: TLS, client certificate, token."""
    env = os.environ.get
    group = parser.add_argument_group("security")
    group.add_argument(
        "--tls", action="store_true",
        help="connect over TLS, verifying the server against the system's roots (or --tls-ca)",
    )
    group.add_argument(
        "--tls-ca", metavar="PATH", default=env("MICROGRAD_RPC_TLS_CA"),
        help="PEM CA certificate(s) that signed the server's certificate; implies --tls "
        "[env MICROGRAD_RPC_TLS_CA]",
    )
    group.add_argument(
        "--tls-cert", metavar="PATH", default=env("MICROGRAD_RPC_TLS_CLIENT_CERT"),
        help="PEM client certificate, for servers that require one (mutual TLS); implies --tls "
        "[env MICROGRAD_RPC_TLS_CLIENT_CERT]",
    )
    group.add_argument(
        "--tls-key", metavar="PATH", default=env("MICROGRAD_RPC_TLS_CLIENT_KEY"),
        help="PEM private key of --tls-cert [env MICROGRAD_RPC_TLS_CLIENT_KEY]",
    )
    group.add_argument(
        "--tls-server-name", metavar="NAME", default=None,
        help="check the server's certificate for NAME instead of the target's host",
    )
    group.add_argument(
        "--token-file", metavar="PATH", default=None,
        help="file whose first token (# comments skipped) is sent as the bearer token",
    )
    group.add_argument(
        "--token", default=None,
        help=f"bearer token to send (visible to other local users in the process list; "
        f"prefer --token-file or ${TOKEN_ENV}) [env {TOKEN_ENV}]",
    )


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token the flags name: ``--token``, the first of ``--token-file``, or the env."""
    if args.token:
        return str(args.token)
    if args.token_file:
        for line in Path(args.token_file).read_text().splitlines():
            token = line.split("#", 1)[0].strip()
            if token:
                return token
        raise ValueError(f"--token-file {args.token_file}: no token in it")
    return None


def security_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Client`` keyword arguments the flags of ``add_connection_arguments`` stand for.

    Raises ``ValueError`` (or ``OSError``) for a token file that cannot be read.
    """
    return {
        "tls": bool(args.tls),
        "root_certificates": args.tls_ca or None,
        "client_certificate": args.tls_cert or None,
        "client_key": args.tls_key or None,
        "server_name": args.tls_server_name,
        "token": _token(args),
    }


def connect(args: argparse.Namespace, **options: Any) -> Client:
    """A ``Client`` for ``args.target`` with the security flags of ``add_connection_arguments``.

    Raises ``ValueError`` (or ``OSError``) for a file that cannot be read.
    """
    return Client(args.target, **security_options(args), **options)


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
        "graphId": result.graph_id,
        "output": result.output,
        "nodeCount": result.node_count,
        "rows": result.rows,
        "nodes": nodes,
    }
    return json.dumps(doc, indent=2)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``eval`` with parsed arguments; the exit status (0 ok, 1 call failed, 2 bad input)."""
    try:
        text = sys.stdin.read() if args.graph == "-" else Path(args.graph).read_text()
        request = read_request(text)
        for name, value in parse_inputs(args.inputs).items():
            request.inputs[name] = value
    except (OSError, ValueError, json_format.ParseError) as exc:
        where = "standard input" if args.graph == "-" else args.graph
        print(f"micrograd-rpc eval: {where}: {exc}", file=sys.stderr)
        return 2
    if args.output is not None:
        request.output = args.output
    request.binary_output = True
    try:
        client = connect(args, timeout=args.timeout)
    except (OSError, ValueError) as exc:
        print(f"micrograd-rpc eval: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            result = client.send(request)
    except RemoteError as exc:
        print(f"micrograd-rpc eval: {exc}", file=sys.stderr)
        return 1
    ops = _op_names(request)
    print(as_json(result, ops) if args.format == "json" else table(result, ops, args.precision))
    return 0


def add_health_parser(subparsers: Any) -> None:
    """Register the ``health`` subcommand: the grpc.health.v1 check, for probes and HEALTHCHECK."""
    parser = subparsers.add_parser(
        "health",
        help="ask a server's grpc.health.v1 service whether it is SERVING (exit 0) or not (1)",
        description=(
            "Run the grpc.health.v1 Check against a server and print its status. Exits 0 when "
            "it is SERVING, 1 when it is not or cannot be reached, 2 for bad arguments: fit for "
            "a container HEALTHCHECK or a readiness probe. Health needs no token; TLS and client "
            "certificates are needed when the server requires them."
        ),
    )
    parser.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="server host:port; several, comma-separated, or dns:///name:port are balanced",
    )
    parser.add_argument(
        "--service", default="",
        help="service to check (default: the whole server; e.g. micrograd.v1.GradientService)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="deadline of the check in seconds"
    )
    add_connection_arguments(parser)
    parser.set_defaults(func=run_health)


def run_health(args: argparse.Namespace) -> int:
    """Run ``health``: print the status; 0 if SERVING, 1 otherwise, 2 for unreadable files."""
    try:
        client = connect(args, timeout=args.timeout, retries=0)
    except (OSError, ValueError) as exc:
        print(f"micrograd-rpc health: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            status = client.health(args.service)
    except RemoteError as exc:
        print(f"micrograd-rpc health: {exc}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m micrograd.client.cli eval|health ...``: the subcommands without the server."""
    parser = argparse.ArgumentParser(prog="micrograd-rpc")
    commands = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(commands)
    add_health_parser(commands)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
