"""JSON-RPC 2.0 over the service core, without a network: every protocol rule and error code.

``JsonRpc.handle`` takes a body and returns the response body (``None`` when
nothing is sent back), so each rule of the JSON-RPC 2.0 specification is one
call here. Expected numbers: the seed document (24.7041, 138.8338, 645.5773)
and the service's own ``Evaluate`` on the same request (exact doubles).
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from micrograd.server.config import Settings
from micrograd.server.jsonrpc import ERROR_CODES, JsonRpc, Method, error_code
from micrograd.server.metrics import Metrics
from micrograd.server.service import Code, GradientService, ServiceError
from micrograd.v1 import gradient_service_pb2 as pb

SEED_GRAPH = json.loads(
    (Path(__file__).resolve().parent.parent / "examples" / "graphs" / "seed.json").read_text()
)
"""The seed document's graph in the proto3 JSON mapping: inputs a, b; output g (named)."""


@pytest.fixture
def service() -> GradientService:
    return GradientService(Settings(workers=1, kernel="python"))


@pytest.fixture
def rpc(service: GradientService) -> JsonRpc:
    return JsonRpc(service, max_batch=5)


def handle(rpc: JsonRpc, body: Any, timeout: float | None = None) -> Any:
    """Send ``body`` (bytes as is, anything else as JSON); the decoded answer or ``None``."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = asyncio.run(rpc.handle(raw, timeout=timeout))
    return None if answer is None else json.loads(answer)


def call(method: str, params: Any = None, id_: Any = 1) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id_}
    if params is not None:
        request["params"] = params
    return request


def error_of(answer: dict[str, Any]) -> dict[str, Any]:
    assert "result" not in answer, answer
    return answer["error"]  # type: ignore[no-any-return]


# -- methods -----------------------------------------------------------------------------


def test_evaluate_gives_the_seed_numbers(rpc: JsonRpc) -> None:
    answer = handle(rpc, call("Evaluate", {"graph": SEED_GRAPH, "selection": "SELECTION_NAMED"}))
    assert answer["jsonrpc"] == "2.0" and answer["id"] == 1
    r = answer["result"]
    assert r["nodes"] == [0, 1, 32] and r["names"] == {"a": 0, "b": 1, "g": 2}
    assert r["nodeCount"] == 33 and r["rows"] == 1 and r["output"] == 32
    assert r["graphId"].startswith("sha256:")
    assert [f"{x:.4f}" for x in (r["values"][2], r["grads"][0], r["grads"][1])] == [
        "24.7041",
        "138.8338",
        "645.5773",
    ]


def test_result_is_the_response_message_in_the_proto3_json_mapping(
    rpc: JsonRpc, service: GradientService
) -> None:
    params = {"graph": SEED_GRAPH, "inputs": {"a": 1.5}, "selection": "SELECTION_INPUTS"}
    answer = handle(rpc, call("Evaluate", params))
    direct = service.evaluate(json_format.ParseDict(params, pb.EvaluateRequest()))
    expected = json_format.MessageToDict(direct, always_print_fields_with_no_presence=True)
    assert answer["result"] == expected
    assert answer["result"]["values"][0] == 1.5


def test_params_take_original_field_names_too(rpc: JsonRpc) -> None:
    camel = handle(rpc, call("Evaluate", {"graph": SEED_GRAPH, "skipGradients": True}))
    snake = handle(rpc, call("Evaluate", {"graph": SEED_GRAPH, "skip_gradients": True}))
    assert camel["result"] == snake["result"] and camel["result"]["grads"] == []


def test_non_finite_numbers_are_strings_both_ways(rpc: JsonRpc) -> None:
    graph = {
        "nodes": [
            {"op": "OP_INPUT", "value": 0.0, "name": "x"},
            {"op": "OP_LOG", "args": [0]},
            {"op": "OP_NEG", "args": [1]},
        ]
    }
    r = handle(rpc, call("Evaluate", {"graph": graph}))["result"]
    # log(0) = -inf, -log(0) = inf; d(-log x)/dx at 0 is -1/0 = -inf.
    assert r["values"] == [0.0, "-Infinity", "Infinity"]
    assert r["grads"] == ["-Infinity", -1.0, 1.0]
    r = handle(rpc, call("Evaluate", {"graph": graph, "inputs": {"x": "NaN"}}))["result"]
    assert r["values"] == ["NaN", "NaN", "NaN"]


def test_evaluate_stream_returns_the_stream_as_an_array(
    rpc: JsonRpc, service: GradientService
) -> None:
    params = {"request": {"graph": SEED_GRAPH}, "chunkSize": 10}
    messages = handle(rpc, call("EvaluateStream", params))["result"]
    assert [m["part"] for m in messages] == ["PART_HEADER"] + ["PART_VALUES"] * 4 + [
        "PART_GRADIENTS"
    ] * 4
    assert messages[0]["header"]["nodeCount"] == 33
    # uint64 offsets follow the mapping's 64-bit rule: decimal strings.
    assert [m["offset"] for m in messages[1:5]] == ["0", "10", "20", "30"]
    values = [x for m in messages if m["part"] == "PART_VALUES" for x in m["data"]]
    grads = [x for m in messages if m["part"] == "PART_GRADIENTS" for x in m["data"]]
    direct = service.evaluate(json_format.ParseDict({"graph": SEED_GRAPH}, pb.EvaluateRequest()))
    assert values == list(direct.values) and grads == list(direct.grads)


def test_register_graph_then_evaluate_by_id(rpc: JsonRpc) -> None:
    registered = handle(rpc, call("RegisterGraph", {"graph": SEED_GRAPH}))["result"]
    assert registered["nodeCount"] == 33
    r = handle(rpc, call("Evaluate", {"graphId": registered["graphId"], "inputs": {"a": -4}}))
    assert f"{r['result']['values'][-1]:.4f}" == "24.7041"


def test_get_server_info_without_params(rpc: JsonRpc, service: GradientService) -> None:
    r = handle(rpc, call("GetServerInfo"))["result"]
    assert r["kernel"] == "python" and r["workers"] == 1
    assert r["limits"]["maxNodes"] == str(service.settings.max_nodes)  # uint64: a string
    assert [o["name"] for o in r["ops"]][:3] == ["input", "const", "add"]


# -- the error table -------------------------------------------------------------------------


def test_error_table_maps_every_grpc_status_into_the_reserved_ranges() -> None:
    assert set(ERROR_CODES) == {c.name for c in grpc.StatusCode} - {"OK"}
    assert ERROR_CODES["INVALID_ARGUMENT"] == -32602
    assert ERROR_CODES["UNIMPLEMENTED"] == -32601
    assert ERROR_CODES["INTERNAL"] == -32603
    assert ERROR_CODES["CANCELLED"] == -32001
    assert ERROR_CODES["DEADLINE_EXCEEDED"] == -32004
    assert ERROR_CODES["NOT_FOUND"] == -32005
    assert ERROR_CODES["RESOURCE_EXHAUSTED"] == -32008
    assert ERROR_CODES["UNAVAILABLE"] == -32014
    special = {"INVALID_ARGUMENT", "UNIMPLEMENTED", "INTERNAL"}
    assert all(-32099 <= v <= -32000 for k, v in ERROR_CODES.items() if k not in special)
    assert len(set(ERROR_CODES.values())) == len(ERROR_CODES)


@pytest.mark.parametrize("code", list(Code))
def test_every_service_error_code_reaches_the_caller(rpc: JsonRpc, code: Code) -> None:
    def fail(request: Any, deadline: Any) -> Any:
        raise ServiceError(code, f"failed with {code.value}", [("graph.nodes[1].op", "why")])

    rpc.methods["Fail"] = Method(pb.GetServerInfoRequest, fail, lambda r: 0)
    err = error_of(handle(rpc, call("Fail", id_="f")))
    assert err["code"] == error_code(code.value)
    assert err["message"] == f"failed with {code.value}"
    assert err["data"] == {
        "grpcCode": code.value,
        "violations": [{"field": "graph.nodes[1].op", "description": "why"}],
    }


def test_an_unexpected_exception_is_internal_error(rpc: JsonRpc) -> None:
    def crash(request: Any, deadline: Any) -> Any:
        raise RuntimeError("boom")

    rpc.methods["Crash"] = Method(pb.GetServerInfoRequest, crash, lambda r: 0)
    err = error_of(handle(rpc, call("Crash")))
    assert err["code"] == -32603 and err["data"]["grpcCode"] == "INTERNAL"
    # The slot is given back: the next call is served.
    assert "result" in handle(rpc, call("GetServerInfo"))


# -- protocol errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{", b"not json", b"\xff\xfe", b'{"jsonrpc": "2.0",}'])
def test_a_body_that_is_not_json_is_a_parse_error(rpc: JsonRpc, body: bytes) -> None:
    answer = handle(rpc, body)
    assert answer["id"] is None and error_of(answer)["code"] == -32700


def test_bare_nan_is_a_parse_error_that_says_how_to_write_it(rpc: JsonRpc) -> None:
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "Evaluate", "params": {"inputs": {"a": NaN}}}'
    err = error_of(handle(rpc, body))
    assert err["code"] == -32700 and '"NaN"' in err["message"]


@pytest.mark.parametrize(
    ("request_", "reply_id"),
    [
        (42, None),
        ("Evaluate", None),
        ({"method": "GetServerInfo", "id": 1}, 1),  # no "jsonrpc"
        ({"jsonrpc": "1.0", "method": "GetServerInfo", "id": 2}, 2),
        ({"jsonrpc": "2.0", "method": 7, "id": 3}, 3),
        ({"jsonrpc": "2.0", "id": 4}, 4),  # no method
        ({"jsonrpc": "2.0", "method": "GetServerInfo", "id": [1]}, None),
        ({"jsonrpc": "2.0", "method": "GetServerInfo", "id": True}, None),
        ({"jsonrpc": "2.0", "method": "GetServerInfo", "params": 3, "id": 5}, 5),
        ({"jsonrpc": "2.0", "method": 7}, None),  # invalid even without an id: answered
    ],
)
def test_an_invalid_request_object_is_invalid_request(
    rpc: JsonRpc, request_: Any, reply_id: Any
) -> None:
    answer = handle(rpc, request_)
    assert error_of(answer)["code"] == -32600
    assert answer["id"] == reply_id


def test_an_unknown_method_is_method_not_found(rpc: JsonRpc) -> None:
    err = error_of(handle(rpc, call("UploadGraph", {})))
    assert err["code"] == -32601 and "gRPC-only" in err["message"]
    assert error_of(handle(rpc, call("evaluate")))["code"] == -32601


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ([SEED_GRAPH], "params"),
        ({"grap": SEED_GRAPH}, "params"),
        ({"graph": {"nodes": [{"op": "OP_NOPE"}]}}, "graph.nodes[0].op"),
        ({"graph": {"nodes": [{"op": "OP_INPUT", "value": "many"}]}}, "graph.nodes[0].value"),
        ({"graph": {"nodes": [{"op": "OP_INPUT"}, {"op": "OP_NEG", "args": [-1]}]}}, "params"),
    ],
)
def test_params_that_are_not_the_request_message_are_invalid_params(
    rpc: JsonRpc, params: Any, field: str
) -> None:
    err = error_of(handle(rpc, call("Evaluate", params)))
    assert err["code"] == -32602 and err["data"]["grpcCode"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in err["data"]["violations"]] == [field]


def test_a_graph_the_service_rejects_is_invalid_params_with_its_violations(rpc: JsonRpc) -> None:
    graph = {"nodes": [{"op": "OP_INPUT"}, {"op": "OP_INPUT"}, {"op": "OP_ADD", "args": [0, 5]}]}
    err = error_of(handle(rpc, call("Evaluate", {"graph": graph})))
    assert err["code"] == -32602 and err["data"]["grpcCode"] == "INVALID_ARGUMENT"
    (violation,) = err["data"]["violations"]
    assert violation["field"] == "graph.nodes[2].args[1]"
    assert "5" in violation["description"]


def test_an_unknown_graph_id_is_not_found(rpc: JsonRpc) -> None:
    err = error_of(handle(rpc, call("Evaluate", {"graphId": "sha256:feed"})))
    assert err["code"] == -32005 and err["data"] == {"grpcCode": "NOT_FOUND", "violations": []}


def test_a_graph_over_max_nodes_is_resource_exhausted() -> None:
    rpc = JsonRpc(GradientService(Settings(workers=1, max_nodes=10)))
    err = error_of(handle(rpc, call("Evaluate", {"graph": SEED_GRAPH})))
    assert err["code"] == -32008 and err["data"]["grpcCode"] == "RESOURCE_EXHAUSTED"
    assert "max_nodes" in err["message"]


def test_a_passed_deadline_is_deadline_exceeded(rpc: JsonRpc) -> None:
    err = error_of(handle(rpc, call("Evaluate", {"graph": SEED_GRAPH}), timeout=1e-9))
    assert err["code"] == -32004 and err["data"]["grpcCode"] == "DEADLINE_EXCEEDED"


def test_a_draining_service_is_unavailable(rpc: JsonRpc, service: GradientService) -> None:
    service.drain()
    err = error_of(handle(rpc, call("GetServerInfo")))
    assert err["code"] == -32014 and err["data"]["grpcCode"] == "UNAVAILABLE"


# -- batches and notifications ---------------------------------------------------------------------


def test_a_batch_answers_every_call_with_its_id(rpc: JsonRpc) -> None:
    batch = [
        call("Evaluate", {"graph": SEED_GRAPH, "selection": "SELECTION_OUTPUT"}, id_="seed"),
        call("GetServerInfo", id_=2),
        call("Nope", id_=3),
        {"jsonrpc": "2.0", "method": "GetServerInfo"},  # a notification: no answer
        call("Evaluate", {"graphId": "sha256:0"}, id_=None),
    ]
    answers = handle(rpc, batch)
    by_id = {a["id"]: a for a in answers}
    assert len(answers) == 4 and set(by_id) == {"seed", 2, 3, None}
    assert f"{by_id['seed']['result']['values'][0]:.4f}" == "24.7041"
    assert by_id[2]["result"]["kernel"] == "python"
    assert by_id[3]["error"]["code"] == -32601
    assert by_id[None]["error"]["code"] == -32005


def test_a_batch_of_non_objects_gets_one_error_each(rpc: JsonRpc) -> None:
    answers = handle(rpc, [1, 2, 3])
    assert [(a["id"], a["error"]["code"]) for a in answers] == [(None, -32600)] * 3


def test_an_empty_batch_is_one_invalid_request(rpc: JsonRpc) -> None:
    answer = handle(rpc, [])
    assert isinstance(answer, dict) and answer["id"] is None
    assert error_of(answer)["code"] == -32600


def test_a_batch_over_the_limit_is_one_invalid_request(rpc: JsonRpc) -> None:
    answer = handle(rpc, [call("GetServerInfo", id_=i) for i in range(6)])
    assert isinstance(answer, dict)
    err = error_of(answer)
    assert err["code"] == -32600 and "at most 5" in err["message"]
    assert "jsonrpc_max_batch" in err["message"]
    assert len(handle(rpc, [call("GetServerInfo", id_=i) for i in range(5)])) == 5


def test_a_notification_gets_no_answer_even_when_it_fails(rpc: JsonRpc) -> None:
    assert handle(rpc, {"jsonrpc": "2.0", "method": "GetServerInfo"}) is None
    assert handle(rpc, {"jsonrpc": "2.0", "method": "Nope"}) is None
    assert handle(rpc, {"jsonrpc": "2.0", "method": "Evaluate", "params": [1]}) is None


def test_a_batch_of_only_notifications_gets_no_answer(rpc: JsonRpc) -> None:
    notes = [{"jsonrpc": "2.0", "method": "GetServerInfo"}, {"jsonrpc": "2.0", "method": "Nope"}]
    assert handle(rpc, notes) is None


def test_notifications_are_still_executed(rpc: JsonRpc, service: GradientService) -> None:
    note = {"jsonrpc": "2.0", "method": "RegisterGraph", "params": {"graph": SEED_GRAPH}}
    assert handle(rpc, note) is None
    assert len(service.cache) == 1


# -- accounting -----------------------------------------------------------------------------------


def test_every_call_is_counted_by_method_and_status(service: GradientService) -> None:
    metrics = Metrics()
    rpc = JsonRpc(service, metrics=metrics)
    handle(rpc, [call("Evaluate", {"graph": SEED_GRAPH}, id_=i) for i in range(3)])
    handle(rpc, call("Evaluate", {"graphId": "x"}))
    handle(rpc, call("Nope"))
    handle(rpc, b"[")

    def count(method: str, code: str) -> float:
        value = metrics.registry.get_sample_value(
            "micrograd_requests_total", {"transport": "jsonrpc", "method": method, "code": code}
        )
        return value or 0.0

    assert count("Evaluate", "OK") == 3
    assert count("Evaluate", "NOT_FOUND") == 1
    assert count("(unknown)", "UNIMPLEMENTED") == 1
    assert count("(invalid)", "INVALID_ARGUMENT") == 1
    nodes = metrics.registry.get_sample_value(
        "micrograd_nodes_evaluated_total", {"transport": "jsonrpc"}
    )
    assert nodes == 3 * 33
    assert service.in_flight == 0
    assert not math.isnan(count("Evaluate", "OK"))
