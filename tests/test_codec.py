"""The codec: tapes to and from micrograd.v1 messages, on both decode paths.

Where the native extension is built, ``codec.unpack`` validates packed
columns in C; the numpy path is the fallback. Every case here runs on both
(the ``decoder`` fixture switches between them) and must give the same tape
or the same error: node, field and message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
from micrograd import codec, ops
from micrograd.codec import graph as codec_graph
from micrograd.errors import GraphError
from micrograd.tape import Tape
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import graph_pb2

from tests.graphs import random_dag, seed_graph

DECODERS = ["numpy"] + (["native"] if codec_graph._native_unpack_columns is not None else [])


@pytest.fixture(params=DECODERS)
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test once per PackedGraph decoder available here."""
    if request.param == "numpy":
        monkeypatch.setattr(codec_graph, "_native_unpack_columns", None)
    yield request.param


def same_tape(a: Tape, b: Tape) -> bool:
    """Whether two tapes hold the same columns and names."""
    return (
        np.array_equal(a.code, b.code)
        and np.array_equal(a.arg0, b.arg0)
        and np.array_equal(a.arg1, b.arg1)
        and (a.arg2 is None) == (b.arg2 is None)
        and (a.arg2 is None or np.array_equal(a.arg2, b.arg2))
        and np.array_equal(a.const, b.const)
        and dict(a.names) == dict(b.names)
    )


def seed_tape() -> Tape:
    """The seed example's graph with inputs named a and b."""
    a, b, g = seed_graph()
    return Tape.from_value(g, {"a": a, "b": b})[0]


@pytest.mark.parametrize("seed", range(8))
def test_pack_then_unpack_gives_the_same_tape(decoder: str, seed: int) -> None:
    tape = Tape.from_nodes(random_dag(seed).nodes)
    assert same_tape(codec.unpack(codec.pack(tape)), tape)


def test_packed_and_node_list_forms_decode_to_one_tape_and_one_id(decoder: str) -> None:
    tape = seed_tape()
    packed = codec.unpack(codec.pack(tape))
    listed = codec.from_graph(codec.to_graph(tape))
    assert same_tape(packed, tape) and same_tape(listed, tape)
    assert codec.graph_id(packed) == codec.graph_id(listed) == codec.graph_id(tape)
    assert codec.graph_id(tape).startswith("sha256:")


def test_packed_columns_are_sized_by_arity_and_value_use() -> None:
    tape = seed_tape()
    msg = codec.pack(tape)
    arity = np.array([{0: 0, 1: 1, 2: 2}[int(a)] for a in ops.ARITY[tape.code]])
    assert len(msg.ops) == len(tape)
    assert len(msg.args) == 4 * int(arity.sum())
    assert len(msg.values) == 8 * int(ops.USES_VALUE[tape.code].sum())
    assert {n.name: n.node for n in msg.names} == dict(tape.names)


def edited(edit: Callable[[graph_pb2.PackedGraph], None]) -> graph_pb2.PackedGraph:
    """The seed's packed graph with one edit applied."""
    msg = codec.pack(seed_tape())
    edit(msg)
    return msg


def replace_arg(msg: graph_pb2.PackedGraph, position: int, value: int) -> None:
    """Overwrite the ``position``-th uint32 of ``args``."""
    args = bytearray(msg.args)
    args[4 * position : 4 * position + 4] = value.to_bytes(4, "little")
    msg.args = bytes(args)


# (edit, expected node, expected field, message pattern); the seed graph's
# node 2 is `a + b`, whose arguments are the first two entries of args.
BAD_PACKED = {
    "empty": (lambda m: setattr(m, "ops", b""), None, "ops", "no nodes"),
    "op zero": (
        lambda m: setattr(m, "ops", m.ops[:2] + b"\x00" + m.ops[3:]),
        2,
        "ops[2]",
        "unknown op 0",
    ),
    "op too big": (
        lambda m: setattr(m, "ops", m.ops[:2] + b"\xc8" + m.ops[3:]),
        2,
        "ops[2]",
        "unknown op 200",
    ),
    "ragged args": (lambda m: setattr(m, "args", m.args[:-2]), None, "args", "multiple of 4"),
    "args short": (
        lambda m: setattr(m, "args", m.args[:-4]),
        None,
        "args",
        r"args holds \d+ indices but the ops need \d+",
    ),
    "args long": (
        lambda m: setattr(m, "args", m.args + b"\0\0\0\0"),
        None,
        "args",
        r"args holds \d+ indices but the ops need \d+",
    ),
    "ragged values": (
        lambda m: setattr(m, "values", m.values[:-3]),
        None,
        "values",
        "multiple of 8",
    ),
    "values short": (
        lambda m: setattr(m, "values", m.values[:-8]),
        None,
        "values",
        r"values holds \d+ numbers but \d+ nodes use one",
    ),
    "forward reference": (
        lambda m: replace_arg(m, 1, 7),
        2,
        "nodes[2].args[1]",
        "refers to node 7, which does not come before node 2",
    ),
    "self reference": (lambda m: replace_arg(m, 0, 2), 2, "nodes[2].args[0]", "refers to node 2"),
    "huge reference": (
        lambda m: replace_arg(m, 0, 0xFFFFFFFF),
        2,
        "nodes[2].args[0]",
        "refers to node 4294967295",
    ),
    "empty name": (lambda m: m.names.add(node=0, name=""), None, "names[2]", "must not be empty"),
    "duplicate name": (lambda m: m.names.add(node=3, name="a"), 3, "names[2]", "used twice"),
    "name out of range": (
        lambda m: m.names.add(node=999, name="z"),
        None,
        "names",
        "refers to node 999",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PACKED))
def test_malformed_packed_graphs_name_the_node_and_field(decoder: str, case: str) -> None:
    edit, node, field, pattern = BAD_PACKED[case]
    with pytest.raises(GraphError, match=pattern) as info:
        codec.unpack(edited(edit))
    assert info.value.node == node
    assert info.value.field == field


def test_max_nodes_is_a_resource_limit_not_a_malformed_graph(decoder: str) -> None:
    with pytest.raises(codec.GraphTooLarge, match="at most 5"):
        codec.unpack(codec.pack(seed_tape()), max_nodes=5)


def test_both_decoders_agree_on_a_million_node_graph() -> None:
    rng = np.random.default_rng(7)
    n = 1_000_000
    idx = np.arange(n)
    code = np.where(idx < 10, 1, rng.choice([3, 4, 5, 11, 8], n)).astype(np.uint8)
    binary = np.isin(code, [3, 4, 5])
    arg0 = np.where(code > 2, (rng.random(n) * idx).astype(np.int64), -1)
    arg1 = np.where(binary, (rng.random(n) * idx).astype(np.int64), -1)
    const = np.where(code == 1, 0.5, np.where(code == 8, 2.0, 0.0))
    tape = Tape.from_arrays(code, arg0, arg1, const)
    msg = codec.pack(tape)
    arg0, arg1, arg2, const = codec_graph._unpack_numpy(
        np.frombuffer(msg.ops, np.uint8), msg.args, msg.values
    )
    by_numpy = Tape.from_arrays(np.frombuffer(msg.ops, np.uint8), arg0, arg1, const, None, arg2)
    assert same_tape(by_numpy, tape)
    assert same_tape(codec.unpack(msg), tape)


def test_bindings_follow_inputs_then_batch_columns() -> None:
    tape = seed_tape()
    batch = pb.Batch(columns=["b"], values=[2.0, 3.0])
    request = pb.EvaluateRequest(inputs={"a": 1.0}, batch=batch)
    assert codec.bindings(tape, request).tolist() == [[1.0, 2.0], [1.0, 3.0]]
    assert codec.bindings(tape, pb.EvaluateRequest()) is None
    assert codec.bindings(tape, pb.EvaluateRequest(inputs={"b": 5.0})).tolist() == [-4.0, 5.0]


@pytest.mark.parametrize(
    ("request_", "field", "pattern"),
    [
        (pb.EvaluateRequest(inputs={"zeta": 1.0}), "inputs[zeta]", "no input is named 'zeta'"),
        (pb.EvaluateRequest(batch=pb.Batch(columns=["a"], values=[])), "batch.values", "whole"),
        (
            pb.EvaluateRequest(batch=pb.Batch(columns=["a", "b"], values=[1.0, 2.0, 3.0])),
            "batch.values",
            "3 values for 2 column",
        ),
        (
            pb.EvaluateRequest(batch=pb.Batch(columns=["a", "a"], values=[1.0, 2.0])),
            "batch.columns",
            "twice",
        ),
        (pb.EvaluateRequest(output=99), "output", "out of range"),
        (
            pb.EvaluateRequest(selection=pb.SELECTION_LISTED, nodes=[0, 99]),
            "nodes[1]",
            "node 99 is out of range",
        ),
    ],
)
def test_request_errors_point_at_the_request_field(
    request_: pb.EvaluateRequest, field: str, pattern: str
) -> None:
    tape = seed_tape()
    with pytest.raises(GraphError, match=pattern) as info:
        output = codec.output_index(tape, request_)
        codec.selection_indices(tape, request_, output)
        codec.bindings(tape, request_)
    assert info.value.field == field


def test_response_arrays_read_either_wire_form() -> None:
    values = np.array([[1.0, 2.0], [3.0, float("inf")]])
    grads = np.array([[0.5, -0.0], [float("nan"), 4.0]])
    binary = pb.EvaluateResponse(
        rows=2, values_f64=codec.f64_bytes(values), grads_f64=codec.f64_bytes(grads)
    )
    repeated = pb.EvaluateResponse(rows=2, values=values.ravel(), grads=grads.ravel())
    for resp in (binary, repeated):
        v, g = codec.response_arrays(resp, batched=True)
        assert np.array_equal(v, values) and np.array_equal(g, grads, equal_nan=True)
    with pytest.raises(ValueError, match="whole number"):
        codec.f64_array(b"\0" * 7)


def test_wire_arrays_parse_as_the_message_protobuf_would_build() -> None:
    values = np.array([[1.5, -0.0], [float("inf"), 2.0**-1074]])
    grads = np.arange(4.0).reshape(2, 2)
    head = pb.EvaluateResponse(output=3, rows=2, node_count=2, graph_id="sha256:x", names={"a": 0})
    built = pb.EvaluateResponse()
    built.CopyFrom(head)
    built.values.extend(values.ravel())
    built.grads_f64 = grads.tobytes()
    wire = codec.with_arrays(head, [("values", values), ("grads_f64", grads)])
    parsed = pb.EvaluateResponse.FromString(wire.data)
    assert parsed == built
    # The same arrays set on the message itself (for JSON) give the same message.
    assert codec.with_fields(head, [("values", values), ("grads_f64", grads)]) == built
    assert np.array_equal(codec.response_arrays(parsed, batched=True)[0], values)


def test_wire_message_field_parses_as_the_embedded_message() -> None:
    tape = seed_tape()
    packed = codec.pack(tape)
    head = pb.EvaluateRequest(inputs={"a": 1.0}, binary_output=True)
    wire = codec.with_message(head, "packed_graph", packed.SerializeToString())
    expected = pb.EvaluateRequest(inputs={"a": 1.0}, binary_output=True, packed_graph=packed)
    assert pb.EvaluateRequest.FromString(wire.data) == expected
    outer = codec.with_message(pb.EvaluateStreamRequest(chunk_size=5), "request", wire.data)
    assert pb.EvaluateStreamRequest.FromString(outer.data).request == expected


def test_wire_refuses_fields_of_the_wrong_kind() -> None:
    with pytest.raises(TypeError, match="not a double or bytes field"):
        codec.with_arrays(pb.EvaluateResponse(), [("rows", np.zeros(2))])
    with pytest.raises(TypeError, match="not a message field"):
        codec.with_message(pb.EvaluateRequest(), "graph_id", b"")


def test_every_decoder_words_an_unknown_op_alike() -> None:
    """Tape columns, both graph messages and both decoder paths say ``ops.unknown_op``'s words."""
    words = ops.unknown_op(99)
    graph = graph_pb2.Graph(nodes=[graph_pb2.Node(op=1, value=1.0), graph_pb2.Node(op=99)])
    packed = graph_pb2.PackedGraph(ops=b"\x01\x63", values=np.float64(1.0).tobytes())
    attempts = {
        "tape": lambda: Tape.from_arrays([1, 99], [-1, 0], [-1, -1], [1.0, 0.0]),
        "graph": lambda: codec.from_graph(graph, 100),
        "packed": lambda: codec.unpack(packed, 100),
    }
    for name, attempt in attempts.items():
        with pytest.raises(GraphError) as caught:
            attempt()
        assert caught.value.node == 1, name
        assert words in str(caught.value), name
