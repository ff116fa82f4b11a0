"""The HTTP endpoint end to end: real servers on 127.0.0.1, JSON-RPC beside gRPC, no mocks.

Expected numbers: the seed document (24.7041, 138.8338, 645.5773); the gRPC
answer to the same request (JSON-RPC must give the same doubles); and a
chain ``y = y * 1 + 1`` whose values are exact integers plus one half.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from micrograd import codec, ops
from micrograd.server import cli, config
from micrograd.tape import Tape
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc
from micrograd.v1 import graph_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer
from tests.graphs import affine_chain_tape, random_dag
from tests.pki import make_pki

SEED_GRAPH = json.loads(
    (Path(__file__).resolve().parent.parent / "examples" / "graphs" / "seed.json").read_text()
)
"""The seed document's graph in the proto3 JSON mapping (inputs a, b; output g, named)."""

Factory = Callable[..., RunningServer]


@pytest.fixture
def server(grpc_server_factory: Factory) -> RunningServer:
    """An in-process server with gRPC and HTTP on ephemeral ports."""
    return grpc_server_factory()


@pytest.fixture
def stub(server: RunningServer) -> Iterator[pb_grpc.GradientServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GradientServiceStub(channel)


class Reply:
    """An HTTP response: status, headers and body."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    url: str,
    body: bytes | None = None,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> Reply:
    """One HTTP request with the standard library; 4xx and 5xx are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if content_type is not None and body is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.headers, err.read())


def rpc(server: RunningServer, method: str, params: Any = None, **headers: str) -> Any:
    """Call one JSON-RPC method; the decoded response object."""
    request: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        request["params"] = params
    reply = http(server.http_url + "/rpc", json.dumps(request).encode(), headers=headers)
    assert reply.status == 200, reply.body
    return reply.json()


def scrape(server: RunningServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` as ``{(sample name, labels): value}``."""
    reply = http(server.http_url + "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(reply.body.decode())
        for s in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def to_json_graph(nodes: list[Any]) -> dict[str, Any]:
    """A ``tests.graphs`` node list as a ``Graph`` in the proto3 JSON mapping."""
    return {
        "nodes": [
            {"op": graph_pb2.Op.Name(ops.BY_NAME[name].code), "args": list(args), "value": value}
            for name, args, value in nodes
        ]
    }


def step_chain(pairs: int) -> Tape:
    """``y = y * 1 + 1`` repeated ``pairs`` times from input ``x = 0.5`` (exact: 0.5 + pairs)."""
    return affine_chain_tape(3 + 2 * pairs, 1.0, 1.0)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` every 20 ms for at most ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# -- JSON-RPC over HTTP ---------------------------------------------------------------------


def test_evaluate_over_http_gives_the_seed_numbers(server: RunningServer) -> None:
    answer = rpc(server, "Evaluate", {"graph": SEED_GRAPH, "selection": "SELECTION_NAMED"})
    r = answer["result"]
    g, a, b = (r["names"][name] for name in "gab")
    numbers = (r["values"][g], r["grads"][a], r["grads"][b])
    assert [f"{x:.4f}" for x in numbers] == ["24.7041", "138.8338", "645.5773"]


def test_every_method_answers_over_http(server: RunningServer) -> None:
    info = rpc(server, "GetServerInfo")["result"]
    assert info["limits"]["maxNodes"] == str(server.settings.max_nodes)
    gid = rpc(server, "RegisterGraph", {"graph": SEED_GRAPH})["result"]["graphId"]
    by_id = rpc(server, "Evaluate", {"graphId": gid, "selection": "SELECTION_OUTPUT"})["result"]
    assert f"{by_id['values'][0]:.4f}" == "24.7041"
    stream = rpc(server, "EvaluateStream", {"request": {"graphId": gid}})["result"]
    assert [m["part"] for m in stream] == ["PART_HEADER", "PART_VALUES", "PART_GRADIENTS"]
    assert f"{stream[1]['data'][-1]:.4f}" == "24.7041"


@pytest.mark.parametrize("seed", range(6))
def test_jsonrpc_and_grpc_give_identical_numbers(
    server: RunningServer, stub: pb_grpc.GradientServiceStub, seed: int
) -> None:
    dag = random_dag(seed, size=60, inputs=3, batch=4)
    params = {"graph": to_json_graph(dag.nodes), "batch": {"values": dag.bindings.ravel().tolist()}}
    over_http = rpc(server, "Evaluate", params)["result"]
    over_grpc = stub.Evaluate(json_format.ParseDict(params, pb.EvaluateRequest()))
    assert over_http["rows"] == over_grpc.rows == 4
    assert over_http["values"] == list(over_grpc.values)
    assert over_http["grads"] == list(over_grpc.grads)
    assert over_http["graphId"] == over_grpc.graph_id


def test_a_large_graph_over_jsonrpc_matches_grpc(
    server: RunningServer, stub: pb_grpc.GradientServiceStub
) -> None:
    # Over 1 MiB of JSON and over inline_cells nodes: parsed and evaluated off the event loop.
    graph = json_format.MessageToDict(codec.to_graph(step_chain(20_000)))
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "Evaluate", "params": {"graph": graph}})
    assert len(body) > 1 << 20
    reply = http(server.http_url + "/rpc", body.encode())
    result = reply.json()["result"]
    over_grpc = stub.Evaluate(pb.EvaluateRequest(graph=codec.to_graph(step_chain(20_000))))
    assert result["nodeCount"] == 40_003 and result["values"][-1] == 20_000.5
    assert result["values"] == list(over_grpc.values)
    assert result["grads"] == list(over_grpc.grads)


def test_a_batch_and_a_notification_over_http(server: RunningServer) -> None:
    url = server.http_url + "/rpc"
    batch = [
        {"jsonrpc": "2.0", "id": "a", "method": "GetServerInfo"},
        {"jsonrpc": "2.0", "method": "GetServerInfo"},
        {"jsonrpc": "2.0", "id": "b", "method": "Evaluate", "params": {"graphId": "sha256:0"}},
    ]
    reply = http(url, json.dumps(batch).encode())
    assert reply.status == 200
    assert {a["id"]: "error" in a for a in reply.json()} == {"a": False, "b": True}
    notes = json.dumps([{"jsonrpc": "2.0", "method": "GetServerInfo"}] * 2).encode()
    reply = http(url, notes)
    assert reply.status == 204 and reply.body == b""
    empty = http(url, b"[]")
    assert empty.status == 200 and empty.json()["error"]["code"] == -32600


def test_the_timeout_header_sets_the_deadline(server: RunningServer) -> None:
    answer = rpc(server, "Evaluate", {"graph": SEED_GRAPH}, **{"X-Timeout-Seconds": "1e-9"})
    assert answer["error"]["code"] == -32004
    reply = http(server.http_url + "/rpc", b"{}", headers={"X-Timeout-Seconds": "soon"})
    assert reply.status == 400 and b"X-Timeout-Seconds" in reply.body


def test_responses_are_json_and_echo_the_request_id(server: RunningServer) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "GetServerInfo"}).encode()
    reply = http(server.http_url + "/rpc", body, headers={"X-Request-Id": "trace-42"})
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["X-Request-Id"] == "trace-42"
    charset = http(server.http_url + "/rpc", body, content_type="application/json; charset=utf-8")
    assert charset.status == 200 and charset.json()["id"] == 7


# -- HTTP rules -------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_another_content_type_is_415(server: RunningServer, content_type: str | None) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "GetServerInfo"}).encode()
    reply = http(server.http_url + "/rpc", body, content_type=content_type)
    assert reply.status == 415 and b"application/json" in reply.body


def test_get_on_rpc_is_405_with_allow(server: RunningServer) -> None:
    reply = http(server.http_url + "/rpc")
    assert reply.status == 405 and reply.headers["Allow"] == "POST"


def test_a_body_over_the_limit_is_413(grpc_server_factory: Factory) -> None:
    server = grpc_server_factory(http_max_body_bytes=4096)
    url = server.http_url + "/rpc"
    small = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "Evaluate", "params": {"graph": SEED_GRAPH}}
    ).encode()
    assert len(small) < 4096 and http(url, small).status == 200
    big = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "Evaluate",
            "params": {"graph": SEED_GRAPH, "inputs": {"a": 1.0}},
            "padding": "x" * 5000,
        }
    ).encode()
    reply = http(url, big)
    assert reply.status == 413 and b"http_max_body_bytes" in reply.body


def test_healthz_and_readyz_while_serving(server: RunningServer) -> None:
    assert http(server.http_url + "/healthz").status == 200
    ready = http(server.http_url + "/readyz")
    assert ready.status == 200 and ready.body == b"ready\n"
    assert http(server.http_url + "/nowhere").status == 404


def test_http_port_minus_one_turns_http_off(grpc_server_factory: Factory) -> None:
    args = cli.build_parser().parse_args(["serve", "--http-port", "-1"])
    assert config.from_sources(args, environ={}).http_port == -1
    server = grpc_server_factory(http_port=-1)
    assert server.http_port is None and server.http is None
    with pytest.raises(config.SettingsError, match="http-port"):
        config.Settings(http_port=-2)


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_count_both_transports(
    server: RunningServer, stub: pb_grpc.GradientServiceStub
) -> None:
    before = scrape(server)
    for _ in range(2):
        assert "result" in rpc(server, "Evaluate", {"graph": SEED_GRAPH})
    assert rpc(server, "Evaluate", {"graph": {"nodes": []}})["error"]["code"] == -32602
    gid = rpc(server, "RegisterGraph", {"graph": SEED_GRAPH})["result"]["graphId"]
    assert "result" in rpc(server, "Evaluate", {"graphId": gid})  # a cache hit
    assert rpc(server, "Evaluate", {"graphId": "sha256:0"})["error"]["code"] == -32005  # a miss
    seed = json_format.ParseDict({"graph": SEED_GRAPH}, pb.EvaluateRequest())
    for _ in range(3):
        stub.Evaluate(seed)
    stub.Evaluate(pb.EvaluateRequest(graph_id=gid))  # another hit
    with pytest.raises(grpc.RpcError):
        stub.Evaluate(pb.EvaluateRequest(graph_id="sha256:1"))  # another miss
    # A failed gRPC call is recorded just after its status went out: wait for it (2 s at most).
    miss = {"transport": "grpc", "method": "Evaluate", "code": "NOT_FOUND"}
    give_up = time.monotonic() + 2.0
    after = scrape(server)
    while (
        sample(after, "micrograd_requests_total", **miss)
        == sample(before, "micrograd_requests_total", **miss)
        and time.monotonic() < give_up
    ):
        time.sleep(0.02)
        after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    requests = "micrograd_requests_total"
    assert delta(requests, transport="jsonrpc", method="Evaluate", code="OK") == 3
    assert delta(requests, transport="jsonrpc", method="Evaluate", code="INVALID_ARGUMENT") == 1
    assert delta(requests, transport="jsonrpc", method="Evaluate", code="NOT_FOUND") == 1
    assert delta(requests, transport="jsonrpc", method="RegisterGraph", code="OK") == 1
    assert delta(requests, transport="grpc", method="Evaluate", code="OK") == 4
    assert delta(requests, transport="grpc", method="Evaluate", code="NOT_FOUND") == 1
    latency = "micrograd_request_duration_seconds_count"
    assert delta(latency, transport="jsonrpc", method="Evaluate") == 5
    assert delta(latency, transport="grpc", method="Evaluate") == 5
    nodes = "micrograd_nodes_evaluated_total"
    assert delta(nodes, transport="jsonrpc") == 3 * 33
    assert delta(nodes, transport="grpc") == 4 * 33
    assert delta("micrograd_graph_cache_hits_total") == 2
    assert delta("micrograd_graph_cache_misses_total") == 2
    assert sample(after, "micrograd_graph_cache_entries") == 1
    assert sample(after, "micrograd_in_flight_requests", transport="grpc") == 0
    assert sample(after, "micrograd_in_flight_requests", transport="jsonrpc") == 0
    assert sample(after, "micrograd_ready") == 1
    assert delta("micrograd_http_responses_total", path="/rpc", status="200") == 6


# -- shutdown ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_readyz_turns_503_while_draining_and_calls_in_flight_finish(
    grpc_server_factory: Factory,
) -> None:
    server = grpc_server_factory(process=True, kernel="python", inline_cells=0, grace_period=20.0)
    assert server.process is not None
    tape = step_chain(1_000_000)  # about 2 s on the python kernel
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        gid = stub.RegisterGraph(pb.RegisterGraphRequest(packed_graph=codec.pack(tape))).graph_id
        stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=(("x-request-id", "grpc-info-1"),))
    seed = rpc(server, "Evaluate", {"graph": SEED_GRAPH}, **{"X-Request-Id": "seed-1"})
    assert "result" in seed
    assert http(server.http_url + "/readyz").status == 200

    slow: dict[str, Any] = {}

    def call_slow() -> None:
        slow["answer"] = rpc(server, "Evaluate", {"graphId": gid, "selection": "SELECTION_OUTPUT"})

    caller = threading.Thread(target=call_slow)
    caller.start()

    def in_flight() -> bool:
        return sample(scrape(server), "micrograd_in_flight_requests", transport="jsonrpc") >= 1

    assert wait_until(in_flight, timeout=10.0)
    server.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: http(server.http_url + "/readyz").status == 503, timeout=5.0)
    assert caller.is_alive(), "the slow call finished before the drain could be observed"
    assert http(server.http_url + "/healthz").status == 200
    refused = rpc(server, "GetServerInfo")
    assert refused["error"]["code"] == -32014
    assert refused["error"]["data"]["grpcCode"] == "UNAVAILABLE"
    caller.join(30)
    result = slow["answer"]["result"]
    assert result["values"] == [1_000_000.5] and result["grads"] == [1.0]
    assert server.process.wait(30) == 0

    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    calls = [line for line in lines if line["logger"] == "micrograd.server.requests"]
    (seed_line,) = [c for c in calls if c["request_id"] == "seed-1"]
    assert seed_line["transport"] == "jsonrpc" and seed_line["method"] == "Evaluate"
    assert seed_line["status"] == "OK" and seed_line["nodes"] == 33
    assert seed_line["duration_ms"] >= 0
    (info_line,) = [c for c in calls if c["request_id"] == "grpc-info-1"]
    assert info_line["transport"] == "grpc" and info_line["method"] == "GetServerInfo"
    assert any(c["status"] == "UNAVAILABLE" for c in calls)


# -- the curl example ---------------------------------------------------------------------------

CURL_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "curl_seed.sh"


def _curl_example(
    url: str, path: str | None = None, extra: dict[str, str] | None = None
) -> list[str]:
    env = {"PATH": path} if path is not None else None
    if extra is not None:
        env = {"PATH": os.environ.get("PATH", ""), **(env or {}), **extra}
    done = subprocess.run(
        [shutil.which("bash") or "bash", str(CURL_EXAMPLE), url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example_prints_the_seed_numbers(server: RunningServer) -> None:
    assert _curl_example(server.http_url + "/rpc") == ["24.7041", "138.8338", "645.5773"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example_without_jq_uses_python(server: RunningServer, tmp_path: Path) -> None:
    for tool in ("curl", "cat", "dirname", "xargs"):
        found = shutil.which(tool)
        assert found is not None
        (tmp_path / tool).symlink_to(found)
    (tmp_path / "python3").symlink_to(sys.executable)
    lines = _curl_example(server.http_url + "/rpc", path=str(tmp_path))
    assert lines == ["24.7041", "138.8338", "645.5773"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example_over_mutual_tls_with_a_token(
    grpc_server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    secured = grpc_server_factory(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca), auth_token_file=str(pki.tokens),
    )
    env = {
        "MICROGRAD_RPC_TLS_CA": str(pki.ca),
        "MICROGRAD_RPC_TLS_CLIENT_CERT": str(pki.client_cert),
        "MICROGRAD_RPC_TLS_CLIENT_KEY": str(pki.client_key),
        "MICROGRAD_RPC_TOKEN": pki.token,
    }
    url = secured.http_url + "/rpc"
    assert url.startswith("https://")
    assert _curl_example(url, extra=env) == ["24.7041", "138.8338", "645.5773"]
