"""The native walks of a ``Value`` graph against their pure-Python definitions.

``Tape.from_value``, ``codec.pack_value``, the client's write-back and
``Value.backward`` run in C when the extension is built. Each must give
exactly what the Python path gives: the same node order and columns, the same
wire bytes, and bit-identical values and gradients (NaN included).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from micrograd import codec, ops
from micrograd import engine as engine_module
from micrograd import tape as tape_module
from micrograd.client.result import apply_backward
from micrograd.engine import Value, strict, topological_order
from micrograd.errors import GraphError
from micrograd.tape import Tape

native = pytest.importorskip("micrograd.native", reason="the C extension is not built")

EDGE = (math.nan, math.inf, 0.0, -0.0, 1.0, -1.0, 2.0, 0.5, 1e-300, 710.0)
EXPONENTS = (0.0, 1.0, 2.0, 3.0, -1.0, 0.5, -0.5, 1.5)
_BUILD = {
    op.code: eval(f"lambda x, y, c: {op.expr}", {"Value": Value})
    for op in ops.OPS
    if op.arity in (1, 2)
}


def random_values(seed: int, n: int = 400, window: int = 30) -> tuple[Value, list[Value]]:
    """A seeded random ``Value`` graph over every unary and binary op, with shared nodes and
    ``x op x`` (a ``where`` node makes the walks decline: see the last test)."""
    rng = np.random.default_rng(seed)
    inner = [op for op in ops.OPS if op.arity in (1, 2)]
    nodes: list[Value] = []
    for i in range(n):
        if i < 10:
            x = EDGE[rng.integers(len(EDGE))] if rng.random() < 0.3 else float(rng.normal())
            nodes.append(Value(x))
            continue
        op = inner[(i - 10) % len(inner)] if i - 10 < len(inner) else rng.choice(inner)
        a = nodes[int(rng.integers(max(0, i - window), i))]
        b = a if rng.random() < 0.1 else nodes[int(rng.integers(max(0, i - window), i))]
        c = EXPONENTS[rng.integers(len(EXPONENTS))] if op.uses_value else 0.0
        with np.errstate(all="ignore"):
            nodes.append(_BUILD[op.code](a, b, c))
    root = nodes[-1]
    for v in nodes[-40:-1]:  # fold more of the graph into the root
        root = root + v
    return root, nodes


def python_backward(root: Value) -> None:
    """``root.backward()`` on the pure-Python path."""
    saved = engine_module._native_backward
    engine_module._native_backward = None
    try:
        root.backward()
    finally:
        engine_module._native_backward = saved


def state(order: list[Value]) -> np.ndarray:
    """Every node's (data, grad) as a float array, for bit-level comparison."""
    return np.array([(v.data, v.grad) for v in order])


def same(x: np.ndarray, y: np.ndarray) -> bool:
    """Bit-identical floats, every NaN equal to every NaN."""
    return x.shape == y.shape and bool(np.all((x == y) | (np.isnan(x) & np.isnan(y))))


@pytest.mark.parametrize("seed", range(6))
def test_tape_from_value_walked_in_c_is_the_python_one(seed: int) -> None:
    root, _ = random_values(seed)
    in_graph = topological_order(root)
    names = {"first": in_graph[0], "mid": in_graph[len(in_graph) // 2]}
    tape, order = Tape.from_value(root, names)
    saved = tape_module._native_columns
    tape_module._native_columns = None
    try:
        ref, ref_order = Tape.from_value(root, names)
    finally:
        tape_module._native_columns = saved
    assert order == ref_order == topological_order(root)
    assert all(x is y for x, y in zip(order, ref_order, strict=True))
    for column in ("code", "arg0", "arg1"):
        np.testing.assert_array_equal(getattr(tape, column), getattr(ref, column))
    assert same(tape.const, ref.const)
    assert tape.names == ref.names


@pytest.mark.parametrize("seed", range(4))
def test_pack_value_gives_the_bytes_of_packing_the_tape(seed: int) -> None:
    root, _ = random_values(seed + 10)
    in_graph = topological_order(root)
    names = {"b": in_graph[5], "a": in_graph[3]}
    message, order = codec.pack_value(root, names)
    packed, tape, ref_order = codec.encode_value(root, names)
    assert message.SerializeToString() == packed.SerializeToString()
    assert order == ref_order
    assert codec.graph_id(codec.unpack(message)) == codec.graph_id(tape)


def test_a_name_outside_the_graph_is_refused_by_both_walks() -> None:
    root, _ = random_values(1)
    with pytest.raises(GraphError, match="'stray' is not part of the graph"):
        codec.pack_value(root, {"stray": Value(1.0)})
    with pytest.raises(GraphError, match="'stray' is not part of the graph"):
        Tape.from_value(root, {"stray": Value(1.0)})


@pytest.mark.parametrize("seed", range(6))
def test_native_backward_is_bit_identical_to_the_python_one(seed: int) -> None:
    root, _ = random_values(seed + 20)
    order = topological_order(root)
    for v in order:  # leaves accumulate: start them from something
        if v.op.arity == 0:
            v.grad = 0.25
    before = state(order)
    with np.errstate(all="ignore"):
        python_backward(root)
        expected = state(order)
        for v, (x, g) in zip(order, before, strict=True):
            v.data, v.grad = float(x), float(g)
        root.backward()
    assert same(state(order), expected)
    root.backward()  # again: interior reset, leaves accumulate, as in Python
    second = state(order)
    for v, (x, g) in zip(order, expected, strict=True):
        v.data, v.grad = float(x), float(g)
    python_backward(root)
    assert same(second, state(order))


def test_native_backward_matches_on_a_deep_chain_and_a_leaf_root() -> None:
    x = Value(0.5)
    y = x
    for _ in range(100_000):
        y = (y * 0.9999 + 0.001).tanh()
    y.backward()
    native_grad = x.grad
    x.grad = 0.0
    python_backward(y)
    assert native_grad == x.grad != 0.0
    leaf = Value(3.0)
    leaf.grad = 1.5
    leaf.backward()
    assert leaf.grad == 2.5


def test_native_backward_leaves_gradients_handed_out_before_unchanged() -> None:
    # The sweep adds into fresh float objects in place: a float read from a
    # node earlier (or shared between nodes) must keep its value.
    root, _ = random_values(30)
    order = topological_order(root)
    shared = 0.125
    for v in order:
        v.grad = shared
    with np.errstate(all="ignore"):
        root.backward()
        first = [v.grad for v in order]
        kept = [float(g) for g in first]
        root.backward()
    assert shared == 0.125
    assert same(np.array(first), np.array(kept))
    assert all(v.grad is not g for v, g in zip(order, first, strict=True))


def test_native_backward_takes_int_gradients_and_declines_other_ones() -> None:
    x, y = Value(1.5), Value(-2.0)
    out = (x * y + x).tanh() * y
    expected = []
    for run in (python_backward, Value.backward):
        x.grad, y.grad = 3, 0  # ints on leaves: added to as Python would
        if run is python_backward:
            run(out)
        else:
            assert engine_module._native_backward(out, engine_module._ARITY_BYTES) is True
        expected.append((x.grad, y.grad))
    assert expected[0] == expected[1]
    assert type(x.grad) is float
    inner = x * y
    top = inner + y
    inner.grad = "stale"  # not a number: the native walk declines, Python resets it
    x.grad = y.grad = 0.0
    assert engine_module._native_backward(top, engine_module._ARITY_BYTES) is False
    assert (x.grad, inner.grad) == (0.0, "stale")
    top.backward()
    assert (x.grad, y.grad, inner.grad) == (-2.0, 2.5, 1.0)


def test_strict_mode_and_odd_nodes_take_the_python_path() -> None:
    class Tagged(Value):
        __slots__ = ()

    a = Tagged(2.0)
    b = Value(3.0)
    out = a * b + b
    out.backward()  # a subclass node: the walk declines, Python runs
    assert (a.grad, b.grad) == (3.0, 3.0)
    c = Value(1.0)
    c.data = np.float64(4.0)  # a float subclass in a slot
    d = c * c
    d.backward()
    assert c.grad == 8.0
    e = Value(0.0)
    with strict(), pytest.raises(FloatingPointError):
        e.log().backward()
    message, order = codec.pack_value(out)
    assert [v.data for v in order] == [2.0, 3.0, 6.0, 9.0]
    assert len(message.ops) == 4


def test_writing_a_result_back_matches_the_python_loop() -> None:
    root, _ = random_values(3)
    _, order = codec.pack_value(root)
    rng = np.random.default_rng(3)
    values = rng.normal(size=len(order))
    grads = rng.normal(size=len(order))
    for v in order:
        v.grad = 0.5
    apply_backward(order, values, grads)
    got = state(order)
    for v in order:
        v.grad = 0.5
    for v, x, g in zip(order, values.tolist(), grads.tolist(), strict=True):
        v.data = x
        v.grad = g if v.op.arity else v.grad + g
    assert same(got, state(order))
    assert native.assign_values(order[:3], values[:3], grads[:3])
    with pytest.raises(ValueError, match="float64"):
        native.assign_values(order, values[:5], grads)


def test_the_walks_decline_a_where_node_and_python_compiles_it() -> None:
    from micrograd import native
    from micrograd.engine import where

    a, b = Value(0.5), Value(-2.0)
    root = where(a, a * b, b.sin()) + a
    assert native.value_columns(root, []) is None
    tape, order = Tape.from_value(root)
    assert tape.arg2 is not None and int(tape.code[-2]) == ops.BY_NAME["where"].code
    values, grads = tape.evaluate()
    root.backward()
    assert values.tolist() == [v.data for v in order]
    assert grads.tolist() == [v.grad for v in order]


def test_writing_back_keeps_a_data_float_with_the_same_bits() -> None:
    root, _ = random_values(4)
    _, order = codec.pack_value(root)
    order[0].data = -0.0  # same value as 0.0, other bits: must be replaced
    order[1].data = math.nan
    order[2].data = 3  # an int: replaced by the float
    values = np.array([v.data for v in order], dtype=np.float64)
    values[0] = 0.0
    values[3] = 1.5 if values[3] != 1.5 else 2.5  # a changed value
    before = [v.data for v in order]
    apply_backward(order, values, np.zeros(len(order)))
    kept = [v.data is b for v, b in zip(order, before, strict=True)]
    assert not kept[0] and math.copysign(1.0, order[0].data) == 1.0
    assert kept[1] and math.isnan(order[1].data)  # the same NaN bits
    assert not kept[2] and isinstance(order[2].data, float) and order[2].data == 3.0
    assert not kept[3] and order[3].data == values[3]
    assert all(kept[4:])
    assert same(state(order)[:, 0], values)
