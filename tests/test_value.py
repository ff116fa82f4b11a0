"""``Value``: micrograd's interface, and the semantics of ``backward()``.

Expected numbers are worked out by hand beside each test (they are small
enough) or come from a closed form; the op-by-op comparison with PyTorch is
in ``test_ops.py``.
"""

from __future__ import annotations

import gc
import math
import sys

import pytest
from micrograd.engine import Value, topological_order

from tests.graphs import deep_chain, mlp_loss, random_dag, to_values

# -- micrograd compatibility -----------------------------------------------------


def test_prev_is_the_set_of_arguments() -> None:
    a, b = Value(2.0), Value(3.0)
    assert isinstance((a * b)._prev, set)
    assert (a * b)._prev == {a, b}
    assert (a * a)._prev == {a}
    assert a.relu()._prev == {a}
    assert a._prev == set()


@pytest.mark.parametrize(
    ("build", "label"),
    [
        (lambda a, b: a + b, "+"),
        (lambda a, b: a - b, "-"),
        (lambda a, b: a * b, "*"),
        (lambda a, b: a / b, "/"),
        (lambda a, b: -a, "neg"),
        (lambda a, b: a**2, "**2"),
        (lambda a, b: a**-1, "**-1"),
        (lambda a, b: a**0.5, "**0.5"),
        (lambda a, b: a**b, "**"),
        (lambda a, b: a.relu(), "ReLU"),
        (lambda a, b: a.tanh(), "tanh"),
        (lambda a, b: a.exp(), "exp"),
        (lambda a, b: a.log(), "log"),
        (lambda a, b: a.sigmoid(), "sigmoid"),
        (lambda a, b: a, ""),
    ],
)
def test_op_labels_are_micrograds(build: object, label: str) -> None:
    assert build(Value(2.0), Value(3.0))._op == label  # type: ignore[operator]


def test_repr_shows_data_and_grad() -> None:
    v = Value(2)
    assert repr(v) == "Value(data=2.0, grad=0.0)"
    (v * 3).backward()
    assert repr(v) == "Value(data=2.0, grad=3.0)"


@pytest.mark.parametrize(
    ("build", "value", "grad"),
    [
        # f(v) at v = 3; the derivative worked out by hand.
        (lambda v: 2 + v, 5.0, 1.0),
        (lambda v: 2 - v, -1.0, -1.0),
        (lambda v: 2 * v, 6.0, 2.0),
        (lambda v: 2 / v, 2 / 3, -2 / 9),
        (lambda v: 2**v, 8.0, 8.0 * math.log(2.0)),
        (lambda v: v + 2, 5.0, 1.0),
        (lambda v: v - 2, 1.0, 1.0),
        (lambda v: v * 2, 6.0, 2.0),
        (lambda v: v / 2, 1.5, 0.5),
        (lambda v: v**2, 9.0, 6.0),
        (lambda v: 2.5 * v - v / 4 + 1, 7.75, 2.25),
    ],
)
def test_reflected_and_mixed_number_operators(build: object, value: float, grad: float) -> None:
    v = Value(3.0)
    out = build(v)  # type: ignore[operator]
    out.backward()
    assert math.isclose(out.data, value, rel_tol=1e-15)
    assert math.isclose(v.grad, grad, rel_tol=1e-15)


def test_augmented_assignment_builds_new_nodes_as_in_the_seed() -> None:
    a = Value(-4.0)
    c = a + 2.0
    first = c
    c += c + 1  # c = c + (c + 1): the name moves, the old node stays
    assert c is not first and first.data == -2.0
    assert c.data == -3.0
    c += 1 + c + (-a)  # -3 + (1 + -3 + 4)
    assert c.data == -1.0
    c.backward()
    # c = 4*(a + 2) + 2 - a, so dc/da = 3
    assert a.grad == 3.0


@pytest.mark.parametrize("other", ["x", None, [1.0], 1j])
def test_operators_reject_non_numbers(other: object) -> None:
    v = Value(2.0)
    with pytest.raises(TypeError):
        v**other  # type: ignore[operator]
    with pytest.raises(TypeError):
        v + other  # type: ignore[operator]
    with pytest.raises(TypeError):
        other * v  # type: ignore[operator]


def test_data_is_stored_as_float() -> None:
    assert type(Value(3).data) is float
    assert Value(3).grad == 0.0


# -- backward() ----------------------------------------------------------------


@pytest.mark.slow
def test_deep_chain_backward_is_iterative_under_the_default_recursion_limit() -> None:
    limit = sys.getrecursionlimit()
    depth = 1_000_000
    x, y = deep_chain(depth, start=0.5)
    y.backward()
    assert sys.getrecursionlimit() == limit
    # Closed form: y = a^n x + b (a^n - 1)/(a - 1) with a = 1.0001, b = 0.001;
    # dy/dx = a^n. Rounding over 2e6 operations stays far below 1e-9.
    a_n = 1.0001**depth
    assert math.isclose(y.data, a_n * 0.5 + 0.001 * (a_n - 1) / 0.0001, rel_tol=1e-9)
    assert math.isclose(x.grad, a_n, rel_tol=1e-9)
    del x, y  # freeing a million-deep chain must not overflow the C stack either


def test_deep_tanh_chain_backward() -> None:
    x = Value(0.3)
    y = x
    for _ in range(200_000):
        y = y.tanh()
    y.backward()
    # d/dx of the n-fold tanh is the product of (1 - t_i^2): check by forward mode.
    t, slope = 0.3, 1.0
    for _ in range(200_000):
        t = math.tanh(t)
        slope *= 1.0 - t * t
    assert y.data == t
    assert math.isclose(x.grad, slope, rel_tol=1e-12)


def test_gradients_are_bit_identical_across_runs_and_rebuilt_graphs() -> None:
    for seed in range(10):
        graph = random_dag(seed, size=60)
        first = to_values(graph.nodes)
        first[-1].backward()
        grads = [v.grad for v in first if isinstance(v, Value)]
        for v in first:
            if isinstance(v, Value):
                v.grad = 0.0
        first[-1].backward()
        assert [v.grad for v in first if isinstance(v, Value)] == grads
        again = to_values(graph.nodes)
        again[-1].backward()
        assert [v.grad for v in again if isinstance(v, Value)] == grads


def test_backward_twice_resets_interior_nodes_and_accumulates_leaves() -> None:
    x = Value(3.0)
    y = x * x  # interior
    z = y + x  # root: z = x^2 + x, dz/dx = 2x + 1 = 7
    z.backward()
    assert (z.grad, y.grad, x.grad) == (1.0, 1.0, 7.0)
    z.backward()
    # The root and y get this pass's gradient again; the leaf x adds 7 more.
    assert (z.grad, y.grad, x.grad) == (1.0, 1.0, 14.0)
    x.grad = 0.0  # zero_grad by hand, as with micrograd
    z.backward()
    assert x.grad == 7.0


def test_backward_from_a_leaf_accumulates_one() -> None:
    x = Value(2.0)
    x.backward()
    assert x.grad == 1.0
    x.backward()
    assert x.grad == 2.0


def test_backward_leaves_nodes_outside_the_graph_alone() -> None:
    x = Value(2.0)
    other = x * 5.0
    other.backward()
    (x * 3.0).backward()
    assert other.grad == 1.0
    assert x.grad == 8.0  # 5 from the first pass, 3 from the second


def test_topological_order_lists_arguments_first_and_is_stable() -> None:
    graph = random_dag(3, size=50)
    nodes = to_values(graph.nodes)
    order = topological_order(nodes[-1])
    position = {v: i for i, v in enumerate(order)}
    assert order[-1] is nodes[-1]
    for v in order:
        assert all(position[p] < position[v] for p in v._prev)
    assert topological_order(nodes[-1]) == order


def test_graphs_hold_no_reference_cycles() -> None:
    # With the collector off, memory is freed only by reference counting, which
    # cannot free a cycle: every Value must be gone the moment the graph is
    # deleted, and a collection afterwards finds nothing. (The nodes are not
    # tracked by the collector, so it cannot count them: each holds a
    # reference to one marker object instead, counted before and after.)
    marker = object()
    gc.collect()
    gc.disable()
    try:
        before = sys.getrefcount(marker)
        loss, model = mlp_loss(seed=1, points=4)
        loss.backward()
        nodes = to_values(random_dag(5).nodes)
        nodes[-1].backward()
        every = [*topological_order(loss), *topological_order(nodes[-1])]
        for v in every:
            v.grad = marker
        assert sys.getrefcount(marker) > before + 1000
        del loss, model, nodes, every, v
        assert sys.getrefcount(marker) == before
        assert gc.collect() == 0
    finally:
        gc.enable()
