"""A catalogue of hostile requests, over gRPC and JSON-RPC: each gets its documented answer.

Every row is one request a careless or malicious client could send: bytes that do not
parse, every limit just over its value, wrong arities, references forward, to itself and out
of range, mismatched packed columns, duplicate and unknown names, huge batches and echoed
input, slow bodies, JSON-RPC envelopes and ids that cannot be echoed. Each row names the
status (gRPC code, or HTTP status and JSON-RPC error code) and words of the message that
docs/API.md documents; after each, the same server must answer the seed graph correctly
(24.7041, 138.8338, 645.5773), over both transports.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from micrograd import codec
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import graph_pb2

from tests.conftest import RunningServer, start_in_process
from tests.test_faults import SEED, assert_seed, seed_request

LIMITS: dict[str, Any] = {
    "max_nodes": 5000,
    "max_batch_rows": 100,
    "max_batch_cells": 300_000,
    "max_message_bytes": 2 << 20,
    "max_name_bytes": 64,
    "jsonrpc_max_batch": 4,
    "jsonrpc_max_depth": 16,
    "http_max_body_bytes": 1 << 20,
    "http_idle_timeout": 0.3,
    "upload_idle_timeout": 5.0,
}
"""Small limits, so that "just over the limit" is a small request."""

SERVICE = "/micrograd.v1.GradientService/"
MiB = 1 << 20

Node = graph_pb2.Node
Graph = graph_pb2.Graph
Packed = graph_pb2.PackedGraph


def evaluate(**fields: Any) -> bytes:
    """A serialized EvaluateRequest."""
    return pb.EvaluateRequest(**fields).SerializeToString()


def packed_seed() -> Packed:
    """The seed graph, packed (inputs ``a`` and ``b``)."""
    return seed_request().packed_graph


def graph_seed() -> Graph:
    """The seed graph, one message per node."""
    return codec.to_graph(codec.unpack(packed_seed()))


def chain(n: int) -> Packed:
    """``n`` nodes: an input then ``neg`` of the node before, repeatedly."""
    return Packed(ops=b"\x01" + b"\x07" * (n - 1), args=b"".join(
        i.to_bytes(4, "little") for i in range(n - 1)
    ), values=bytes(8), names=[graph_pb2.NodeName(node=0, name="x")])


def u32(*xs: int) -> bytes:
    """Little-endian uint32 column."""
    return b"".join(x.to_bytes(4, "little") for x in xs)


def f64(*xs: float) -> bytes:
    """Little-endian float64 column."""
    return codec.f64_bytes(__import__("numpy").array(xs, dtype=float))


def one_input(**graph: Any) -> Packed:
    """A two-node packed graph: input ``x`` = 1, then ``neg x`` (overridable columns)."""
    cols: dict[str, Any] = {"ops": b"\x01\x07", "args": u32(0), "values": f64(1.0)}
    cols["names"] = [graph_pb2.NodeName(node=0, name="x")]
    cols.update(graph)
    return Packed(**cols)


def utf8_broken() -> bytes:
    good = evaluate(graph=Graph(nodes=[Node(op=1, value=1.0, name="ab")]))
    return good.replace(b"ab", b"\xff\xfe")


def groups(depth: int) -> bytes:
    return bytes([(15 << 3) | 3]) * depth + bytes([(15 << 3) | 4]) * depth


@dataclass(frozen=True)
class G:
    """A gRPC row: the method, the request bytes (a list for a client stream), the answer."""

    name: str
    method: str
    payload: Callable[[], bytes | list[bytes]]
    code: grpc.StatusCode
    words: str


@dataclass(frozen=True)
class J:
    """A JSON-RPC row: the body, the HTTP status and (for JSON answers) the error code."""

    name: str
    body: Callable[[], bytes]
    code: int | None
    words: str
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    id_null: bool = False
    verb: str = "POST"


IA = grpc.StatusCode.INVALID_ARGUMENT
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
NF = grpc.StatusCode.NOT_FOUND


def rpc(method: str, params: Any = None, id_: Any = 1, **extra: Any) -> bytes:
    """A JSON-RPC request body."""
    doc: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id_, **extra}
    if params is not None:
        doc["params"] = params
    return json.dumps(doc).encode()


def seed_params(**more: Any) -> dict[str, Any]:
    """Evaluate params of the packed seed graph, plus ``more``."""
    return {"packedGraph": json_format.MessageToDict(packed_seed()), **more}


def node_json(op: Any, args: list[Any] | None = None, **more: Any) -> dict[str, Any]:
    return {"op": op, "args": args or [], **more}


def stream(*pieces: Packed) -> list[bytes]:
    return [pb.UploadGraphRequest(piece=p).SerializeToString() for p in pieces]


GRPC_CASES = [
    G("garbage bytes", "Evaluate", lambda: b"\xff\xff\xff", IA,
      "is not a valid micrograd.v1.EvaluateRequest: a field tag"),
    G("truncated request", "Evaluate", lambda: evaluate(packed_graph=packed_seed())[:-3], IA,
      "packed_graph: a length of"),
    G("invalid UTF-8 in a node name", "Evaluate", utf8_broken, IA,
      "graph.nodes[0].name: the string is not valid UTF-8"),
    G("groups nested 150 deep", "Evaluate", lambda: groups(150), IA,
      "messages and groups nest more than 100 deep"),
    G("wire type 7", "Evaluate", lambda: b"\x0f", IA, "wire type 7"),
    G("field number 0", "Evaluate", lambda: b"\x00\x01", IA, "field number 0"),
    G("end group without start", "Evaluate", lambda: b"\x7c", IA, "closes no open group"),
    G("varint of 11 bytes", "Evaluate", lambda: b"\x08" + b"\xff" * 10 + b"\x01", IA,
      "longer than 10 bytes"),
    G("ragged batch.values_f64", "Evaluate",
      lambda: evaluate(packed_graph=packed_seed(), batch=pb.Batch(values_f64=b"1234567")), IA,
      "batch.values_f64: 7 bytes is not a multiple of 8"),
    G("1 MiB graph_id echoed short", "Evaluate", lambda: evaluate(graph_id="x" * MiB), NF,
      "characters) is registered here"),
    G("1 MiB input name echoed short", "Evaluate",
      lambda: evaluate(packed_graph=packed_seed(), inputs={"y" * MiB: 1.0}), IA,
      "no input is named 'yyyy"),
    G("no graph at all", "Evaluate", lambda: evaluate(), IA, "the request has no graph"),
    G("empty ops column", "Evaluate", lambda: evaluate(packed_graph=Packed()), IA,
      "the graph has no nodes"),
    G("unknown op code", "Evaluate", lambda: evaluate(packed_graph=one_input(ops=b"\x01\x63")),
      IA, "unknown op 99"),
    G("OP_UNSPECIFIED in a Graph", "Evaluate",
      lambda: evaluate(graph=Graph(nodes=[Node(op=0)])), IA,
      "unknown op 0 (OP_UNSPECIFIED, the unset value)"),
    G("add with one argument", "Evaluate",
      lambda: evaluate(graph=Graph(nodes=[Node(op=1), Node(op=3, args=[0])])), IA,
      "graph.nodes[1]"),
    G("three arguments", "Evaluate",
      lambda: evaluate(graph=Graph(nodes=[Node(op=1), Node(op=3, args=[0, 0, 0])])), IA,
      "add takes 2 argument(s)"),
    G("forward reference", "Evaluate",
      lambda: evaluate(graph=Graph(nodes=[Node(op=1), Node(op=7, args=[2]), Node(op=1)])), IA,
      "does not come before"),
    G("self reference", "Evaluate",
      lambda: evaluate(graph=Graph(nodes=[Node(op=1), Node(op=7, args=[1])])), IA,
      "does not come before"),
    G("reference out of range (packed)", "Evaluate",
      lambda: evaluate(packed_graph=one_input(args=u32(4_000_000_000))), IA,
      "does not come before"),
    G("args not a multiple of 4", "Evaluate",
      lambda: evaluate(packed_graph=one_input(args=b"\x00\x00\x00")), IA, "not a multiple of 4"),
    G("values not a multiple of 8", "Evaluate",
      lambda: evaluate(packed_graph=one_input(values=b"\x00" * 7)), IA, "not a multiple of 8"),
    G("args count mismatch", "Evaluate",
      lambda: evaluate(packed_graph=one_input(args=u32(0, 0))), IA, "args"),
    G("values count mismatch", "Evaluate",
      lambda: evaluate(packed_graph=one_input(values=f64(1.0, 2.0))), IA, "values"),
    G("duplicate names (Graph)", "Evaluate",
      lambda: evaluate(graph=Graph(nodes=[Node(op=1, name="x"), Node(op=1, name="x")])), IA,
      "name 'x' is used twice"),
    G("duplicate names (packed)", "Evaluate", lambda: evaluate(packed_graph=one_input(
        names=[graph_pb2.NodeName(node=0, name="x"), graph_pb2.NodeName(node=1, name="x")])),
      IA, "is used twice"),
    G("empty name", "Evaluate", lambda: evaluate(
        packed_graph=one_input(names=[graph_pb2.NodeName(node=0, name="")])), IA,
      "a name must not be empty"),
    G("name just over max_name_bytes (Graph)", "Evaluate",
      lambda: evaluate(graph=Graph(nodes=[Node(op=1, name="n" * 65)])), IA,
      "is 65 bytes long; this server accepts names of at most 64 bytes (max_name_bytes)"),
    G("name just over max_name_bytes (packed)", "Evaluate", lambda: evaluate(
        packed_graph=one_input(names=[graph_pb2.NodeName(node=0, name="é" * 33)])), IA,
      "is 66 bytes long"),
    G("name naming a node out of range", "Evaluate", lambda: evaluate(
        packed_graph=one_input(names=[graph_pb2.NodeName(node=7, name="x")])), IA, "names"),
    G("nodes just over max_nodes (packed)", "Evaluate",
      lambda: evaluate(packed_graph=chain(5001)), RE, "5001 nodes"),
    G("nodes just over max_nodes (Graph)", "Evaluate",
      lambda: evaluate(graph=Graph(nodes=[Node(op=1)] * 5001)), RE, "(max_nodes)"),
    G("rows just over max_batch_rows", "Evaluate", lambda: evaluate(
        packed_graph=packed_seed(), batch=pb.Batch(values=[1.0] * 202)), RE,
      "101 rows; this server evaluates at most 100 per call (max_batch_rows)"),
    G("cells just over max_batch_cells", "Evaluate", lambda: evaluate(
        packed_graph=chain(5000), batch=pb.Batch(values=[1.0] * 61)), RE, "(max_batch_cells)"),
    G("response over one message", "Evaluate", lambda: evaluate(
        packed_graph=chain(5000), batch=pb.Batch(values=[1.0] * 60)), RE, "use EvaluateStream"),
    G("request over max_message_bytes", "Evaluate", lambda: evaluate(graph_id="z" * (3 * MiB)),
      RE, ""),
    G("ragged batch", "Evaluate", lambda: evaluate(
        packed_graph=packed_seed(), batch=pb.Batch(values=[1.0, 2.0, 3.0])), IA,
      "whole, non-zero number of rows"),
    G("values and values_f64 both", "Evaluate", lambda: evaluate(
        packed_graph=packed_seed(), batch=pb.Batch(values=[1.0, 2.0], values_f64=f64(1, 2))), IA,
      "either as values or as values_f64"),
    G("unknown batch column", "Evaluate", lambda: evaluate(
        packed_graph=packed_seed(), batch=pb.Batch(columns=["q"], values=[1.0])), IA,
      "batch.columns[0]: no input is named 'q'"),
    G("duplicate batch column", "Evaluate", lambda: evaluate(
        packed_graph=packed_seed(), batch=pb.Batch(columns=["a", "a"], values=[1.0, 2.0])), IA,
      "appears twice"),
    G("unknown input name", "Evaluate",
      lambda: evaluate(packed_graph=packed_seed(), inputs={"zz": 1.0}), IA,
      "no input is named 'zz' (named inputs: a, b)"),
    G("output out of range", "Evaluate",
      lambda: evaluate(packed_graph=packed_seed(), output=999), IA, "output 999 is out of range"),
    G("listed node out of range", "Evaluate", lambda: evaluate(
        packed_graph=packed_seed(), selection=pb.SELECTION_LISTED, nodes=[0, 999]), IA,
      "node 999 is out of range"),
    G("unknown selection", "Evaluate",
      lambda: evaluate(packed_graph=packed_seed(), selection=42), IA, "unknown selection 42"),
    G("unknown graph id", "Evaluate", lambda: evaluate(graph_id="sha256:" + "0" * 64), NF,
      "is registered here"),
    G("stream: garbage", "EvaluateStream", lambda: b"\x12\xff", IA,
      "is not a valid micrograd.v1.EvaluateStreamRequest"),
    G("stream: bad graph", "EvaluateStream", lambda: pb.EvaluateStreamRequest(
        request=pb.EvaluateRequest(packed_graph=one_input(ops=b"\x01\x63"))).SerializeToString(),
      IA, "request.packed_graph.ops[1]"),
    G("register: garbage", "RegisterGraph", lambda: b"\x0a\x05\x01", IA,
      "is not a valid micrograd.v1.RegisterGraphRequest"),
    G("register: no graph", "RegisterGraph", lambda: b"", IA, "the request has no graph"),
    G("upload: garbage piece", "UploadGraph", lambda: [b"\x0a\x09\x0a"], IA,
      "is not a valid micrograd.v1.UploadGraphRequest"),
    G("upload: just over max_nodes", "UploadGraph",
      lambda: stream(Packed(ops=b"\x01" * 3000), Packed(ops=b"\x01" * 2001)), RE,
      "exceeds 5000 nodes (max_nodes)"),
    G("upload: forward reference", "UploadGraph",
      lambda: stream(one_input(args=u32(5))), IA, "piece."),
    G("server info: garbage", "GetServerInfo", lambda: b"\xff", IA,
      "is not a valid micrograd.v1.GetServerInfoRequest"),
    G("health check: garbage", "/grpc.health.v1.Health/Check", lambda: b"\xff", IA,
      "is not a valid grpc.health.v1.HealthCheckRequest"),
    G("no such method", "NoSuchMethod", lambda: b"", grpc.StatusCode.UNIMPLEMENTED, ""),
]

DEEP = 100_000
JSON_CASES = [
    J("not JSON", lambda: b"{nope", -32700, "parse error: the body is not JSON"),
    J("not UTF-8", lambda: b'{"a": "\xff"}', -32700, "parse error"),
    J("NaN literal", lambda: b'{"jsonrpc":"2.0","method":"GetServerInfo","id":NaN}', -32700,
      "NaN is not JSON"),
    J("arrays nested 100,000 deep", lambda: b"[" * DEEP + b"]" * DEEP, -32700,
      "nests arrays and objects 100000 deep; this server parses at most 16 levels"),
    J("objects nested 100,000 deep", lambda: b'{"a":' * DEEP + b"1" + b"}" * DEEP, -32700,
      "(jsonrpc_max_depth)"),
    J("nesting just over jsonrpc_max_depth", lambda: b"[" * 17 + b"]" * 17, -32700,
      "17 deep"),
    J("id 1e400", lambda: b'{"jsonrpc":"2.0","method":"GetServerInfo","id":1e400}', -32600,
      "cannot be sent back exactly", id_null=True),
    J("id with a lone surrogate", lambda: b'{"jsonrpc":"2.0","method":"GetServerInfo",'
      b'"id":"\\ud800"}', -32600, "cannot be sent back exactly", id_null=True),
    J("id true", lambda: rpc("GetServerInfo", id_=True), -32600,
      '"id" must be a string, a number or null', id_null=True),
    J("id an object", lambda: rpc("GetServerInfo", id_={"a": 1}), -32600, '"id" must be',
      id_null=True),
    J("selection true", lambda: rpc("Evaluate", seed_params(selection=True)), -32602,
      "selection: expected an enum name or number, got true"),
    J("op 3.5", lambda: rpc("Evaluate", {"graph": {"nodes": [
        node_json("OP_INPUT"), node_json(3.5, [0, 0])]}}), -32602,
      "graph.nodes[1].op: expected a whole number, got the number 3.5"),
    J("value true", lambda: rpc("Evaluate", {"graph": {"nodes": [
        node_json("OP_INPUT", value=True)]}}), -32602, "graph.nodes[0].value: expected a number"),
    J("graph given as an array", lambda: rpc("Evaluate", {"graph": []}), -32602,
      "graph: expected an object (Graph), got an array"),
    J("args given as a number", lambda: rpc("Evaluate", {"graph": {"nodes": [
        node_json("OP_NEG", 0)]}}), -32602, ""),
    J("name given as a number", lambda: rpc("Evaluate", {"graph": {"nodes": [
        node_json("OP_INPUT", name=5)]}}), -32602, "expected a string"),
    J("output as a word", lambda: rpc("Evaluate", seed_params(output="abc")), -32602, "output"),
    J("ragged valuesF64", lambda: rpc("Evaluate", seed_params(batch={"valuesF64": "MTIzNDU2Nw=="})),
      -32602, "7 bytes is not a multiple of 8"),
    J("invalid base64", lambda: rpc("Evaluate", {"packedGraph": {"ops": "A"}}), -32602,
      "params is not a valid EvaluateRequest: Failed to parse ops field: Invalid base64"),
    J("unknown field", lambda: rpc("Evaluate", seed_params(bogus=1)), -32602, "bogus"),
    J("lone surrogate in an input name", lambda: rpc("Evaluate", seed_params()).replace(
        b'"params": {', b'"params": {"inputs": {"\\udc00": 1.0}, '), -32602,
      "unpaired surrogate"),
    J("params as an array", lambda: rpc("Evaluate", [1, 2]), -32602, "params must be an object"),
    J("params as a string", lambda: rpc("Evaluate", "x"), -32600,
      '"params" must be an object or an array'),
    J("no jsonrpc member", lambda: json.dumps({"method": "GetServerInfo", "id": 1}).encode(),
      -32600, '"jsonrpc" must be "2.0"'),
    J("jsonrpc 1.0", lambda: rpc("GetServerInfo", jsonrpc="1.0"), -32600, '"jsonrpc" must be'),
    J("method not a string", lambda: json.dumps({"jsonrpc": "2.0", "method": 5, "id": 1}).encode(),
      -32600, '"method" must be a string'),
    J("unknown method", lambda: rpc("Nope"), -32601, "method not found: 'Nope'"),
    J("UploadGraph over JSON-RPC", lambda: rpc("UploadGraph"), -32601, "gRPC-only"),
    J("a failing notification gets no answer", lambda: json.dumps(
        {"jsonrpc": "2.0", "method": "Evaluate", "params": {"graph": []}}).encode(), None, "",
      status=204),
    J("long method name echoed short", lambda: rpc("m" * 100_000), -32601, "characters)"),
    J("empty batch", lambda: b"[]", -32600, "the batch is empty"),
    J("batch just over jsonrpc_max_batch", lambda: b"[" + b",".join(
        [rpc("GetServerInfo")] * 5) + b"]", -32600, "at most 4 per batch (jsonrpc_max_batch)"),
    J("a number in a batch", lambda: b"[1]", -32600, "expected a request object, got int"),
    J("unknown graph id", lambda: rpc("Evaluate", {"graphId": "g" * 100_000}), -32005,
      "characters) is registered here"),
    J("nodes just over max_nodes", lambda: rpc("Evaluate", {
        "packedGraph": json_format.MessageToDict(chain(5001))}), -32008, "(max_nodes)"),
    J("rows just over max_batch_rows", lambda: rpc("Evaluate", seed_params(
        batch={"values": [1.0] * 202})), -32008, "(max_batch_rows)"),
    J("body just over http_max_body_bytes", lambda: b" " * (MiB + 1), None,
      "over this server's limit of 1048576 bytes", status=413),
    J("wrong content type", lambda: rpc("GetServerInfo"), None, "takes application/json",
      status=415, headers={"Content-Type": "text/plain"}),
    J("GET /rpc", lambda: b"", None, "", status=405, verb="GET"),
    J("bad X-Timeout-Seconds", lambda: rpc("GetServerInfo"), None,
      "X-Timeout-Seconds must be a positive number", status=400,
      headers={"Content-Type": "application/json", "X-Timeout-Seconds": "-1"}),
]

GRPC_CASES = [G(f"grpc: {c.name}", c.method, c.payload, c.code, c.words) for c in GRPC_CASES]
JSON_CASES = [
    J(f"jsonrpc: {c.name}", c.body, c.code, c.words, c.status, c.headers, c.id_null, c.verb)
    for c in JSON_CASES
]
CASES: list[G | J] = [*GRPC_CASES, *JSON_CASES]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """One server with small limits for the whole catalogue."""
    running = start_in_process(**LIMITS)
    yield running
    running.stop()


def seed_over_jsonrpc(server: RunningServer) -> None:
    """The seed graph over JSON-RPC gives the seed's numbers."""
    reply = post(server, rpc("Evaluate", seed_params()), {"Content-Type": "application/json"})
    result = json.loads(reply[1])["result"]
    names = result["names"]
    assert round(result["values"][-1], 4) == SEED[0]
    assert round(result["grads"][names["a"]], 4) == SEED[1]
    assert round(result["grads"][names["b"]], 4) == SEED[2]


def post(server: RunningServer, body: bytes, headers: dict[str, str], verb: str = "POST"
         ) -> tuple[int, bytes]:
    """``(status, body)`` of an HTTP request to ``/rpc``."""
    request = urllib.request.Request(
        f"{server.http_url}/rpc", data=body if verb == "POST" else None, headers=headers,
        method=verb,
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_catalogue_holds_sixty_hostile_requests_or_more() -> None:
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_request_gets_its_documented_answer(server: RunningServer, case: G | J) -> None:
    channel = grpc.insecure_channel(server.target, options=[
        ("grpc.max_receive_message_length", 8 * MiB), ("grpc.max_send_message_length", 8 * MiB)])
    with channel:
        if isinstance(case, G):
            path = case.method if case.method.startswith("/") else SERVICE + case.method
            payload = case.payload()
            with pytest.raises(grpc.RpcError) as err:
                if isinstance(payload, list):
                    channel.stream_unary(path)(iter(payload), timeout=60)
                else:
                    channel.unary_unary(path)(payload, timeout=60)
            details = err.value.details() or ""
            assert err.value.code() == case.code, details[:500]
            assert case.words in details, details[:500]
            assert len(details) <= 2000  # echoed input is cut short
        else:
            status, body = post(server, case.body(), case.headers, case.verb)
            assert status == case.status, body[:500]
            text = body.decode("utf-8", "replace")
            if case.code is None:
                assert case.words in text, text[:500]
            assert len(body) <= 4000
            if case.code is not None:
                answer = json.loads(body)
                if isinstance(answer, list):  # a batch
                    answer = answer[0]
                assert answer["error"]["code"] == case.code, answer
                assert case.words in answer["error"]["message"], answer
                if case.id_null:
                    assert answer["id"] is None
        from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc

        assert_seed(pb_grpc.GradientServiceStub(channel))
    seed_over_jsonrpc(server)


def test_a_body_that_stalls_gets_408_and_the_server_answers_after(server: RunningServer) -> None:
    assert server.http_port is not None
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50\r\n\r\n[")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408") and b"(http_idle_timeout)" in reply
    seed_over_jsonrpc(server)
