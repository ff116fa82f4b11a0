"""A tiny neural-network library on ``Value``, with micrograd's signatures.

``Neuron``, ``Layer`` and ``MLP`` build their outputs from ``Value``
operations, so a loss over them is one expression graph that ``backward()``
(or the tape, or the server) differentiates. Beyond micrograd: weights can
come from a seeded ``random.Random`` for reproducible runs, and ``SGD``
performs the update step.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from .engine import Value

__all__ = ["MLP", "SGD", "Layer", "Module", "Neuron"]

Input = Sequence["Value | float"]


class Module:
    """Anything with parameters: gives them out and clears their gradients."""

    def zero_grad(self) -> None:
        """Set the gradient of every parameter to zero."""
        for p in self.parameters():
            p.grad = 0.0

    def parameters(self) -> list[Value]:
        """The trainable leaves of this module, in a fixed order."""
        return []


class Neuron(Module):
    """``relu(w . x + b)`` (or linear with ``nonlin=False``), weights uniform in [-1, 1]."""

    def __init__(self, nin: int, nonlin: bool = True, rng: random.Random | None = None) -> None:
        """``nin`` inputs; ``rng`` draws the weights (the ``random`` module when ``None``)."""
        if nin < 1:
            raise ValueError(f"a Neuron needs at least one input, got nin={nin}")
        draw = (rng or random).uniform
        self.w = [Value(draw(-1, 1)) for _ in range(nin)]
        self.b = Value(0)
        self.nonlin = nonlin

    def __call__(self, x: Input) -> Value:
        """The neuron's activation for input ``x`` (a sequence of ``nin`` numbers or Values)."""
        if len(x) != len(self.w):
            raise ValueError(f"Neuron({len(self.w)}) got {len(x)} inputs")
        act: Value = self.b
        for wi, xi in zip(self.w, x):
            act = act + wi * xi
        return act.relu() if self.nonlin else act

    def parameters(self) -> list[Value]:
        """Weights then bias."""
        return [*self.w, self.b]

    def __repr__(self) -> str:
        return f"{'ReLU' if self.nonlin else 'Linear'}Neuron({len(self.w)})"


class Layer(Module):
    """``nout`` neurons reading the same ``nin`` inputs."""

    def __init__(
        self, nin: int, nout: int, nonlin: bool = True, rng: random.Random | None = None
    ) -> None:
        """A layer of ``nout`` ``Neuron(nin, nonlin, rng)``."""
        self.neurons = [Neuron(nin, nonlin=nonlin, rng=rng) for _ in range(nout)]

    def __call__(self, x: Input) -> Value | list[Value]:
        """Every neuron's output; a single ``Value`` when the layer has one neuron."""
        out = [n(x) for n in self.neurons]
        return out[0] if len(out) == 1 else out

    def parameters(self) -> list[Value]:
        """All neurons' parameters, neuron by neuron."""
        return [p for n in self.neurons for p in n.parameters()]

    def __repr__(self) -> str:
        return f"Layer of [{', '.join(str(n) for n in self.neurons)}]"


class MLP(Module):
    """A multi-layer perceptron: ReLU hidden layers and a linear last layer."""

    def __init__(self, nin: int, nouts: list[int], rng: random.Random | None = None) -> None:
        """``nin`` inputs, then one layer per entry of ``nouts``."""
        sizes = [nin, *nouts]
        self.layers = [
            Layer(sizes[i], sizes[i + 1], nonlin=i != len(nouts) - 1, rng=rng)
            for i in range(len(nouts))
        ]

    def __call__(self, x: Input) -> Value | list[Value]:
        """The network's output for input ``x``."""
        out: Value | Input = x
        for layer in self.layers:
            out = layer(out if isinstance(out, Sequence) else [out])
        return out  # type: ignore[return-value]

    def parameters(self) -> list[Value]:
        """All layers' parameters, layer by layer."""
        return [p for layer in self.layers for p in layer.parameters()]

    def __repr__(self) -> str:
        return f"MLP of [{', '.join(str(layer) for layer in self.layers)}]"


class SGD:
    """Plain stochastic gradient descent: ``p.data -= lr * p.grad``."""

    def __init__(self, params: Iterable[Value], lr: float = 0.01) -> None:
        """Optimise ``params`` with learning rate ``lr`` (change ``self.lr`` to schedule it)."""
        self.params = list(params)
        self.lr = lr

    def step(self) -> None:
        """Move every parameter against its gradient."""
        lr = self.lr
        for p in self.params:
            p.data -= lr * p.grad

    def zero_grad(self) -> None:
        """Clear the gradients of the optimised parameters."""
        for p in self.params:
            p.grad = 0.0
