"""micrograd's own custom-op style: ``out = Value(t, (self,), 'tanh')``, ``out._backward = fn``.

Such code runs unchanged on our ``Value``: ``backward()`` calls the closures in its fixed
order. The numbers are the micrograd lecture's neuron (x1 = 2, x2 = 0, w1 = -3, w2 = 1,
b = 6.8813735870195432, o = tanh(x1*w1 + x2*w2 + b)): o = 0.7071, x1.grad = -1.5,
w1.grad = 1.0, x2.grad = 0.5, w2.grad = 0.0. A custom op has no wire code, so sending its
graph fails on the client, naming the op, before anything is sent.
"""

from __future__ import annotations

import asyncio
import math

import pytest
from micrograd.client import AsyncClient, Client
from micrograd.codec import encode_value
from micrograd.engine import Value, hvp, jacobian, topological_order
from micrograd.errors import GraphError


def lecture_tanh(self: Value) -> Value:
    """The lecture's ``tanh``, written the way the lecture writes it."""
    x = self.data
    t = (math.exp(2 * x) - 1) / (math.exp(2 * x) + 1)
    out = Value(t, (self,), "tanh")

    def _backward() -> None:
        self.grad += (1 - t**2) * out.grad

    out._backward = _backward
    return out


def lecture_mul(self: Value, other: Value) -> Value:
    """The lecture's ``__mul__`` as a custom node with two children."""
    out = Value(self.data * other.data, (self, other), "*")

    def _backward() -> None:
        self.grad += other.data * out.grad
        other.grad += self.data * out.grad

    out._backward = _backward
    return out


def lecture_neuron() -> tuple[Value, dict[str, Value]]:
    """The lecture's neuron with its custom tanh on top of table ops."""
    x1, x2, w1, w2 = Value(2.0), Value(0.0), Value(-3.0), Value(1.0)
    b = Value(6.8813735870195432)
    n = x1 * w1 + x2 * w2 + b
    return lecture_tanh(n), {"x1": x1, "x2": x2, "w1": w1, "w2": w2}


def test_the_lecture_neuron_gives_the_lecture_numbers() -> None:
    o, leaves = lecture_neuron()
    o.backward()
    assert o.data == pytest.approx(0.7071, abs=5e-5)
    assert o._op == "tanh" and len(o._prev) == 1
    grads = {name: v.grad for name, v in leaves.items()}
    assert grads == pytest.approx({"x1": -1.5, "w1": 1.0, "x2": 0.5, "w2": 0.0}, abs=1e-12)


def test_custom_nodes_agree_with_the_table_ops_they_mimic() -> None:
    a, b = Value(0.3), Value(-1.2)
    custom = lecture_tanh(lecture_mul(a, b) + a)
    custom.backward()
    by_custom = (custom.data, a.grad, b.grad)
    a2, b2 = Value(0.3), Value(-1.2)
    table = (a2 * b2 + a2).tanh()
    table.backward()
    assert by_custom == pytest.approx((table.data, a2.grad, b2.grad), rel=1e-15)


def test_backward_calls_the_closures_in_reverse_topological_order() -> None:
    calls: list[str] = []
    x = Value(1.5)

    def node(label: str, *children: Value) -> Value:
        out = Value(sum(c.data for c in children), children, label)

        def _backward() -> None:
            calls.append(label)
            for c in children:
                c.grad += out.grad

        out._backward = _backward
        return out

    p = node("p", x)
    q = node("q", x, p)
    r = node("r", q, p)
    for _ in range(3):
        calls.clear()
        r.backward()
        assert calls == ["r", "q", "p"]  # reversed(topological_order(r)), every time
    assert [v._op for v in topological_order(r)] == ["", "p", "q", "r"]
    assert x.grad == 3 * 3.0  # r = q + p = (x + p) + p = 3x, accumulated over three passes


def test_step_by_step_backward_as_in_the_lecture() -> None:
    # The lecture sets o.grad = 1 and calls each node's _backward by hand.
    o, leaves = lecture_neuron()
    o.grad = 1.0
    for v in reversed(topological_order(o)):
        v._backward()
    assert leaves["x1"].grad == pytest.approx(-1.5) and leaves["w1"].grad == pytest.approx(1.0)


def test_only_a_custom_node_takes_a_backward_closure() -> None:
    with pytest.raises(AttributeError, match="Value\\(data, children, op\\)"):
        (Value(1.0) + 2.0)._backward = lambda: None
    with pytest.raises(TypeError, match="child must be a Value"):
        Value(1.0, (2.0,), "+")  # type: ignore[arg-type]


def test_jacobian_runs_the_closures_and_hvp_names_the_custom_op() -> None:
    a, b = Value(0.4), Value(0.9)
    y = lecture_tanh(lecture_mul(a, b))
    rows = jacobian([y, a + b], [a, b])
    t = math.tanh(0.36)
    assert rows[0] == pytest.approx([(1 - t * t) * 0.9, (1 - t * t) * 0.4], rel=1e-15)
    assert rows[1] == [1.0, 1.0]
    assert (a.grad, b.grad) == (0.0, 0.0)  # jacobian leaves grads as they were
    with pytest.raises(LookupError, match="'tanh' is a custom op"):
        hvp(lecture_tanh(a * b), [a, b], [1.0, 0.0])


def test_encoding_a_custom_graph_names_the_op_that_has_no_wire_code() -> None:
    o, _ = lecture_neuron()
    with pytest.raises(GraphError, match=r"op 'tanh' is a custom op .* has no wire code"):
        encode_value(o)


def test_sending_a_custom_graph_fails_on_the_client_before_anything_is_sent() -> None:
    # Nothing listens on this port: a request that went out would fail UNAVAILABLE instead.
    o, _ = lecture_neuron()
    with Client("127.0.0.1:9", timeout=2.0, retries=0) as client:
        with pytest.raises(GraphError, match="'tanh'"):
            client.backward(o)
        with pytest.raises(GraphError, match="'tanh'"):
            client.evaluate(o)

    async def remote() -> None:
        async with AsyncClient("127.0.0.1:9", timeout=2.0, retries=0) as aclient:
            with pytest.raises(GraphError, match="'tanh'"):
                await aclient.backward(o)

    asyncio.run(remote())
