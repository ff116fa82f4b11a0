"""The native kernel (``micrograd._kernel``) against the op table and ``PythonKernel``.

The Python kernel is the reference: for one binding it evaluates the op
table's scalar functions, which call the same libm as the C code, so the
native results must be bit-identical (NaN payloads aside). For a batch the
Python kernel uses numpy's ufuncs, whose ``exp``/``log``/``tanh``/``pow`` may
differ from libm in the last bit, hence 1e-12 relative there.
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import TYPE_CHECKING

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from micrograd import ops
from micrograd.errors import GraphError
from micrograd.kernels import Kernel, PythonKernel, available_kernels, get_kernel
from micrograd.tape import Tape
from micrograd.v1 import graph_pb2

if TYPE_CHECKING:
    from micrograd.native import DecodedGraph

native = pytest.importorskip("micrograd.native", reason="the C extension is not built")
_kernel = pytest.importorskip("micrograd._kernel")

NATIVE = native.NativeKernel()
PYTHON = PythonKernel()

EDGE = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 2.0, 0.5, -3.5, 1e-300, 710.0, -745.5)
"""Operands that exercise every IEEE corner of the op table (overflow, 0, signs, nan)."""
EXPONENTS = (0.0, 1.0, 2.0, 3.0, -1.0, -2.0, 0.5, -0.5, 1.5, math.nan, math.inf)


def random_tape(seed: int, n: int = 400, leaves: int = 10, window: int = 25) -> Tape:
    """A seeded random DAG using every op, with edge values among its leaves."""
    rng = np.random.default_rng(seed)
    inner = [op for op in ops.OPS if op.arity > 0]
    code = np.empty(n, np.uint8)
    a = np.full(n, -1, np.int32)
    b = np.full(n, -1, np.int32)
    z = np.full(n, -1, np.int32)
    c = np.zeros(n)
    for i in range(n):
        if i < leaves:
            code[i] = ops.INPUT.code if i % 2 == 0 else ops.CONST.code
            c[i] = EDGE[rng.integers(len(EDGE))] if rng.random() < 0.4 else rng.normal() * 2
            continue
        op = (
            inner[(i - leaves) % len(inner)]
            if i - leaves < len(inner)
            else inner[rng.integers(len(inner))]
        )
        code[i] = op.code
        a[i] = rng.integers(max(0, i - window), i)
        if op.arity >= 2:
            b[i] = rng.integers(max(0, i - window), i)
        if op.arity == 3:
            z[i] = rng.integers(max(0, i - window), i)
        if op.uses_value:
            c[i] = EXPONENTS[rng.integers(len(EXPONENTS))]
    return Tape.from_arrays(code, a, b, c, None, z)


def evaluate(
    tape: Tape, kernel: Kernel, bindings: np.ndarray | None = None, output: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """``tape.evaluate`` with numpy's IEEE warnings silenced (inf and nan are expected here)."""
    with np.errstate(all="ignore"):
        return tape.evaluate(bindings, output, kernel=kernel)


# -- the op table ---------------------------------------------------------------


def test_native_kernel_implements_every_op_of_the_table() -> None:
    implemented = {code: (name, arity) for code, name, arity in _kernel.OPS}
    for op in ops.OPS:
        assert op.code in implemented, f"the native kernel lacks op {op.name} (code {op.code})"
        assert implemented[op.code] == (op.name, op.arity), f"native entry for {op.name} differs"
    assert len(implemented) == len(ops.OPS), "the native kernel has ops the table does not"


def test_native_kernel_is_registered_first() -> None:
    assert available_kernels()[0] == "native"
    assert isinstance(get_kernel(), native.NativeKernel)
    assert get_kernel("native").flush_denormals is False


@pytest.mark.parametrize("op", [op for op in ops.OPS if op.arity > 0], ids=lambda op: op.name)
def test_each_op_matches_the_table_on_edge_values(op: ops.Op) -> None:
    # Tape [x, (y, (z,)) op(x, ...)], every pair (triple) of edge values as one batch;
    # expected numbers: the op table's own scalar forward and partials.
    points = list(itertools.product(*[EDGE] * op.arity))
    for c in EXPONENTS if op.uses_value else (0.0,):
        inputs = [("input", (), 0.0)] * op.arity
        tape = Tape.from_nodes([*inputs, (op.name, tuple(range(op.arity)), c)])
        bindings = np.array(points)
        values, grads = evaluate(tape, NATIVE, bindings)
        for row, point in enumerate(points):
            x, y, z = (*point, 0.0, 0.0)[:3]
            out = op.forward(x, y, z if op.arity == 3 else c)
            partials = op.partials(x, y, z if op.arity == 3 else c, out)
            expected_grads = [*partials[: op.arity], 1.0]
            context = f"{op.name}{point}, c={c}"
            np.testing.assert_array_equal(values[row, -1], out, err_msg=context)
            np.testing.assert_array_equal(grads[row], expected_grads, err_msg=context)
            one_values, one_grads = evaluate(tape, NATIVE, bindings[row])
            np.testing.assert_array_equal(one_values, values[row], err_msg=context)
            np.testing.assert_array_equal(one_grads, grads[row], err_msg=context)


def test_binary_op_with_one_node_as_both_arguments_accumulates_twice() -> None:
    # d(x*x)/dx = x + x and d(x/x)/dx = 1/x - (x/x)/x: 6 and 0 at x = 3 (by hand).
    for name, expected in (("mul", 6.0), ("div", 0.0), ("add", 2.0), ("sub", 0.0)):
        tape = Tape.from_nodes([("input", (), 3.0), (name, (0, 0), 0.0)])
        for bindings in (None, np.array([[3.0], [3.0]])):
            _, grads = evaluate(tape, NATIVE, bindings)
            assert np.all(grads[..., 0] == expected), name


# -- native against the Python kernel ------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_dag_is_bit_identical_to_the_python_kernel(seed: int) -> None:
    tape = random_tape(seed)
    for output in (-1, len(tape) // 2):
        expected_values, expected_grads = evaluate(tape, PYTHON, output=output)
        values, grads = evaluate(tape, NATIVE, output=output)
        np.testing.assert_array_equal(values, expected_values)
        np.testing.assert_array_equal(grads, expected_grads)


@pytest.mark.parametrize("seed", range(6))
def test_batch_matches_the_python_kernel_and_each_single_binding(seed: int) -> None:
    tape = random_tape(seed + 100)
    rng = np.random.default_rng(seed)
    bindings = rng.normal(size=(7, len(tape.inputs))) * 3
    bindings[0, 0] = math.nan
    bindings[1, -1] = 0.0
    expected_values, expected_grads = evaluate(tape, PYTHON, bindings)
    values, grads = evaluate(tape, NATIVE, bindings)
    np.testing.assert_allclose(values, expected_values, rtol=1e-12, atol=0)
    np.testing.assert_allclose(grads, expected_grads, rtol=1e-12, atol=0)
    for row in range(bindings.shape[0]):
        one_values, one_grads = evaluate(tape, NATIVE, bindings[row])
        np.testing.assert_array_equal(one_values, values[row])
        np.testing.assert_array_equal(one_grads, grads[row])


def test_node_outside_the_output_graph_never_touches_a_gradient() -> None:
    # log'(0) = inf: were node 1 swept with gradient 0, d/dx would be 0 * inf = nan.
    # Expected d(2x)/dx = 2 at x = 0 (by hand).
    tape = Tape.from_nodes(
        [("input", (), 0.0), ("log", (0,), 0.0), ("const", (), 2.0), ("mul", (0, 2), 0.0)]
    )
    for bindings in (None, np.array([[0.0], [0.0]])):
        _, grads = evaluate(tape, NATIVE, bindings)
        assert np.all(grads[..., 0] == 2.0)
        assert np.all(grads[..., 1] == 0.0)
    # The output may be any node; later nodes keep a zero gradient.
    _, grads = evaluate(tape, NATIVE, output=1)
    np.testing.assert_array_equal(grads, [math.inf, 1.0, 0.0, 0.0])


def test_reached_node_with_zero_gradient_still_propagates_nan() -> None:
    # At x = 0: log(0) = -inf and relu'(-inf) = 0, so node 1 is reached with gradient 0;
    # then log'(0) * 0 = inf * 0 = nan, as in PyTorch's relu(log(x)).backward() at x = 0.
    tape = Tape.from_nodes([("input", (), 0.0), ("log", (0,), 0.0), ("relu", (1,), 0.0)])
    _, grads = evaluate(tape, NATIVE)
    _, expected = evaluate(tape, PYTHON)
    np.testing.assert_array_equal(grads, expected)
    assert math.isnan(grads[0]) and grads[1] == 0.0


def test_non_contiguous_arrays_through_the_tape_api() -> None:
    # A (B, n) C-ordered values array reaches the kernel as an F-ordered (n, B) view.
    tape = random_tape(7)
    bindings = np.random.default_rng(7).normal(size=(5, len(tape.inputs)))
    values = tape.forward(bindings, kernel=NATIVE)
    expected = tape.forward(bindings, kernel=PYTHON)
    np.testing.assert_allclose(values, expected, rtol=1e-12, atol=0)
    grads = tape.backward(np.ascontiguousarray(values), kernel=NATIVE)
    with np.errstate(all="ignore"):
        expected_grads = tape.backward(np.ascontiguousarray(values), kernel=PYTHON)
    np.testing.assert_allclose(grads, expected_grads, rtol=1e-12, atol=0)


def test_empty_batch_does_nothing() -> None:
    tape = random_tape(3)
    values, grads = evaluate(tape, NATIVE, np.zeros((0, len(tape.inputs))))
    assert values.shape == grads.shape == (0, len(tape))


# -- threads --------------------------------------------------------------------------


def test_two_threads_evaluate_different_tapes_concurrently() -> None:
    tapes = [random_tape(21, n=30_000), random_tape(22, n=30_000)]
    expected = [evaluate(t, PYTHON) for t in tapes]
    errors: list[str] = []
    start = threading.Barrier(2)

    def work(k: int) -> None:
        start.wait(timeout=30)
        for _ in range(20):
            values, grads = evaluate(tapes[k], NATIVE)
            if not (
                np.array_equal(values, expected[k][0], equal_nan=True)
                and np.array_equal(grads, expected[k][1], equal_nan=True)
            ):
                errors.append(f"thread {k} got different numbers")
                return

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []


# -- denormals ----------------------------------------------------------------------


def halving_chain(depth: int) -> Tape:
    """x, 0.5, then y = y * 0.5 repeated: d(out)/d(node k) = 2**-(depth - k) exactly."""
    nodes: list[tuple[str, tuple[int, ...], float]] = [("input", (), 1.0), ("const", (), 0.5)]
    nodes.append(("mul", (0, 1), 0.0))
    nodes.extend(("mul", (i, 1), 0.0) for i in range(2, depth + 1))
    return Tape.from_nodes(nodes)


def test_subnormal_gradients_are_exact_by_default() -> None:
    tape = halving_chain(1060)
    _, grads = evaluate(tape, NATIVE)
    _, expected = evaluate(tape, PYTHON)
    np.testing.assert_array_equal(grads, expected)
    assert grads[0] == 2.0**-1060 and 0.0 < grads[0] < np.finfo(np.float64).tiny


@pytest.mark.skipif(not native.FLUSH_DENORMALS_SUPPORTED, reason="no flush-to-zero on this CPU")
def test_flush_denormals_turns_subnormal_gradients_into_zero() -> None:
    tape = halving_chain(1060)
    flushing = native.NativeKernel(flush_denormals=True)
    values, grads = evaluate(tape, flushing)
    tiny = np.finfo(np.float64).tiny
    assert grads[0] == 0.0
    # Every normal number is unchanged; every subnormal one became 0.
    _, exact = evaluate(tape, NATIVE)
    np.testing.assert_array_equal(grads, np.where(np.abs(exact) < tiny, 0.0, exact))
    assert np.all((values == 0.0) | (np.abs(values) >= tiny))
    # The mode is restored after the sweep: numpy still makes subnormals here.
    assert np.float64(tiny) / 4 > 0.0
    _, again = evaluate(tape, NATIVE)
    np.testing.assert_array_equal(again, exact)


# -- bad input ------------------------------------------------------------------------


def columns(tape: Tape) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return tape.code, tape.arg0, tape.arg1, tape.const


def test_bad_buffers_raise_clear_errors() -> None:
    tape = random_tape(1, n=50)
    n = len(tape)
    good = tape.const.copy()
    grads = np.zeros(n)
    cases: list[tuple[type[Exception], str, tuple[object, ...]]] = [
        (TypeError, "values must have dtype float64", (*columns(tape), good.astype(np.float32))),
        (TypeError, "values must be a float64 numpy array", (*columns(tape), list(good))),
        (ValueError, "values has 49 rows but the tape has 50", (*columns(tape), good[:-1])),
        (ValueError, "values must be C-contiguous", (*columns(tape), np.zeros((2 * n, 3))[::2])),
        (ValueError, "values must have shape", (*columns(tape), np.zeros((n, 2, 2)))),
        (
            TypeError,
            "arg0 must have dtype int32",
            (tape.code, tape.arg0.astype(np.int64), tape.arg1, tape.const, good),
        ),
        (
            TypeError,
            "code must have dtype uint8",
            (tape.arg0, tape.arg0, tape.arg1, tape.const, good),
        ),
        (ValueError, "same length", (tape.code, tape.arg0[:-1], tape.arg1, tape.const, good)),
        (TypeError, "dtype float64", (*columns(tape), good.astype(">f8"))),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            _kernel.forward(*args)
    readonly = good.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="values must be writable"):
        _kernel.forward(*columns(tape), readonly)
    with pytest.raises(ValueError, match="grads must have the same shape"):
        _kernel.backward(*columns(tape), good, np.zeros((n, 2)), n - 1)
    with pytest.raises(ValueError, match="output 50 is out of range"):
        _kernel.backward(*columns(tape), good, grads, n)
    with pytest.raises(ValueError, match="output -1 is out of range"):
        _kernel.backward(*columns(tape), good, grads, -1)
    with pytest.raises(ValueError, match="must be different arrays"):
        _kernel.backward(*columns(tape), good, good, n - 1)
    with pytest.raises(TypeError, match="float64"):
        NATIVE.forward(tape, good.astype(np.float32))


def test_unvalidated_tape_cannot_make_the_kernel_read_out_of_bounds() -> None:
    # Tape(...) skips from_arrays' checks; the sweeps still refuse the bad node.
    code = np.array([1, 3, 7, 200], np.uint8)
    ahead = Tape(
        code[:3], np.array([-1, 0, 5], np.int32), np.array([-1, 0, -1], np.int32), np.zeros(3)
    )
    for sweep in (
        lambda: NATIVE.forward(ahead, np.zeros(3)),
        lambda: NATIVE.backward(ahead, np.zeros(3), np.zeros(3), 2),
        lambda: NATIVE.forward(ahead, np.zeros((3, 4))),
        lambda: NATIVE.backward(ahead, np.zeros((3, 4)), np.zeros((3, 4)), 2),
    ):
        with pytest.raises(
            ValueError, match="node 2: argument 0 is 5, which is not an earlier node"
        ):
            sweep()
    negative = Tape(
        code[:2], np.array([-1, -7], np.int32), np.array([-1, 0], np.int32), np.zeros(2)
    )
    with pytest.raises(ValueError, match="node 1: argument 0 is -7"):
        NATIVE.forward(negative, np.zeros(2))
    unknown = Tape(
        code[[0, 3]], np.array([-1, 0], np.int32), np.array([-1, -1], np.int32), np.zeros(2)
    )
    with pytest.raises(ValueError, match=r"node 1: unknown op 200; known ops are 1\.\."):
        NATIVE.forward(unknown, np.zeros(2))


# -- the Graph wire decoder -------------------------------------------------------------


def varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative numbers as their 64-bit two's complement."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, wire_type: int, payload: bytes = b"") -> bytes:
    """One field: its key, then a length prefix for wire type 2, then ``payload``."""
    key = varint(number << 3 | wire_type)
    return key + (varint(len(payload)) if wire_type == 2 else b"") + payload


def wire_graph(*nodes: bytes) -> bytes:
    """A Graph message holding the given encoded Node messages."""
    return b"".join(field(1, 2, node) for node in nodes)


def assert_decoded_like(decoded: DecodedGraph, message: graph_pb2.Graph) -> None:
    """The decoder's columns hold exactly what protobuf parsed into ``message``."""
    nodes = message.nodes
    assert decoded.code.tolist() == [node.op for node in nodes]
    assert decoded.arg0.tolist() == [node.args[0] if len(node.args) > 0 else -1 for node in nodes]
    assert decoded.arg1.tolist() == [node.args[1] if len(node.args) > 1 else -1 for node in nodes]
    expected_const = np.array([node.value for node in nodes], dtype=np.float64)
    assert decoded.const.tobytes() == expected_const.tobytes()  # bit for bit: -0.0, nan
    assert decoded.names == [(i, node.name) for i, node in enumerate(nodes) if node.name]


def random_graph_message(seed: int, n: int = 300) -> graph_pb2.Graph:
    """A seeded Graph of arbitrary (not necessarily valid) nodes, built with protobuf."""
    rng = np.random.default_rng(seed)
    values = (0.0, -0.0, 1.5, -2.25e300, math.inf, -math.inf, math.nan, 5e-324)
    message = graph_pb2.Graph()
    for _ in range(n):
        node = message.nodes.add()
        node.op = int(rng.choice([0, 1, 2, 3, 7, 14, 15, 255]))
        node.args.extend(int(x) for x in rng.integers(0, 2**31 - 1, rng.integers(0, 3)))
        if rng.random() < 0.6:
            node.value = values[rng.integers(len(values))] if rng.random() < 0.5 else rng.normal()
        if rng.random() < 0.1:
            node.name = rng.choice(["x", "weight_1", "ünïcödé", "名前", "a" * 300])
    return message


@pytest.mark.parametrize("seed", range(5))
def test_decoder_reads_what_protobuf_writes(seed: int) -> None:
    message = random_graph_message(seed)
    assert_decoded_like(native.decode_graph(message.SerializeToString()), message)


def test_decoded_graph_evaluates_like_the_same_graph_built_in_python() -> None:
    tape = random_tape(5)
    message = graph_pb2.Graph()
    for i in range(len(tape)):
        node = message.nodes.add(op=int(tape.code[i]), value=float(tape.const[i]))
        third = -1 if tape.arg2 is None else tape.arg2[i]
        node.args.extend(int(x) for x in (tape.arg0[i], tape.arg1[i], third) if x >= 0)
    message.nodes[0].name = "first"
    decoded = native.decode_graph(message.SerializeToString())
    rebuilt = Tape.from_arrays(
        decoded.code,
        decoded.arg0,
        decoded.arg1,
        decoded.const,
        {n: i for i, n in decoded.names},
        decoded.arg2,
    )
    assert rebuilt.names == {"first": 0}
    for got, expected in zip(evaluate(rebuilt, NATIVE), evaluate(tape, PYTHON), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_unpacked_and_split_args_decode_like_packed_args() -> None:
    packed = field(1, 0, varint(3)) + field(2, 2, varint(0) + varint(1))
    unpacked = field(1, 0, varint(3)) + field(2, 0, varint(0)) + field(2, 0, varint(1))
    split = field(2, 2, varint(0)) + field(1, 0, varint(3)) + field(2, 0, varint(1))
    leaves = field(1, 0, varint(1)), field(1, 0, varint(2)) + field(3, 1, struct_double(4.0))
    for node in (packed, unpacked, split):
        data = wire_graph(*leaves, node)
        decoded = native.decode_graph(data)
        assert_decoded_like(decoded, graph_pb2.Graph.FromString(data))
        assert decoded.code.tolist() == [1, 2, 3]
        assert decoded.arg0.tolist() == [-1, -1, 0] and decoded.arg1.tolist() == [-1, -1, 1]


def struct_double(x: float) -> bytes:
    return np.array([x], dtype="<f8").tobytes()


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    unknown = (
        field(9, 0, varint(2**63))
        + field(10, 1, b"\x01" * 8)
        + field(11, 2, b"anything")
        + field(12, 5, b"\x02" * 4)
        + field(13, 3)  # a group holding a field and a nested group
        + field(1, 0, varint(7))
        + field(14, 3)
        + field(14, 4)
        + field(13, 4)
    )
    node = field(1, 0, varint(7)) + unknown + field(2, 2, varint(0)) + field(4, 2, b"y")
    data = unknown + wire_graph(field(1, 0, varint(1)) + unknown) + unknown + wire_graph(node)
    decoded = native.decode_graph(data)
    assert_decoded_like(decoded, graph_pb2.Graph.FromString(data))
    assert decoded.code.tolist() == [1, 7] and decoded.arg0.tolist() == [-1, 0]
    assert decoded.names == [(1, "y")]


def test_for_singular_fields_the_last_one_wins() -> None:
    node = (
        field(1, 0, varint(5))
        + field(3, 1, struct_double(1.0))
        + field(4, 2, b"first")
        + field(1, 0, varint(1))
        + field(3, 1, struct_double(2.0))
        + field(4, 2, b"second")
    )
    data = wire_graph(node)
    decoded = native.decode_graph(data)
    assert_decoded_like(decoded, graph_pb2.Graph.FromString(data))
    assert decoded.code.tolist() == [1] and decoded.const.tolist() == [2.0]
    assert decoded.names == [(0, "second")]


def test_empty_graph_and_bytes_like_inputs() -> None:
    empty = native.decode_graph(b"")
    assert empty.code.shape == (0,) and empty.names == []
    data = wire_graph(field(1, 0, varint(1)) + field(4, 2, b"x"))
    for buffer in (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert native.decode_graph(buffer).names == [(0, "x")]
    with pytest.raises(TypeError, match="bytes-like"):
        native.decode_graph("not bytes")  # type: ignore[arg-type]


LEAF = field(1, 0, varint(1))
MALFORMED = [
    # (wire bytes, node named in the error, what the error says); each also fails in protobuf
    # unless marked False in the last column (valid protobuf our columns cannot hold).
    (wire_graph(LEAF, b"\x08"), 1, "truncated varint in op", True),
    (wire_graph(LEAF, b"\x08\xff"), 1, "truncated varint in op", True),
    (wire_graph(LEAF) + b"\x0a", 1, "truncated varint in node", True),
    (wire_graph(LEAF) + b"\x0a\x05\x08", 1, "truncated node: length 5 but 1 bytes left", True),
    (wire_graph(LEAF, LEAF + b"\x0f"), 1, "invalid wire type 7", True),
    (wire_graph(LEAF + b"\x1e"), 0, "invalid wire type 6", True),
    (wire_graph(LEAF) + b"\x0f", 1, "invalid wire type 7", True),
    (wire_graph(LEAF + b"\x08" + b"\xff" * 10 + b"\x01"), 0, "malformed varint", True),
    (wire_graph(LEAF + b"\x19\x00\x00"), 0, "truncated double in value", True),
    (wire_graph(LEAF + field(5, 4)), 0, "end-group for field 5 without its start", True),
    (wire_graph(LEAF + field(5, 3) + field(6, 4)), 0, "end-group for field 6", True),
    (wire_graph(LEAF + field(5, 3)), 0, "truncated group", True),
    (wire_graph(LEAF + b"\x00"), 0, "invalid field key 0", True),
    (wire_graph(field(2, 2, varint(0) + varint(1) + varint(2) + varint(3))), 0, "more than 3 args",
     False),
    (wire_graph(field(2, 0, varint(0)) * 4), 0, "more than 3 args", False),
    (wire_graph(LEAF, field(2, 0, varint(2**31))), 1, "argument 0 is 2147483648", False),
    (wire_graph(LEAF, field(1, 0, varint(300))), 1, "unknown op 300; known ops are 1..", False),
    (wire_graph(LEAF, field(1, 0, varint(-1))), 1, "unknown op -1; known ops are 1..", False),
    (wire_graph(field(1, 2, b"\x01")), 0, "op must be a varint", False),
    (wire_graph(field(3, 0, varint(1))), 0, "value must be a double", False),
    (wire_graph(field(4, 0, varint(1))), 0, "name must be a string", False),
    (field(1, 0, varint(1)), 0, "nodes must be length-delimited", False),
    (wire_graph(LEAF + field(4, 2, b"\xff\xfe")), 0, "name is not valid UTF-8", True),
]


@pytest.mark.parametrize(("data", "node", "reason", "protobuf_rejects"), MALFORMED)
def test_malformed_bytes_raise_graph_error_naming_the_node(
    data: bytes, node: int, reason: str, protobuf_rejects: bool
) -> None:
    with pytest.raises(GraphError, match=f"^node {node}: {reason}") as caught:
        native.decode_graph(data)
    assert caught.value.node == node
    if protobuf_rejects:
        with pytest.raises(DecodeError):
            graph_pb2.Graph.FromString(data)
