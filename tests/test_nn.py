"""``micrograd.nn``: shapes, reproducible weights, gradients and the SGD step."""

from __future__ import annotations

import math
import random

import pytest
from micrograd.engine import Value
from micrograd.nn import MLP, SGD, Layer, Module, Neuron


def test_parameter_counts() -> None:
    # (2*16 + 16) + (16*16 + 16) + (16*1 + 1) = 48 + 272 + 17, micrograd's demo network.
    assert len(MLP(2, [16, 16, 1]).parameters()) == 337
    assert len(Neuron(3).parameters()) == 4
    assert len(Layer(3, 4).parameters()) == 16
    assert Module().parameters() == []


def test_seeded_rng_gives_reproducible_weights() -> None:
    first = [p.data for p in MLP(2, [16, 16, 1], rng=random.Random(7)).parameters()]
    again = [p.data for p in MLP(2, [16, 16, 1], rng=random.Random(7)).parameters()]
    other = [p.data for p in MLP(2, [16, 16, 1], rng=random.Random(8)).parameters()]
    assert first == again
    assert first != other
    neuron = Neuron(3, rng=random.Random(0))
    assert all(-1.0 <= w.data <= 1.0 for w in neuron.w)
    assert neuron.b.data == 0.0


def test_neuron_computes_relu_of_affine_and_its_gradient() -> None:
    neuron = Neuron(2)
    neuron.w[0].data, neuron.w[1].data, neuron.b.data = 0.5, -1.0, 0.25
    out = neuron([2.0, 1.0])  # 0.25 + 0.5*2 - 1*1 = 0.25
    assert out.data == 0.25 and out._op == "ReLU"
    out.backward()
    assert [w.grad for w in neuron.w] == [2.0, 1.0]
    assert neuron.b.grad == 1.0
    assert neuron([-2.0, 1.0]).data == 0.0  # 0.25 - 1 - 1 < 0
    linear = Neuron(2, nonlin=False)
    linear.w[0].data, linear.w[1].data = 0.5, -1.0
    assert linear([-2.0, 1.0]).data == -2.0


def test_neuron_rejects_the_wrong_number_of_inputs() -> None:
    with pytest.raises(ValueError, match=r"Neuron\(3\) got 2 inputs"):
        Neuron(3)([1.0, 2.0])
    with pytest.raises(ValueError, match="at least one input"):
        Neuron(0)


def test_layer_and_mlp_outputs() -> None:
    layer = Layer(3, 2, rng=random.Random(1))
    out = layer([1.0, 2.0, 3.0])
    assert isinstance(out, list) and len(out) == 2
    assert isinstance(Layer(3, 1)([1.0, 2.0, 3.0]), Value)
    mlp = MLP(3, [4, 2], rng=random.Random(1))
    assert isinstance(mlp([1.0, 2.0, 3.0]), list)
    assert [n.nonlin for layer in mlp.layers for n in layer.neurons] == [True] * 4 + [False] * 2


def test_reprs() -> None:
    assert repr(Neuron(2)) == "ReLUNeuron(2)"
    assert repr(Neuron(2, nonlin=False)) == "LinearNeuron(2)"
    assert repr(Layer(2, 2)) == "Layer of [ReLUNeuron(2), ReLUNeuron(2)]"
    assert repr(MLP(2, [2, 1])) == (
        "MLP of [Layer of [ReLUNeuron(2), ReLUNeuron(2)], Layer of [LinearNeuron(2)]]"
    )


def test_zero_grad_clears_every_parameter() -> None:
    mlp = MLP(2, [4, 1], rng=random.Random(3))
    out = mlp([0.5, -1.5])
    assert isinstance(out, Value)
    (out * out).backward()
    assert any(p.grad != 0.0 for p in mlp.parameters())
    mlp.zero_grad()
    assert all(p.grad == 0.0 for p in mlp.parameters())
    (out * out).backward()
    sgd = SGD(mlp.parameters())
    sgd.zero_grad()
    assert all(p.grad == 0.0 for p in mlp.parameters())


def test_sgd_step_moves_against_the_gradient() -> None:
    a, b = Value(1.0), Value(-2.0)
    a.grad, b.grad = 0.5, -4.0
    sgd = SGD([a, b], lr=0.1)
    sgd.step()
    assert (a.data, b.data) == (1.0 - 0.1 * 0.5, -2.0 + 0.1 * 4.0)
    sgd.lr = 1.0
    sgd.step()
    assert math.isclose(a.data, 0.45, rel_tol=1e-15) and math.isclose(b.data, 2.4, rel_tol=1e-15)
    assert SGD([a]).lr == 0.01


def test_mlp_gradients_match_pytorch_float64() -> None:
    torch = pytest.importorskip("torch")
    mlp = MLP(3, [4, 4, 1], rng=random.Random(5))
    x = [0.3, -1.2, 2.0]
    out = mlp(x)
    assert isinstance(out, Value)
    loss = (1 - 1.0 * out).relu() + 0.5 * out * out
    loss.backward()

    params = [
        torch.tensor(p.data, dtype=torch.float64, requires_grad=True) for p in mlp.parameters()
    ]
    act = [torch.tensor(v, dtype=torch.float64) for v in x]
    it = iter(params)
    for layer in mlp.layers:
        nxt = []
        for neuron in layer.neurons:
            weights = [next(it) for _ in neuron.w]
            s = next(it) + sum(w * a for w, a in zip(weights, act))
            nxt.append(torch.relu(s) if neuron.nonlin else s)
        act = nxt
    ref = torch.relu(1 - act[0]) + 0.5 * act[0] * act[0]
    ref.backward()
    assert math.isclose(loss.data, ref.item(), rel_tol=1e-12)
    for p, t in zip(mlp.parameters(), params):
        assert math.isclose(p.grad, t.grad.item(), rel_tol=1e-12, abs_tol=1e-15)
