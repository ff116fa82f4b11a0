"""The tape: construction and validation, evaluation semantics, and property tests.

Random DAGs (``tests.graphs.random_dag``, which uses every op of the table)
are evaluated by ``Value``, by every tape kernel available here (single and
batch) and by PyTorch float64 autograd, and must agree.

Tolerances: values agree to 1e-12 relative (observed: a few 1e-14, from
one-ulp differences between libm, numpy and PyTorch transcendental
functions, grown by at most 100x per node; ``random_dag`` keeps every node
that well conditioned). A gradient is a sum over paths and its terms can
cancel, so its relative error is unbounded; gradients must agree within
1e-12 of their own size plus 1e-12 of the graph's largest gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from micrograd import ops
from micrograd.engine import Value
from micrograd.errors import GraphError
from micrograd.kernels import PythonKernel, available_kernels, get_kernel
from micrograd.tape import Tape

from tests.graphs import deep_chain, mlp_loss, random_dag, to_torch, to_values

KERNELS = available_kernels()
RTOL = 1e-12


def _values_agree(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> None:
    """Values equal to ``RTOL`` relative."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    np.testing.assert_allclose(x, y, rtol=RTOL, atol=0)


def _grads_agree(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> None:
    """Gradients equal to ``RTOL`` of their size plus ``RTOL`` of the largest gradient."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    scale = max(1.0, float(np.abs(x).max(initial=0.0)), float(np.abs(y).max(initial=0.0)))
    np.testing.assert_allclose(x, y, rtol=RTOL, atol=RTOL * scale)


# -- validation --------------------------------------------------------------------

INPUT, ADD, NEG = (ops.BY_NAME[n].code for n in ("input", "add", "neg"))

BAD_ARRAYS: list[tuple[str, Callable[[], Tape], int | None, str]] = [
    ("unknown code 0", lambda: Tape.from_arrays([INPUT, 0], [-1, 0], [-1, -1], [1, 0]), 1,
     r"node 1: unknown op 0 \(OP_UNSPECIFIED, the unset value\); known ops are 1\.\."),
    ("unknown code past the table", lambda: Tape.from_arrays(
        [INPUT, ops.MAX_CODE + 1], [-1, 0], [-1, -1], [1, 0]), 1,
     r"unknown op \d+; known ops are 1\.\."),
    ("float op codes", lambda: Tape.from_arrays([1.0], [-1], [-1], [0.0]), None,
     r"op codes must be integers"),
    ("missing argument", lambda: Tape.from_arrays([INPUT, ADD], [-1, 0], [-1, -1], [1, 0]), 1,
     r"node 1: add takes 2 argument\(s\); argument 1 is missing"),
    ("surplus argument", lambda: Tape.from_arrays([INPUT, NEG], [-1, 0], [-1, 0], [1, 0]), 1,
     r"node 1: neg takes 1 argument\(s\); argument 1 must be absent"),
    ("argument on a leaf", lambda: Tape.from_arrays([INPUT, INPUT], [-1, 0], [-1, -1], [1, 0]), 1,
     r"input takes 0 argument\(s\); argument 0 must be absent"),
    ("forward reference", lambda: Tape.from_arrays(
        [INPUT, NEG, NEG], [-1, 2, 0], [-1, -1, -1], [1, 0, 0]), 1,
     r"node 1: argument 0 refers to node 2, which does not come before node 1"),
    ("self reference", lambda: Tape.from_arrays([INPUT, ADD], [-1, 0], [-1, 1], [1, 0]), 1,
     r"argument 1 refers to node 1, which does not come before node 1"),
    ("reference past the end", lambda: Tape.from_arrays(
        [INPUT, NEG], np.array([-1, 2**32], dtype=np.int64), [-1, -1], [1, 0]), 1,
     r"refers to node 4294967296"),
    ("empty graph", lambda: Tape.from_arrays([], [], [], []), None, r"the graph has no nodes"),
    ("mismatched columns", lambda: Tape.from_arrays([INPUT, NEG], [-1, 0], [-1], [1, 0]), None,
     r"must be 1-D and of the same length"),
    ("value on an op that ignores it", lambda: Tape.from_arrays(
        [INPUT, NEG], [-1, 0], [-1, -1], [1, 5]), 1, r"neg does not use a value"),
    ("name past the end", lambda: Tape.from_arrays([INPUT], [-1], [-1], [1], {"x": 3}), None,
     r"name 'x' refers to node 3, but the graph has 1 nodes"),
    ("unknown op name", lambda: Tape.from_nodes([("input", (), 1.0), ("cotanh", (0,), 0.0)]), 1,
     r"node 1: unknown op 'cotanh'; known: input, const, add"),
    ("unknown op code in nodes", lambda: Tape.from_nodes([(99, (), 1.0)]), 0, r"unknown op 99"),
    ("wrong arity in nodes", lambda: Tape.from_nodes([("input", (), 1.0), ("add", (0,), 0.0)]), 1,
     r"node 1: add takes 2 argument\(s\), got 1"),
    ("forward reference in nodes", lambda: Tape.from_nodes(
        [("input", (), 1.0), ("neg", (1,), 0.0)]), 1, r"refers to node 1"),
    ("empty node list", lambda: Tape.from_nodes([]), None, r"no nodes"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "node", "message"), [c[1:] for c in BAD_ARRAYS],
                         ids=[c[0] for c in BAD_ARRAYS])  # fmt: skip
def test_invalid_graph_raises_graph_error_naming_the_node(
    build: Callable[[], Tape], node: int | None, message: str
) -> None:
    with pytest.raises(GraphError, match=message) as caught:
        build()
    assert caught.value.node == node
    assert isinstance(caught.value, ValueError)


def _xy_tape() -> Tape:
    """``x * y + x`` with inputs x = 2, y = 3 (the defaults)."""
    x, y = ("input", (), 2.0, "x"), ("input", (), 3.0, "y")
    return Tape.from_nodes([x, y, ("mul", (0, 1), 0.0), ("add", (2, 0), 0.0)])


@pytest.mark.parametrize("output", [4, -5, 100])
def test_output_out_of_range_is_a_graph_error(output: int) -> None:
    with pytest.raises(GraphError, match=rf"output {output} is out of range for 4 nodes") as caught:
        _xy_tape().evaluate(output=output)
    assert caught.value.node is None
    assert caught.value.field == "output"


@pytest.mark.parametrize(
    ("bindings", "message"),
    [
        ([1.0], r"expected 2 input value\(s\), got 1"),
        ([1.0, 2.0, 3.0], r"expected 2 input value\(s\), got 3"),
        (np.ones((3, 1)), r"a batch must have shape \(B, 2\), got \(3, 1\)"),
        (np.ones((2, 2, 2)), r"a batch must have shape \(B, 2\)"),
    ],
)
def test_wrong_bindings_shape_is_a_graph_error(bindings: Any, message: str) -> None:
    with pytest.raises(GraphError, match=message) as caught:
        _xy_tape().evaluate(bindings)
    assert caught.value.field == "inputs"


def test_names_may_label_any_node_and_are_kept() -> None:
    tape = Tape.from_nodes([("input", (), 1.0, "x"), ("neg", (0,), 0.0, "minus_x")])
    assert dict(tape.names) == {"x": 0, "minus_x": 1}


# -- evaluation semantics --------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_evaluate_defaults_bindings_and_batches(kernel: str) -> None:
    tape, kern = _xy_tape(), get_kernel(kernel)
    # f = x*y + x: df/dx = y + 1, df/dy = x.
    values, grads = tape.evaluate(kernel=kern)
    assert values.tolist() == [2.0, 3.0, 6.0, 8.0]
    assert grads.tolist() == [4.0, 2.0, 1.0, 1.0]
    values, grads = tape.evaluate([5.0, -1.0], kernel=kern)
    assert values.tolist() == [5.0, -1.0, -5.0, 0.0]
    assert grads.tolist() == [0.0, 5.0, 1.0, 1.0]
    values, grads = tape.evaluate(np.array([[2.0, 3.0], [5.0, -1.0], [0.5, 4.0]]), kernel=kern)
    assert values[:, -1].tolist() == [8.0, 0.0, 2.5]
    assert grads[:, 0].tolist() == [4.0, 0.0, 5.0]
    assert grads[:, 1].tolist() == [2.0, 5.0, 0.5]


@pytest.mark.parametrize("kernel", KERNELS)
def test_forward_then_backward_equals_evaluate(kernel: str) -> None:
    graph = random_dag(11)
    tape, kern = Tape.from_nodes(graph.nodes), get_kernel(kernel)
    for bindings in (graph.bindings[0], graph.bindings):
        values = tape.forward(bindings, kernel=kern)
        grads = tape.backward(values, kernel=kern)
        expected_values, expected_grads = tape.evaluate(bindings, kernel=kern)
        assert np.array_equal(values, expected_values)
        assert np.array_equal(grads, expected_grads)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradient_of_an_inner_output_touches_only_what_it_depends_on(kernel: str) -> None:
    tape = Tape.from_nodes(
        [
            ("input", (), 0.0, "x"),
            ("log", (0,), 0.0),  # d/dx = 1/0 = inf, but the output does not read it
            ("input", (), 3.0, "y"),
            ("mul", (2, 2), 0.0),  # y*y: the output
            ("add", (1, 3), 0.0),
        ]
    )
    values, grads = tape.evaluate(output=3, kernel=get_kernel(kernel))
    assert values[3] == 9.0
    assert grads.tolist() == [0.0, 0.0, 6.0, 1.0, 0.0]


def test_from_value_records_nodes_in_order_and_names_inputs() -> None:
    x, y = Value(2.0), Value(-3.0)
    f = (x * y + 1.5).tanh()
    tape, order = Tape.from_value(f, {"x": x, "y": y})
    assert order[-1] is f and len(tape) == len(order) == 6
    assert dict(tape.names) == {"x": order.index(x), "y": order.index(y)}
    assert tape.code.dtype == np.uint8 and tape.arg0.dtype == np.int32
    assert tape.const.dtype == np.float64
    with pytest.raises(GraphError, match="input 'z' is not part of the graph"):
        Tape.from_value(f, {"z": Value(1.0)})


def test_kernel_registry() -> None:
    assert "python" in KERNELS
    assert isinstance(get_kernel("python"), PythonKernel)
    assert get_kernel().name == KERNELS[0]
    with pytest.raises(ValueError, match="unknown kernel 'nope'; available here: "):
        get_kernel("nope")


@pytest.mark.parametrize("kernel", KERNELS)
def test_deep_chain_through_the_tape(kernel: str) -> None:
    x, y = deep_chain(200_000)
    y.backward()
    tape, order = Tape.from_value(y)
    values, grads = tape.evaluate(kernel=get_kernel(kernel))
    assert values[-1] == pytest.approx(y.data, rel=RTOL)
    assert grads[order.index(x)] == pytest.approx(x.grad, rel=RTOL)


@pytest.mark.parametrize("kernel", KERNELS)
def test_mlp_loss_through_the_tape_matches_value(kernel: str) -> None:
    loss, model = mlp_loss(seed=2, points=6)
    loss.backward()
    tape, order = Tape.from_value(loss)
    values, grads = tape.evaluate(kernel=get_kernel(kernel))
    _values_agree(values, [v.data for v in order])
    _grads_agree(grads, [v.grad for v in order])
    index = {v: i for i, v in enumerate(order)}
    params = model.parameters()
    _grads_agree([grads[index[p]] for p in params], [p.grad for p in params])


# -- properties: Value, every kernel and PyTorch agree on random DAGs ------------


def _torch_values_and_grads(
    nodes: Sequence[Any], keep: list[int]
) -> tuple[list[float], list[float]]:
    """PyTorch float64 values and gradients of the nodes ``keep``."""
    built = to_torch(nodes)
    built[-1].backward()
    values = [built[i].item() for i in keep]
    grads = [0.0 if built[i].grad is None else built[i].grad.item() for i in keep]
    return values, grads


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(len(ops.OPS) + 3, 80))
def test_random_dags_agree_across_value_kernels_and_pytorch(seed: int, size: int) -> None:
    pytest.importorskip("torch")
    graph = random_dag(seed, size=size)
    assert {name for name, _, _ in graph.nodes} == set(ops.BY_NAME)
    tape = Tape.from_nodes(graph.nodes)
    batches = {k: tape.evaluate(graph.bindings, kernel=get_kernel(k)) for k in KERNELS}
    for r in range(len(graph.bindings)):
        nodes = graph.bound(r)
        built = to_values(nodes)
        keep = [i for i, v in enumerate(built) if isinstance(v, Value)]  # constants stay floats
        built[-1].backward()
        value_values = [built[i].data for i in keep]
        value_grads = [built[i].grad for i in keep]

        torch_values, torch_grads = _torch_values_and_grads(nodes, keep)
        _values_agree(value_values, torch_values)
        _grads_agree(value_grads, torch_grads)

        compiled, order = Tape.from_value(built[-1])
        values, grads = compiled.evaluate()
        _values_agree(values, [v.data for v in order])
        _grads_agree(grads, [v.grad for v in order])

        for kernel, (batch_values, batch_grads) in batches.items():
            values, grads = tape.evaluate(graph.bindings[r], kernel=get_kernel(kernel))
            _values_agree(values[keep], value_values)
            _grads_agree(grads[keep], value_grads)
            _values_agree(batch_values[r], values)
            _grads_agree(batch_grads[r], grads)
