"""Several outputs and second order: Jacobians, vector-Jacobian products and Hessian-vector
products, locally (``micrograd.engine``), in every kernel, and through the service (gRPC,
asyncio, JSON-RPC), against ``torch.autograd.functional.jacobian`` and ``.hvp`` (float64)
on random DAGs over the whole op set.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from micrograd.client import AsyncClient, Client
from micrograd.engine import Value, hvp, jacobian, where
from micrograd.kernels import available_kernels, get_kernel
from micrograd.tape import Tape

from tests.graphs import _TORCH_EXPR as TORCH_EXPR
from tests.graphs import Graph, build, random_dag, to_values, torch_names

torch = pytest.importorskip("torch")

KERNELS = [*available_kernels(), "value"]
RTOL, ATOL = 1e-9, 1e-11
"""HVPs sum second-order terms along every path; the graphs keep each factor below 1e3."""


def _torch_function(graph: Graph, picks: list[int]) -> Callable[[Any], Any]:
    """The DAG as a function of its input vector, returning the nodes ``picks`` (PyTorch)."""

    def f(x: Any) -> Any:
        leaves = iter(x)
        built = build(graph.nodes, lambda c: next(leaves), torch_names(), TORCH_EXPR)
        return torch.stack([torch.as_tensor(built[i], dtype=torch.float64) for i in picks])

    return f


def _outputs(graph: Graph, built: list[Any], count: int = 4) -> list[int]:
    """The last node and a few interior ones (non-constant), as Jacobian rows."""
    inner = [i for i, v in enumerate(built) if isinstance(v, Value) and v._a is not None]
    return [inner[-1], *inner[len(inner) // 3 :: max(1, len(inner) // count)][: count - 1]]


@pytest.mark.parametrize("seed", range(4))
def test_local_jacobian_matches_pytorch_on_random_dags(seed: int) -> None:
    graph = random_dag(seed, size=50)
    built = to_values(graph.nodes)
    picks = _outputs(graph, built)
    inputs = [built[i] for i in graph.inputs]
    ours = np.array(jacobian([built[i] for i in picks], inputs))
    x0 = torch.tensor(graph.bindings[0], dtype=torch.float64)
    ref = torch.autograd.functional.jacobian(_torch_function(graph, picks), x0).numpy()
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", range(4))
def test_local_hvp_matches_pytorch_on_random_dags(seed: int) -> None:
    graph = random_dag(seed, size=50)
    built = to_values(graph.nodes)
    inputs = [built[i] for i in graph.inputs]
    v = np.random.default_rng(seed).normal(size=len(inputs))
    ours = hvp(built[-1], inputs, v.tolist())
    x0 = torch.tensor(graph.bindings[0], dtype=torch.float64)
    f = _torch_function(graph, [len(graph.nodes) - 1])
    _, ref = torch.autograd.functional.hvp(lambda x: f(x)[0], x0, torch.tensor(v))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=RTOL, atol=ATOL)


def test_hvp_by_hand_and_through_where() -> None:
    # f = x^2 y + sin(x y): H = [[2y - y^2 sin, 2x + cos - xy sin], [.., -x^2 sin]] (calculus)
    x, y = Value(1.5), Value(-2.0)
    f = x * x * y + (x * y).sin()
    s, c = np.sin(-3.0), np.cos(-3.0)
    h = np.array([[2 * -2.0 - 4.0 * s, 2 * 1.5 + c - (-3.0) * s], [0.0, -(1.5**2) * s]])
    h[1, 0] = h[0, 1]
    np.testing.assert_allclose(hvp(f, [x, y], [1.0, 0.5]), h @ [1.0, 0.5], rtol=1e-14)
    g = where(x - 2.0, f, x * x * x)  # x < 2: the else branch, d2/dx2 = 6x
    assert hvp(g, [x, y], [1.0, 1.0]) == pytest.approx([9.0, 0.0], rel=1e-15)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seed", range(3))
def test_kernels_hvp_single_and_batch_match_the_value_engine(kernel: str, seed: int) -> None:
    graph = random_dag(seed, size=50)
    tape = Tape.from_nodes(graph.nodes)
    kern = get_kernel(kernel)
    n, k = len(tape), len(graph.inputs)
    vectors = np.random.default_rng(seed).normal(size=(len(graph.bindings), k))
    expected = []
    for r in range(len(graph.bindings)):
        built = to_values(graph.bound(r))
        expected.append(hvp(built[-1], [built[i] for i in graph.inputs], vectors[r].tolist()))
        values = tape.leaf_values(graph.bindings[r])
        tangents = np.zeros(n)
        tangents[tape.inputs] = vectors[r]
        grads, gt = np.zeros(n), np.zeros(n)
        kern.hvp(tape, values, tangents, grads, gt, n - 1)
        np.testing.assert_allclose(gt[tape.inputs], expected[-1], rtol=1e-12, atol=1e-13)
    values = tape.leaf_values(graph.bindings)
    tangents = np.zeros_like(values)
    tangents[tape.inputs] = vectors.T
    grads, gt = np.zeros_like(values), np.zeros_like(values)
    kern.hvp(tape, values, tangents, grads, gt, n - 1)
    np.testing.assert_allclose(gt[tape.inputs].T, expected, rtol=1e-12, atol=1e-13)
    _, plain = tape.evaluate(graph.bindings, kernel=kern)
    np.testing.assert_allclose(grads.T, plain, rtol=1e-15, atol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_vjp_is_one_sweep_seeded_at_several_outputs(kernel: str) -> None:
    graph = random_dag(7, size=50)
    tape = Tape.from_nodes(graph.nodes)
    kern = get_kernel(kernel)
    built = to_values(graph.bound(0))
    picks = _outputs(graph, built)
    weights = [0.5, -2.0, 1.25, 3.0][: len(picks)]
    rows = np.array(jacobian([built[i] for i in picks], [built[i] for i in graph.inputs]))
    values = tape.forward(graph.bindings[0], kernel=kern)
    seeds = np.zeros(len(tape))
    np.add.at(seeds, picks, weights)
    kern.vjp(tape, values, seeds, max(picks))
    np.testing.assert_allclose(seeds[tape.inputs], np.array(weights) @ rows, rtol=1e-12)


# -- through the service ---------------------------------------------------------------


def _rpc(url: str, method: str, params: Any) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    assert "result" in answer, answer
    return answer["result"]


@pytest.fixture(scope="module")
def server() -> Any:
    from tests.conftest import start_in_process

    running = start_in_process()
    yield running
    running.stop()


@pytest.mark.parametrize("seed", range(3))
def test_client_jacobian_and_vjp_equal_pytorch_through_grpc(server: Any, seed: int) -> None:
    graph = random_dag(seed, size=50)
    built = to_values(graph.nodes)
    picks = _outputs(graph, built)
    outputs, inputs = [built[i] for i in picks], [built[i] for i in graph.inputs]
    x0 = torch.tensor(graph.bindings[0], dtype=torch.float64)
    ref = torch.autograd.functional.jacobian(_torch_function(graph, picks), x0).numpy()
    weights = np.linspace(-1.0, 2.0, len(picks))
    with Client(server.target) as client:
        rows = client.jacobian(outputs, inputs)
        row = client.jacobian(outputs, inputs, cotangents=weights.tolist())
    np.testing.assert_allclose(rows, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(row, weights @ ref, rtol=RTOL, atol=ATOL)
    assert rows == jacobian(outputs, inputs)  # the same sweeps as the local engine


@pytest.mark.parametrize("seed", range(3))
def test_client_hvp_single_and_batch_equal_pytorch(server: Any, seed: int) -> None:
    graph = random_dag(seed, size=50)
    built = to_values(graph.nodes)
    inputs = [built[i] for i in graph.inputs]
    v = np.random.default_rng(seed).normal(size=len(inputs))
    f = _torch_function(graph, [len(graph.nodes) - 1])
    refs = [
        torch.autograd.functional.hvp(
            lambda x: f(x)[0], torch.tensor(b, dtype=torch.float64), torch.tensor(v)
        )[1].numpy()
        for b in graph.bindings
    ]
    with Client(server.target) as client:
        one = client.hvp(built[-1], inputs, v)
        many = client.hvp(built[-1], inputs, v, batch=graph.bindings)

    async def remote() -> Any:
        async with AsyncClient(server.target) as aclient:
            return await aclient.hvp(built[-1], inputs, v)

    np.testing.assert_allclose(one, refs[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(many, refs, rtol=RTOL, atol=ATOL)
    assert asyncio.run(remote()) == one


def test_async_client_jacobian_equals_the_sync_one(server: Any) -> None:
    a, b = Value(0.3), Value(-1.1)
    outs = [a * b, (a - b).atan2(b), where(a, a.exp(), b)]

    async def remote() -> Any:
        async with AsyncClient(server.target) as aclient:
            return await aclient.jacobian(outs, [a, b])

    with Client(server.target) as client:
        assert asyncio.run(remote()) == client.jacobian(outs, [a, b]) == jacobian(outs, [a, b])


def test_jsonrpc_jacobian_and_hvp_equal_pytorch(server: Any) -> None:
    # f(x, y) = (x y, sin x + y^2) at (0.7, -1.3), written as a Graph in the proto3 JSON form.
    nodes = [
        {"op": "OP_INPUT", "value": 0.7, "name": "x"},
        {"op": "OP_INPUT", "value": -1.3, "name": "y"},
        {"op": "OP_MUL", "args": [0, 1]},
        {"op": "OP_SIN", "args": [0]},
        {"op": "OP_MUL", "args": [1, 1]},
        {"op": "OP_ADD", "args": [3, 4]},
    ]
    url = server.http_url + "/rpc"
    got = _rpc(url, "Jacobian", {"request": {"graph": {"nodes": nodes}}, "outputs": [2, 5]})
    x = torch.tensor([0.7, -1.3], dtype=torch.float64)

    def f(t: Any) -> Any:
        return torch.stack([t[0] * t[1], t[0].sin() + t[1] * t[1]])

    ref = torch.autograd.functional.jacobian(f, x).numpy()
    assert got["nodes"] == [0, 1] and got["outputs"] == [2, 5]
    np.testing.assert_allclose(np.array(got["jacobian"]).reshape(2, 2), ref, rtol=1e-15)
    got = _rpc(url, "HessianVectorProduct",
               {"request": {"graph": {"nodes": nodes}}, "vector": [1.0, 2.0]})  # fmt: skip
    _, ref_hv = torch.autograd.functional.hvp(lambda t: f(t)[1], x, torch.tensor([1.0, 2.0]))
    np.testing.assert_allclose(got["hvp"], ref_hv.numpy(), rtol=1e-15)
    weighted = _rpc(url, "Jacobian", {"request": {"graph": {"nodes": nodes}}, "outputs": [2, 5],
                                      "cotangents": [2.0, -1.0]})  # fmt: skip
    np.testing.assert_allclose(weighted["jacobian"], [2.0, -1.0] @ ref, rtol=1e-15)
    assert weighted["weighted"] is True


def test_bad_jacobian_and_hvp_requests_name_the_field(server: Any) -> None:
    from micrograd.client import RemoteError

    a = Value(1.0)
    with Client(server.target, retries=0) as client:
        with pytest.raises(RemoteError, match="cotangents"):
            client.jacobian([a * 2.0, a + 1.0], [a], cotangents=[1.0])
        with pytest.raises(ValueError, match="not a leaf"):
            client.hvp(a * 2.0, [a * 3.0], [1.0])
