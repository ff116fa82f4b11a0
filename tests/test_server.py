"""The gRPC server end to end: real servers on 127.0.0.1, the generated stub, no mocks.

Expected numbers come from the seed document (24.7041, 138.8338, 645.5773),
from a local ``Value.backward()`` on the same graph (exact doubles), and from
the local tape evaluated with the same kernel (large graphs).
"""

from __future__ import annotations

import random
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from micrograd import __version__, codec, ops
from micrograd.engine import Value
from micrograd.kernels import available_kernels, get_kernel
from micrograd.server import cli, config
from micrograd.server.cache import GraphCache
from micrograd.server.grpc_server import PID_METADATA, SERVICE_NAME
from micrograd.server.service import Code, Deadline, GradientService, ServiceError
from micrograd.tape import Tape
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc
from micrograd.v1 import graph_pb2

from tests.conftest import RunningServer
from tests.graphs import affine_chain_tape, random_dag, seed_expression, seed_graph

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


@pytest.fixture
def stub(grpc_server: str) -> Iterator[pb_grpc.GradientServiceStub]:
    """A stub on the shared default server."""
    with grpc.insecure_channel(grpc_server, options=_CHANNEL_OPTIONS) as channel:
        yield pb_grpc.GradientServiceStub(channel)


def _stub(target: str) -> tuple[grpc.Channel, pb_grpc.GradientServiceStub]:
    channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
    return channel, pb_grpc.GradientServiceStub(channel)


@pytest.fixture(scope="module")
def seed() -> dict[str, Any]:
    """The seed graph encoded, with the exact values and gradients of a local ``backward()``."""
    a, b, g = seed_graph()
    packed, tape, order = codec.encode_value(g, {"a": a, "b": b})
    g.backward()
    return {
        "packed": packed,
        "graph": codec.to_graph(tape),
        "tape": tape,
        "values": np.array([v.data for v in order]),
        "grads": np.array([v.grad for v in order]),
    }


def chain_tape(n: int) -> Tape:
    """``y = y * 1.0000001 + 1e-7`` from ``x = 0.5``, as a tape of ``n`` nodes."""
    return affine_chain_tape(n, 1.0000001, 1e-7)


def mixed_tape(n: int, seed: int = 7) -> Tape:
    """A seeded ``n``-node graph (numpy-built): odd nodes mix the previous node with a random
    earlier one (add, sub, mul), even nodes squash the previous one (tanh, sigmoid)."""
    rng = np.random.default_rng(seed)
    code = np.empty(n, np.uint8)
    code[:4] = ops.INPUT.code
    binary = np.array([ops.BY_NAME[name].code for name in ("add", "sub", "mul")], np.uint8)
    unary = np.array([ops.BY_NAME[name].code for name in ("tanh", "sigmoid")], np.uint8)
    idx = np.arange(n)
    odd = (idx % 2 == 1) & (idx >= 4)
    even = (idx % 2 == 0) & (idx >= 4)
    code[odd] = rng.choice(binary, odd.sum())
    code[even] = rng.choice(unary, even.sum())
    arg0 = np.where(idx >= 4, idx - 1, -1).astype(np.int32)
    arg1 = np.full(n, -1, np.int32)
    arg1[odd] = (rng.random(odd.sum()) * idx[odd]).astype(np.int32)
    const = np.zeros(n)
    const[:4] = (0.3, -0.7, 1.1, 0.05)
    return Tape.from_arrays(code, arg0, arg1, const)


def violations(err: grpc.RpcError) -> list[tuple[str, str]]:
    """The ``google.rpc.BadRequest`` field violations of a failed call."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    found = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        found += [(v.field, v.description) for v in bad.field_violations]
    return found


def arrays(resp: pb.EvaluateResponse) -> tuple[np.ndarray, np.ndarray]:
    return codec.response_arrays(resp, batched=resp.rows > 1)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` every 10 ms for at most ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# -- the seed through the wire ----------------------------------------------------------


def test_seed_graph_numbers_through_the_wire(stub: Any, seed: dict[str, Any]) -> None:
    resp = stub.Evaluate(pb.EvaluateRequest(packed_graph=seed["packed"]))
    values, grads = arrays(resp)
    assert f"{values[-1]:.4f}" == "24.7041"  # the seed's forward pass
    assert f"{grads[resp.names['a']]:.4f}" == "138.8338"  # the seed's dg/da
    assert f"{grads[resp.names['b']]:.4f}" == "645.5773"  # the seed's dg/db
    np.testing.assert_array_equal(values, seed["values"])
    np.testing.assert_array_equal(grads, seed["grads"])
    assert resp.node_count == len(seed["tape"]) and resp.output == len(seed["tape"]) - 1
    assert resp.rows == 1 and list(resp.nodes) == []
    assert resp.graph_id == codec.graph_id(seed["tape"])


def test_graph_forms_and_graph_id_give_the_same_answer(stub: Any, seed: dict[str, Any]) -> None:
    by_graph = stub.Evaluate(pb.EvaluateRequest(graph=seed["graph"]))
    by_packed = stub.Evaluate(pb.EvaluateRequest(packed_graph=seed["packed"]))
    registered = stub.RegisterGraph(pb.RegisterGraphRequest(graph=seed["graph"]))
    by_id = stub.Evaluate(pb.EvaluateRequest(graph_id=registered.graph_id))
    assert registered.graph_id == by_graph.graph_id == codec.graph_id(seed["tape"])
    assert by_graph == by_packed == by_id


def test_register_graph_is_idempotent_across_forms(stub: Any, seed: dict[str, Any]) -> None:
    first = stub.RegisterGraph(pb.RegisterGraphRequest(packed_graph=seed["packed"]))
    second = stub.RegisterGraph(pb.RegisterGraphRequest(graph=seed["graph"]))
    assert first == second
    assert first.node_count == len(seed["tape"])


def test_unknown_graph_id_is_not_found(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Evaluate(pb.EvaluateRequest(graph_id="sha256:" + "0" * 64))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "register" in err.value.details()


@pytest.mark.parametrize(
    ("selection", "listed", "expected"),
    [
        (pb.SELECTION_INPUTS, [], "inputs"),
        (pb.SELECTION_NAMED, [], "named"),
        (pb.SELECTION_LISTED, [5, 0, 5, 1], [5, 0, 5, 1]),
        (pb.SELECTION_OUTPUT, [], "output"),
    ],
)
def test_selection_reports_those_nodes(
    stub: Any, seed: dict[str, Any], selection: int, listed: list[int], expected: Any
) -> None:
    tape = seed["tape"]
    named = {
        "inputs": tape.inputs.tolist(),
        "named": sorted(tape.names.values()),
        "output": [len(tape) - 1],
    }
    nodes = expected if isinstance(expected, list) else named[expected]
    resp = stub.Evaluate(
        pb.EvaluateRequest(packed_graph=seed["packed"], selection=selection, nodes=listed)
    )
    values, grads = arrays(resp)
    assert list(resp.nodes) == nodes
    np.testing.assert_array_equal(values, seed["values"][nodes])
    np.testing.assert_array_equal(grads, seed["grads"][nodes])
    for name, position in resp.names.items():
        assert nodes[position] == tape.names[name]


def test_named_selection_maps_names_to_positions(stub: Any, seed: dict[str, Any]) -> None:
    resp = stub.Evaluate(
        pb.EvaluateRequest(packed_graph=seed["packed"], selection=pb.SELECTION_NAMED)
    )
    assert dict(resp.names) == {"a": 0, "b": 1}
    assert list(resp.values) == [-4.0, 2.0]


def test_inputs_by_name_replace_defaults(stub: Any, seed: dict[str, Any]) -> None:
    a, b = Value(1.5), Value(-0.25)
    # The same expression at other inputs: rebuild it with the seed's code path.
    resp = stub.Evaluate(
        pb.EvaluateRequest(
            packed_graph=seed["packed"],
            inputs={"a": 1.5, "b": -0.25},
            selection=pb.SELECTION_OUTPUT,
        )
    )
    local = Tape.from_value(seed_expression(a, b))[0].evaluate()[0][-1]
    assert resp.values[0] == local


def test_batch_equals_per_row_evaluations(stub: Any) -> None:
    dag = random_dag(3, size=60, inputs=3, batch=5)
    tape = Tape.from_nodes(dag.nodes)
    batch = pb.Batch(values_f64=codec.f64_bytes(dag.bindings))
    resp = stub.Evaluate(pb.EvaluateRequest(packed_graph=codec.pack(tape), batch=batch))
    assert resp.rows == 5
    values, grads = arrays(resp)
    assert values.shape == grads.shape == (5, len(tape))
    for row in range(5):
        single = stub.Evaluate(
            pb.EvaluateRequest(packed_graph=codec.pack(Tape.from_nodes(dag.bound(row))))
        )
        v, g = arrays(single)
        np.testing.assert_allclose(values[row], v, rtol=1e-12, atol=0)
        np.testing.assert_allclose(grads[row], g, rtol=1e-12, atol=1e-300)


def test_batch_columns_bind_named_inputs(stub: Any, seed: dict[str, Any]) -> None:
    batch = pb.Batch(columns=["b"], values=[2.0, 3.0])
    resp = stub.Evaluate(
        pb.EvaluateRequest(
            packed_graph=seed["packed"],
            batch=batch,
            inputs={"a": -4.0},
            selection=pb.SELECTION_OUTPUT,
        )
    )
    assert resp.rows == 2
    assert resp.values[0] == seed["values"][-1]
    local = Tape.from_value(seed_expression(Value(-4.0), Value(3.0)))[0].evaluate()[0]
    assert resp.values[1] == local[-1]


@pytest.mark.parametrize("batched", [False, True])
def test_binary_output_equals_repeated_doubles(stub: Any, batched: bool) -> None:
    dag = random_dag(5, size=2000, inputs=3, batch=3)
    tape = Tape.from_nodes(dag.nodes)
    request = pb.EvaluateRequest(packed_graph=codec.pack(tape))
    if batched:
        request.batch.values.extend(dag.bindings.reshape(-1).tolist())
    plain = stub.Evaluate(request)
    request.binary_output = True
    binary = stub.Evaluate(request)
    assert not binary.values and binary.values_f64 and not plain.values_f64
    assert codec.f64_bytes(np.array(plain.values)) == binary.values_f64
    assert codec.f64_bytes(np.array(plain.grads)) == binary.grads_f64


def test_skip_gradients_returns_values_only(stub: Any, seed: dict[str, Any]) -> None:
    resp = stub.Evaluate(pb.EvaluateRequest(packed_graph=seed["packed"], skip_gradients=True))
    assert list(resp.grads) == [] and list(resp.values) == seed["values"].tolist()


def test_output_chooses_the_differentiated_node(stub: Any, seed: dict[str, Any]) -> None:
    resp = stub.Evaluate(pb.EvaluateRequest(packed_graph=seed["packed"], output=2))
    assert resp.output == 2
    _, grads = arrays(resp)
    assert grads[2] == 1.0 and np.all(grads[3:] == 0.0)


# -- validation errors ------------------------------------------------------------------


def _first(tape: Tape, name: str) -> int:
    return int(np.flatnonzero(tape.code == ops.BY_NAME[name].code)[0])


def _graph_case(
    edit: Callable[[graph_pb2.Graph, Tape], None],
) -> Callable[[dict[str, Any]], pb.EvaluateRequest]:
    def make(seed: dict[str, Any]) -> pb.EvaluateRequest:
        graph = graph_pb2.Graph()
        graph.CopyFrom(seed["graph"])
        edit(graph, seed["tape"])
        return pb.EvaluateRequest(graph=graph)

    return make


def _set_op(g: graph_pb2.Graph, t: Tape) -> None:
    g.nodes[2].op = 99  # type: ignore[assignment]


def _drop_arg(g: graph_pb2.Graph, t: Tape) -> None:
    del g.nodes[_first(t, "add")].args[1]


def _extra_arg(g: graph_pb2.Graph, t: Tape) -> None:
    g.nodes[_first(t, "neg")].args.append(0)


def _forward_ref(g: graph_pb2.Graph, t: Tape) -> None:
    i = _first(t, "mul")
    g.nodes[i].args[1] = i


def _stray_value(g: graph_pb2.Graph, t: Tape) -> None:
    g.nodes[_first(t, "add")].value = 1.5


def _duplicate_name(g: graph_pb2.Graph, t: Tape) -> None:
    g.nodes[1].name = "a"


def _packed(
    edit: Callable[[graph_pb2.PackedGraph], None],
) -> Callable[[dict[str, Any]], pb.EvaluateRequest]:
    def make(seed: dict[str, Any]) -> pb.EvaluateRequest:
        packed = graph_pb2.PackedGraph()
        packed.CopyFrom(seed["packed"])
        edit(packed)
        return pb.EvaluateRequest(packed_graph=packed)

    return make


def _request(**fields: Any) -> Callable[[dict[str, Any]], pb.EvaluateRequest]:
    def make(seed: dict[str, Any]) -> pb.EvaluateRequest:
        return pb.EvaluateRequest(packed_graph=seed["packed"], **fields)

    return make


INVALID = {
    "unknown op": (_graph_case(_set_op), "graph.nodes[2].op", "unknown op 99"),
    "wrong arity (missing)": (_graph_case(_drop_arg), "graph.nodes[{add}].args", "missing"),
    "wrong arity (surplus)": (_graph_case(_extra_arg), "graph.nodes[{neg}].args", "absent"),
    "forward reference": (_graph_case(_forward_ref), "graph.nodes[{mul}].args[1]", "earlier"),
    "value on a non-value op": (
        _graph_case(_stray_value),
        "graph.nodes[{add}].value",
        "does not use a value",
    ),
    "duplicate name": (_graph_case(_duplicate_name), "graph.nodes[1].name", "twice"),
    "packed unknown op": (
        _packed(lambda p: setattr(p, "ops", p.ops[:2] + b"\x63" + p.ops[3:])),
        "packed_graph.ops[2]",
        "unknown op 99",
    ),
    "packed args not whole": (
        _packed(lambda p: setattr(p, "args", p.args[:-2])),
        "packed_graph.args",
        "multiple of 4",
    ),
    "listed node out of range": (
        _request(selection=pb.SELECTION_LISTED, nodes=[0, 999]),
        "nodes[1]",
        "out of range",
    ),
    "unknown input name": (
        _request(inputs={"zeta": 1.0}),
        "inputs[zeta]",
        "no input is named 'zeta'",
    ),
    "output out of range": (_request(output=999), "output", "out of range"),
    "ragged batch": (
        _request(batch=pb.Batch(columns=["a", "b"], values=[1.0, 2.0, 3.0])),
        "batch.values",
        "rows",
    ),
    "unknown batch column": (
        _request(batch=pb.Batch(columns=["q"], values=[1.0])),
        "batch.columns[0]",
        "'q'",
    ),
    "no graph": (lambda seed: pb.EvaluateRequest(), "source", "graph"),
    "empty graph": (
        lambda seed: pb.EvaluateRequest(packed_graph=graph_pb2.PackedGraph()),
        "packed_graph.ops",
        "no nodes",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_request_is_invalid_argument_with_field(
    stub: Any, seed: dict[str, Any], case: str
) -> None:
    make, field, words = INVALID[case]
    tape = seed["tape"]
    field = field.format(add=_first(tape, "add"), neg=_first(tape, "neg"), mul=_first(tape, "mul"))
    with pytest.raises(grpc.RpcError) as err:
        stub.Evaluate(make(seed))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err.value)
    assert len(found) == 1, found
    assert found[0][0].startswith(field), found
    assert words in found[0][1], found


def test_invalid_stream_request_names_fields_under_request(stub: Any, seed: dict[str, Any]) -> None:
    request = pb.EvaluateStreamRequest(
        request=pb.EvaluateRequest(packed_graph=seed["packed"], output=999)
    )
    with pytest.raises(grpc.RpcError) as err:
        list(stub.EvaluateStream(request))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations(err.value)] == ["request.output"]


# -- limits -----------------------------------------------------------------------------


def test_too_many_nodes_is_resource_exhausted(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(max_nodes=10)
    channel, stub = _stub(server.target)
    with channel:
        packed = codec.pack(chain_tape(11))
        for call in (
            lambda: stub.Evaluate(pb.EvaluateRequest(packed_graph=packed)),
            lambda: stub.RegisterGraph(pb.RegisterGraphRequest(packed_graph=packed)),
            lambda: stub.UploadGraph(iter([pb.UploadGraphRequest(piece=packed)])),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "10" in err.value.details()
        assert (
            stub.Evaluate(pb.EvaluateRequest(packed_graph=codec.pack(chain_tape(9)))).node_count
            == 9
        )


def test_batch_limits_are_resource_exhausted(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(max_batch_rows=4, max_batch_cells=100)
    channel, stub = _stub(server.target)
    with channel:
        small = codec.pack(chain_tape(9))
        for tape, rows in ((small, 5), (codec.pack(chain_tape(31)), 4)):
            request = pb.EvaluateRequest(packed_graph=tape, batch=pb.Batch(values=[0.5] * rows))
            with pytest.raises(grpc.RpcError) as err:
                stub.Evaluate(request)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = stub.Evaluate(pb.EvaluateRequest(packed_graph=small, batch=pb.Batch(values=[0.5] * 4)))
        assert ok.rows == 4


def test_response_too_big_for_one_message_points_to_streaming(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(max_message_bytes=64 * 1024)
    channel, stub = _stub(server.target)
    with channel:
        packed = codec.pack(chain_tape(5001))  # 5001 values + 5001 gradients: about 80 kB
        with pytest.raises(grpc.RpcError) as err:
            stub.Evaluate(pb.EvaluateRequest(packed_graph=packed))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "EvaluateStream" in err.value.details()
        small = stub.Evaluate(
            pb.EvaluateRequest(packed_graph=packed, selection=pb.SELECTION_OUTPUT)
        )
        assert small.node_count == 5001
        stream = stub.EvaluateStream(
            pb.EvaluateStreamRequest(request=pb.EvaluateRequest(packed_graph=packed))
        )
        assert sum(len(m.data) for m in stream) == 2 * 5001
        assert server.server is not None
        graph_id = server.server.service.register(chain_tape(20001))  # too big to send here
        big = pb.EvaluateRequest(graph_id=graph_id, binary_output=True)
        chunks = list(stub.EvaluateStream(pb.EvaluateStreamRequest(request=big)))[1:]
        assert max(len(m.data_f64) for m in chunks) <= 64 * 1024
        assert sum(len(m.data_f64) for m in chunks) == 2 * 8 * 20001


def test_calls_over_the_concurrency_limit_are_refused_at_once(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(max_concurrent_calls=1, kernel="python", inline_cells=0)
    assert server.server is not None
    service = server.server.service
    graph_id = service.register(chain_tape(300_001))
    channel, stub = _stub(server.target)
    slow = pb.EvaluateRequest(graph_id=graph_id, selection=pb.SELECTION_OUTPUT)
    tiny = pb.EvaluateRequest(packed_graph=codec.pack(chain_tape(5)))
    with channel:
        pending = stub.Evaluate.future(slow)
        assert wait_until(lambda: service.in_flight == 1)  # the python kernel needs ~0.3 s
        with pytest.raises(grpc.RpcError) as err:
            stub.Evaluate(tiny)
        refused = err.value
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_calls" in refused.details()
        assert pending.result().node_count == 300_001
        assert wait_until(lambda: service.in_flight == 0)
        assert stub.Evaluate(tiny).node_count == 5


# -- large graphs -----------------------------------------------------------------------


def _ops_pieces(packed: graph_pb2.PackedGraph, size: int) -> Iterator[pb.UploadGraphRequest]:
    """Pieces of at most ``size`` bytes per column, cut at odd offsets (mid-number)."""
    cursors = {"ops": 0, "args": 0, "values": 0}
    data = {"ops": packed.ops, "args": packed.args, "values": packed.values}
    while any(cursors[k] < len(data[k]) for k in data):
        piece = graph_pb2.PackedGraph()
        for key in data:
            start = cursors[key]
            end = min(len(data[key]), start + size - 3)
            setattr(piece, key, data[key][start:end])
            cursors[key] = end
        yield pb.UploadGraphRequest(piece=piece)
    yield pb.UploadGraphRequest(piece=graph_pb2.PackedGraph(names=packed.names))


def test_million_node_graph_via_upload_and_stream(stub: Any) -> None:
    tape = mixed_tape(1_000_000)
    tape = Tape.from_arrays(tape.code, tape.arg0, tape.arg1, tape.const, {"x0": 0, "x3": 3})
    packed = codec.pack(tape)
    assert packed.ByteSize() > 4 * 1024 * 1024  # over gRPC's default message limit
    uploaded = stub.UploadGraph(_ops_pieces(packed, 1 << 20))
    assert uploaded.graph_id == codec.graph_id(tape) and uploaded.node_count == 1_000_000
    request = pb.EvaluateStreamRequest(
        request=pb.EvaluateRequest(graph_id=uploaded.graph_id, binary_output=True),
        chunk_size=300_000,
    )
    messages = list(stub.EvaluateStream(request))
    parts = [m.part for m in messages]
    assert parts == [pb.PART_HEADER] + [pb.PART_VALUES] * 4 + [pb.PART_GRADIENTS] * 4
    header = messages[0].header
    assert header.node_count == 1_000_000 and header.graph_id == uploaded.graph_id
    assert dict(header.names) == {"x0": 0, "x3": 3}
    values = np.concatenate(
        [codec.f64_array(m.data_f64) for m in messages if m.part == pb.PART_VALUES]
    )
    grads = np.concatenate(
        [codec.f64_array(m.data_f64) for m in messages if m.part == pb.PART_GRADIENTS]
    )
    assert [m.offset for m in messages[1:5]] == [0, 300_000, 600_000, 900_000]
    local_values, local_grads = tape.evaluate(kernel=get_kernel())
    np.testing.assert_array_equal(values, local_values)
    np.testing.assert_array_equal(grads, local_grads)
    assert np.isfinite(values).all() and np.count_nonzero(grads) > 1000


def test_stream_repeated_chunks_match_evaluate(stub: Any) -> None:
    dag = random_dag(11, size=3000, inputs=3, batch=2)
    tape = Tape.from_nodes(dag.nodes)
    request = pb.EvaluateRequest(
        packed_graph=codec.pack(tape), selection=pb.SELECTION_LISTED, nodes=[5, 7, 2999, 0]
    )
    request.batch.values.extend(dag.bindings.reshape(-1).tolist())
    whole = stub.Evaluate(request)
    messages = list(stub.EvaluateStream(pb.EvaluateStreamRequest(request=request, chunk_size=3)))
    assert messages[0].header.rows == 2 and list(messages[0].header.nodes) == [5, 7, 2999, 0]
    values = [x for m in messages if m.part == pb.PART_VALUES for x in m.data]
    grads = [x for m in messages if m.part == pb.PART_GRADIENTS for x in m.data]
    assert values == list(whole.values) and grads == list(whole.grads)
    assert [m.offset for m in messages if m.part == pb.PART_VALUES] == [0, 3, 6]


def test_stream_chunk_size_is_capped(grpc_server_factory: Callable[..., RunningServer]) -> None:
    server = grpc_server_factory(max_chunk_size=100, default_chunk_size=40)
    channel, stub = _stub(server.target)
    with channel:
        packed = codec.pack(chain_tape(301))
        for asked, sizes in ((0, [40] * 7 + [21]), (10_000, [100, 100, 100, 1])):
            msgs = list(
                stub.EvaluateStream(
                    pb.EvaluateStreamRequest(
                        request=pb.EvaluateRequest(packed_graph=packed, skip_gradients=True),
                        chunk_size=asked,
                    )
                )
            )
            assert [len(m.data) for m in msgs[1:]] == sizes


# -- cancellation, deadlines, shutdown ---------------------------------------------------


def test_cancelled_call_stops_and_frees_its_slot(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(kernel="python", inline_cells=0)
    assert server.server is not None
    service = server.server.service
    graph_id = service.register(chain_tape(2_000_001))  # the python kernel needs about 2 s
    channel, stub = _stub(server.target)
    with channel:
        request = pb.EvaluateRequest(graph_id=graph_id, selection=pb.SELECTION_OUTPUT)
        pending = stub.Evaluate.future(request)
        assert wait_until(lambda: service.in_flight == 1)
        assert pending.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            pending.result()
        # The work notices at the next phase boundary (after the forward sweep) and lets go.
        assert wait_until(lambda: service.in_flight == 0)
        assert (
            stub.Evaluate(pb.EvaluateRequest(packed_graph=codec.pack(chain_tape(5)))).node_count
            == 5
        )


def test_deadline_exceeded(grpc_server_factory: Callable[..., RunningServer]) -> None:
    server = grpc_server_factory(kernel="python", inline_cells=0)
    assert server.server is not None
    service = server.server.service
    graph_id = service.register(chain_tape(2_000_001))  # the python kernel needs about 2 s
    channel, stub = _stub(server.target)
    with channel:
        slow = pb.EvaluateRequest(graph_id=graph_id, selection=pb.SELECTION_OUTPUT)
        with pytest.raises(grpc.RpcError) as err:
            stub.Evaluate(slow, timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: service.in_flight == 0)


def test_core_stops_between_phases_when_out_of_time(seed: dict[str, Any]) -> None:
    service = GradientService(config.Settings(workers=1))
    request = pb.EvaluateRequest(packed_graph=seed["packed"])
    with pytest.raises(ServiceError) as err:
        service.evaluate(request, Deadline(0.0))
    assert err.value.code is Code.DEADLINE_EXCEEDED
    cancelled = Deadline(60.0)
    stream = service.evaluate_stream(pb.EvaluateStreamRequest(request=request), cancelled)
    assert next(stream).part == pb.PART_HEADER
    cancelled.cancel()
    with pytest.raises(ServiceError) as err:
        next(stream)
    assert err.value.code is Code.CANCELLED


@pytest.mark.slow
def test_sigterm_lets_calls_in_flight_finish(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(process=True, kernel="python", inline_cells=0, grace_period=20.0)
    channel, stub = _stub(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    tape = chain_tape(2_000_001)
    with channel:
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        graph_id = stub.UploadGraph(_ops_pieces(codec.pack(tape), 4 << 20)).graph_id
        request = pb.EvaluateRequest(graph_id=graph_id, selection=pb.SELECTION_OUTPUT)
        stream = stub.EvaluateStream(pb.EvaluateStreamRequest(request=request))
        assert next(stream).part == pb.PART_HEADER  # in flight: the sweeps take about 2 s
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)

        def not_serving() -> bool:
            status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status
            return bool(status == health_pb2.HealthCheckResponse.NOT_SERVING)

        assert wait_until(not_serving, timeout=5.0)
        with pytest.raises(grpc.RpcError) as err:
            stub.Evaluate(pb.EvaluateRequest(packed_graph=codec.pack(chain_tape(5))))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
        assert [m.part for m in rest] == [pb.PART_VALUES, pb.PART_GRADIENTS]
        assert list(rest[0].data) == [tape.forward(kernel=get_kernel("python"))[-1]]
        assert list(rest[1].data) == [1.0]
    assert server.process.wait(30) == 0
    log = server.log()
    assert "listening on 127.0.0.1:" in log and "shutting down" in log and "stopped" in log


@pytest.mark.slow
def test_calls_outliving_the_grace_period_are_cut_off(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(process=True, kernel="python", inline_cells=0, grace_period=0.2)
    channel, stub = _stub(server.target)
    with channel:
        graph_id = stub.UploadGraph(
            _ops_pieces(codec.pack(chain_tape(4_000_001)), 4 << 20)
        ).graph_id
        request = pb.EvaluateRequest(graph_id=graph_id, selection=pb.SELECTION_OUTPUT)
        stream = stub.EvaluateStream(pb.EvaluateStreamRequest(request=request))
        assert next(stream).part == pb.PART_HEADER  # the sweeps take about 4 s
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert server.process.wait(30) == 0
    assert "grace period over: cancelling 1 call(s)" in server.log()


# -- health, reflection, info, workers -------------------------------------------------


def test_health_reports_serving(grpc_server: str) -> None:
    with grpc.insecure_channel(grpc_server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(grpc_server: str) -> None:
    with grpc.insecure_channel(grpc_server) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]
        listed, files = list(reflection.ServerReflectionInfo(iter(requests)))
    names = {s.name for s in listed.list_services_response.service}
    assert names == {
        SERVICE_NAME,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
    assert files.file_descriptor_response.file_descriptor_proto


def test_server_info_describes_ops_limits_and_kernel(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(
        kernel="python", max_nodes=1234, max_chunk_size=999, default_chunk_size=10
    )
    channel, stub = _stub(server.target)
    with channel:
        info, call = stub.GetServerInfo.with_call(pb.GetServerInfoRequest())
    assert info.version == __version__ and info.kernel == "python" and info.workers == 1
    assert [(o.op, o.name, o.arity, o.uses_value, o.doc) for o in info.ops] == [
        (op.code, op.name, op.arity, op.uses_value, op.doc) for op in ops.OPS
    ]
    assert info.limits.max_nodes == 1234 and info.limits.max_chunk_size == 999
    assert info.limits.max_message_bytes == 256 * 1024 * 1024
    assert dict(call.trailing_metadata())[PID_METADATA] == str(server.pid)


def _free_port() -> int:
    """A free port below the usual ephemeral range (32768 and up), so that no server started
    elsewhere with port 0 (and gRPC's default SO_REUSEPORT) can be handed the same one."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000-29999")


@pytest.mark.slow
def test_two_workers_share_one_port(
    grpc_server_factory: Callable[..., RunningServer], seed: dict[str, Any]
) -> None:
    server = grpc_server_factory(process=True, workers=2, port=_free_port(), http_port=-1)
    pids: set[str] = set()
    for _ in range(200):  # new connections land on either worker
        channel, stub = _stub(server.target)
        with channel:
            try:
                info, call = stub.GetServerInfo.with_call(pb.GetServerInfoRequest(), timeout=5)
            except grpc.RpcError:
                time.sleep(0.05)  # the second worker may still be starting
                continue
            assert info.workers == 2
            pids.add(dict(call.trailing_metadata())[PID_METADATA])
            assert (
                stub.Evaluate(pb.EvaluateRequest(packed_graph=seed["packed"])).values[-1]
                == seed["values"][-1]
            )
        if len(pids) == 2:
            break
    assert len(pids) == 2 and str(server.pid) not in pids
    assert server.stop() == 0


# -- kernels ----------------------------------------------------------------------------


def test_every_kernel_gives_the_same_numbers(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    kernels = ["value", "python", *(["native"] if "native" in available_kernels() else [])]
    dag = random_dag(21, size=300, inputs=3, batch=3)
    tape = Tape.from_nodes(dag.nodes)
    requests = [
        pb.EvaluateRequest(packed_graph=codec.pack(tape)),
        pb.EvaluateRequest(
            packed_graph=codec.pack(tape), batch=pb.Batch(values_f64=codec.f64_bytes(dag.bindings))
        ),
    ]
    results: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for kernel in kernels:
        channel, stub = _stub(grpc_server_factory(kernel=kernel).target)
        with channel:
            assert stub.GetServerInfo(pb.GetServerInfoRequest()).kernel == kernel
            results[kernel] = [arrays(stub.Evaluate(r)) for r in requests]
    reference = results["value"]
    for kernel in kernels:
        for (v, g), (rv, rg) in zip(results[kernel], reference):
            np.testing.assert_allclose(v, rv, rtol=1e-12, atol=0, err_msg=kernel)
            np.testing.assert_allclose(g, rg, rtol=1e-12, atol=1e-300, err_msg=kernel)


def test_value_kernel_matches_the_seed_exactly(seed: dict[str, Any]) -> None:
    service = GradientService(config.Settings(workers=1, kernel="value"))
    resp = service.evaluate(pb.EvaluateRequest(packed_graph=seed["packed"]))
    np.testing.assert_array_equal(resp.values, seed["values"])
    np.testing.assert_array_equal(resp.grads, seed["grads"])


# -- the core without a network ----------------------------------------------------------


def test_core_raises_service_errors_without_grpc(seed: dict[str, Any]) -> None:
    service = GradientService(config.Settings(workers=1, max_concurrent_calls=1))
    with pytest.raises(ServiceError) as err:
        service.evaluate(pb.EvaluateRequest(graph_id="nope"))
    assert err.value.code is Code.NOT_FOUND
    with service.admit(), pytest.raises(ServiceError) as err:
        service.acquire()
    assert err.value.code is Code.RESOURCE_EXHAUSTED
    service.drain()
    with pytest.raises(ServiceError) as err:
        service.acquire()
    assert err.value.code is Code.UNAVAILABLE and service.in_flight == 0


def test_graph_cache_drops_least_recently_used() -> None:
    tapes = [chain_tape(n) for n in (5, 7, 9)]
    cache = GraphCache(max_entries=2, max_bytes=1 << 20)
    cache.put("a", tapes[0])
    cache.put("b", tapes[1])
    assert cache.get("a") is tapes[0]  # "b" is now the least recently used
    cache.put("c", tapes[2])
    assert "b" not in cache and cache.get("a") is tapes[0] and cache.get("c") is tapes[2]
    small = GraphCache(max_entries=10, max_bytes=200)
    assert not small.put("big", chain_tape(100))  # 100 nodes take about 1.4 kB
    assert len(small) == 0


def test_evicted_graph_is_not_found_again(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(graph_cache_entries=1, graph_store="none")
    channel, stub = _stub(server.target)
    with channel:
        first = stub.RegisterGraph(pb.RegisterGraphRequest(packed_graph=codec.pack(chain_tape(5))))
        stub.RegisterGraph(pb.RegisterGraphRequest(packed_graph=codec.pack(chain_tape(7))))
        with pytest.raises(grpc.RpcError) as err:
            stub.Evaluate(pb.EvaluateRequest(graph_id=first.graph_id))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_clients_get_their_own_answers(stub: Any) -> None:
    tapes = [chain_tape(n) for n in range(5, 45, 2)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda t: stub.Evaluate(pb.EvaluateRequest(packed_graph=codec.pack(t))), tapes)
        )
    for tape, resp in zip(tapes, answers):
        np.testing.assert_array_equal(arrays(resp)[0], tape.forward())


# -- settings and command line -----------------------------------------------------------


def test_flags_win_over_environment() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--max-nodes", "77", "--workers", "1"])
    env = {
        "MICROGRAD_RPC_MAX_NODES": "5",
        "MICROGRAD_RPC_GRAPH_CACHE_BYTES": "2MiB",
        "MICROGRAD_RPC_KERNEL": "python",
    }
    settings = config.from_sources(args, env)
    assert (
        settings.max_nodes == 77
        and settings.graph_cache_bytes == 2 << 20
        and settings.kernel == "python"
    )
    assert config.Settings().workers >= 1 and config.Settings().host == "127.0.0.1"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"MICROGRAD_RPC_PORT": "eighty"}, "MICROGRAD_RPC_PORT: expected a whole number"),
        ({"MICROGRAD_RPC_KERNEL": "gpu"}, "--kernel (MICROGRAD_RPC_KERNEL) must be one of"),
        ({"MICROGRAD_RPC_PORT": "0", "MICROGRAD_RPC_WORKERS": "2"}, "needs --workers"),
        ({"MICROGRAD_RPC_FLUSH_DENORMALS": "maybe"}, "expected true or false"),
    ],
)
def test_bad_settings_are_reported_with_their_source(env: dict[str, str], words: str) -> None:
    with pytest.raises(config.SettingsError) as err:
        config.from_sources(None, env)
    assert words in str(err.value)


def test_serve_help_documents_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in config.dataclasses.fields(config.Settings):
        assert "--" + f.name.replace("_", "-") in text
        assert config.ENV_PREFIX + f.name.upper() in text


def test_serve_rejects_bad_flags_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--port", "70000", "--workers", "1"]) == 2
    assert "--port (MICROGRAD_RPC_PORT) must be between 0 and 65535" in capsys.readouterr().err
