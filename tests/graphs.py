"""Expression graphs shared by the tests and the benches.

A graph is a node list in the form ``Tape.from_nodes`` reads: ``(op name,
argument indices, value)`` in topological order. ``build`` turns such a list
into live objects by evaluating each op's ``expr`` from the op table, so the
same list becomes a ``Value`` graph, a PyTorch graph or anything else that
spells the operators the same way, and no list of ops is written down here.

* ``random_dag``: a seeded random DAG that uses every op of the table, with
  input bindings chosen so that all values and local derivatives stay finite.
* ``mlp_loss``: the max-margin loss of an ``MLP`` on a seeded batch of points.
* ``deep_chain``: ``y = y * 1.0001 + 0.001`` repeated, for depth tests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from micrograd import ops
from micrograd.engine import Value, where
from micrograd.nn import MLP
from micrograd.seed import seed_expression, seed_graph
from micrograd.tape import Tape

__all__ = [
    "TORCH_SPELLING",
    "Graph",
    "Node",
    "build",
    "deep_chain",
    "mlp_loss",
    "random_dag",
    "seed_expression",
    "seed_graph",
    "to_torch",
    "to_values",
]

Node = tuple[str, tuple[int, ...], float]
"""``(op name, argument indices, value)``: one entry of a ``Tape.from_nodes`` list."""

TORCH_SPELLING = {
    "softplus": "torch.nn.functional.softplus(x)",
    "where": "torch.where(tensor(x) > 0, y, z)",
    "atan2": "torch.atan2(x, tensor(y))",
    "maximum": "torch.maximum(x, tensor(y))",
    "minimum": "torch.minimum(x, tensor(y))",
}
"""How PyTorch spells the ops whose ``Value`` spelling is not a tensor method with tensors
(``tensor`` makes a float64 tensor of a constant and passes a tensor through)."""

_EXPR = {op.name: compile(op.expr, f"<op {op.name}>", "eval") for op in ops.OPS}
_TORCH_EXPR = {
    **_EXPR,
    **{name: compile(e, f"<torch {name}>", "eval") for name, e in TORCH_SPELLING.items()},
}
_INNER = [op for op in ops.OPS if op.arity > 0]
_EXPONENTS = (2.0, 3.0, -1.0, 0.5, -0.5, 1.5, 0.0, -2.0, 1.0)
_LIMIT = 1e3
"""Largest magnitude a random DAG lets a value or local derivative reach."""
_CONDITION = 100.0
"""Largest relative condition number ``|x f'(x) / f(x)|`` a random DAG lets a node have."""


@dataclass(frozen=True)
class Graph:
    """A node list plus input bindings: ``bindings[r]`` gives every input node a value."""

    nodes: list[Node]
    bindings: np.ndarray
    """Shape ``(B, k)``: one row per binding, one column per input node in order."""

    @property
    def inputs(self) -> list[int]:
        """Indices of the input nodes, in the order of the binding columns."""
        return [i for i, node in enumerate(self.nodes) if node[0] == "input"]

    def tape(self) -> Tape:
        """The node list as a ``Tape`` (the inputs keep the values written in the nodes)."""
        return Tape.from_arrays(
            [ops.BY_NAME[name].code for name, _, _ in self.nodes],
            [args[0] if args else -1 for _, args, _ in self.nodes],
            [args[1] if len(args) > 1 else -1 for _, args, _ in self.nodes],
            [value for _, _, value in self.nodes],
            arg2=[args[2] if len(args) > 2 else -1 for _, args, _ in self.nodes],
        )

    def bound(self, row: int) -> list[Node]:
        """The node list with the inputs' values replaced by binding ``row``."""
        nodes = list(self.nodes)
        for column, i in enumerate(self.inputs):
            name, args, _ = nodes[i]
            nodes[i] = (name, args, float(self.bindings[row, column]))
        return nodes


def build(
    nodes: Sequence[Node],
    leaf: Callable[[float], Any],
    names: dict[str, Any] | None = None,
    exprs: dict[str, Any] | None = None,
) -> list[Any]:
    """Evaluate each node's ``expr`` in order; ``leaf`` makes an input (``Value`` in the exprs).

    Constant nodes stay plain floats, so they must be used as an operand of a
    binary operator beside a non-constant one, and never as the first
    argument of a method (``random_dag`` makes sure). ``names`` adds to what
    the expressions see (``where``), ``exprs`` replaces spellings by op name.
    """
    built: list[Any] = []
    code = exprs or _EXPR
    extra = {"where": where, **(names or {})}
    for name, args, value in nodes:
        env = {"Value": leaf, "c": value, "x": None, "y": None, "z": None, **extra}
        for slot, a in zip("xyz", args):
            env[slot] = built[a]
        built.append(eval(code[name], {"__builtins__": {}}, env))
    return built


def to_values(nodes: Sequence[Node]) -> list[Any]:
    """The node list as a ``Value`` graph: a ``Value`` per node, but constants stay floats."""
    return build(nodes, Value)


def torch_names() -> dict[str, Any]:
    """What the PyTorch spellings read: ``torch`` and ``tensor``."""
    import torch

    def tensor(v: Any) -> Any:
        return v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64)

    return {"torch": torch, "tensor": tensor}


def to_torch(nodes: Sequence[Node]) -> list[Any]:
    """The node list as a PyTorch float64 graph whose every tensor keeps its ``grad``."""
    import torch

    def leaf(c: float) -> Any:
        return torch.tensor(c, dtype=torch.float64, requires_grad=True)

    built = build(nodes, leaf, torch_names(), _TORCH_EXPR)
    for t in built:
        if isinstance(t, torch.Tensor) and not t.is_leaf:
            t.retain_grad()
    return built


def _safe(op: ops.Op, rows: Sequence[tuple[float, float, float]], c: float) -> list[float] | None:
    """The op's outputs on every row if they and its derivatives are finite, bounded and smooth.

    Second derivatives are held to the same bound, so Hessian-vector
    products of a random DAG are as well behaved as its gradients.
    """
    out: list[float] = []
    ternary = op.arity == 3
    for x, y, z in rows:
        last = z if ternary else c
        value = op.forward(x, y, last)
        if not (math.isfinite(value) and abs(value) <= _LIMIT):
            return None
        base = op.partials(x, y, last, value)
        # Well conditioned: a relative error in an argument grows at most 100-fold.
        if not (sum(abs(a * d) for a, d in zip((x, y, z), base)) <= _CONDITION * abs(value)):
            return None
        if not all(math.isfinite(d) and abs(d) <= _LIMIT for d in op.second(x, y, last, value)):
            return None
        # Neither value nor derivative may jump nearby (keeps clear of relu's
        # kink, floor's steps, where's switch), so that one-ulp differences
        # between libraries cannot change a branch.
        for k in range(op.arity):
            for step in (1e-6, -1e-6):
                moved = [x, y, z]
                moved[k] += step * (1 + abs(moved[k]))
                xs, ys, zs = moved
                near_value = op.forward(xs, ys, zs if ternary else c)
                if not abs(near_value - value) <= 1e-3 * (1.0 + abs(value)):
                    return None
                near = op.partials(xs, ys, zs if ternary else c, near_value)
                for d, e in zip(base, near):
                    if not (math.isfinite(d) and abs(d) <= _LIMIT):
                        return None
                    if not abs(d - e) <= 1e-3 * (1.0 + abs(d)):
                        return None
        out.append(value)
    return out


def random_dag(seed: int, size: int = 40, inputs: int = 3, batch: int = 4) -> Graph:
    """A seeded random DAG of about ``size`` nodes that uses every op of the table.

    Node 0..inputs-1 are inputs, then one constant, then the non-leaf ops in
    a shuffled cycle through the table (plus the odd extra constant). Each
    op's arguments and exponent are drawn until every one of the ``batch``
    bindings keeps it finite, bounded (1e3), well conditioned and away from
    kinks (see ``_candidates`` for the fallback that always exists). The
    last node is a non-leaf op: the natural output.
    """
    rng = random.Random(seed)
    bindings = np.empty((batch, inputs))
    for j in range(inputs):
        for r in range(batch):
            if j == 0:
                bindings[r, j] = rng.uniform(1.5, 2.0)
            else:
                magnitude = rng.uniform(0.5, 2.0)
                bindings[r, j] = magnitude if rng.random() < 0.5 else -magnitude
    nodes: list[Node] = [("input", (), float(bindings[0, j])) for j in range(inputs)]
    rows: list[list[float]] = [bindings[:, j].tolist() for j in range(inputs)]
    is_const = [False] * inputs
    used = [False] * inputs

    def add(node: Node, values: list[float], const: bool) -> None:
        nodes.append(node)
        rows.append(values)
        is_const.append(const)
        used.append(False)

    c0 = round(rng.uniform(-2.0, -0.5), 3)
    add(("const", (), c0), [c0] * batch, True)
    cycle: list[ops.Op] = []
    missing = {op.name for op in _INNER}
    deferred = 0
    while len(nodes) < size or missing or is_const[-1]:
        if not cycle:
            cycle = list(_INNER)
            rng.shuffle(cycle)
        if rng.random() < 0.08:
            c = round(rng.uniform(-2.0, 2.0), 3)
            add(("const", (), c), [c] * batch, True)
            continue
        op = cycle.pop()
        for args, c in _candidates(rng, op, len(nodes), used, inputs):
            if all(is_const[a] for a in args) or (op.expr.startswith("x.") and is_const[args[0]]):
                continue  # a method needs a node, not a float, before the dot
            if op.arity == 3 and is_const[args[1]] and is_const[args[2]]:
                continue
            triples = [
                tuple(rows[args[k]][r] if k < op.arity else 0.0 for k in range(3))
                for r in range(batch)
            ]
            values = _safe(op, triples, c)  # type: ignore[arg-type]
            if values is not None:
                for a in args:
                    used[a] = True
                add((op.name, args, c), values, False)
                missing.discard(op.name)
                break
        else:
            # Some ops need arguments that only later nodes provide (atanh wants
            # |x| < 1): try this one again after the rest of the cycle.
            deferred += 1
            if deferred > 4 * len(_INNER):
                raise AssertionError(f"random_dag({seed}): no safe arguments found for {op.name}")
            cycle.insert(0, op)
    return Graph(nodes, bindings)


def _candidates(
    rng: random.Random, op: ops.Op, n: int, used: list[bool], inputs: int
) -> Iterator[tuple[tuple[int, ...], float]]:
    """Arguments and constant to try for ``op``: 40 random draws, then sure-fire ones.

    The fallbacks read input 0 (in [1.5, 2] in every binding) and the first
    constant (node ``inputs``, in [-2, -0.5]), on which every op is safe.
    """
    exponents = _EXPONENTS if op.uses_value else (0.0,)
    for _ in range(40):
        yield tuple(_pick(rng, range(n), used) for _ in range(op.arity)), rng.choice(exponents)
    fallbacks = [(0,), (0, 0), (0, inputs), (inputs, 0), (0, 0, inputs), (0, inputs, 0)]
    for args in fallbacks:
        if len(args) == op.arity:
            for c in exponents:
                yield args, c


def _pick(rng: random.Random, pool: range, used: list[bool]) -> int:
    """An argument index: half the time an unused node, so most nodes reach the output."""
    unused = [i for i in pool if not used[i]]
    if unused and rng.random() < 0.5:
        return rng.choice(unused)
    return rng.choice(pool)


def mlp_loss(
    seed: int = 0, nin: int = 2, nouts: Sequence[int] = (16, 16, 1), points: int = 8
) -> tuple[Value, MLP]:
    """micrograd's demo loss on seeded data: mean ``relu(1 - y*score)`` plus 1e-4 x L2.

    Points are uniform in [-1, 1]^nin, labels ±1 by the sign of their first
    coordinate. Returns the loss node and the model whose parameters it uses.
    """
    rng = random.Random(seed)
    model = MLP(nin, list(nouts), rng=rng)
    xs = [[rng.uniform(-1.0, 1.0) for _ in range(nin)] for _ in range(points)]
    ys = [1.0 if x[0] > 0 else -1.0 for x in xs]
    margins = []
    for x, y in zip(xs, ys):
        score = model(x)
        assert isinstance(score, Value)
        margins.append((1 + -y * score).relu())
    data_loss: Value | float = sum(margins, 0.0) * (1.0 / points)
    reg: Value | float = 1e-4 * sum((p * p for p in model.parameters()), 0.0)
    loss = data_loss + reg
    assert isinstance(loss, Value)
    return loss, model


def deep_chain(depth: int, start: float = 0.5) -> tuple[Value, Value]:
    """``y = y * 1.0001 + 0.001`` applied ``depth`` times: returns ``(x, y)``."""
    x = Value(start)
    y = x
    for _ in range(depth):
        y = y * 1.0001 + 0.001
    return x, y


def affine_chain_tape(n: int, scale: float, shift: float) -> Tape:
    """``y = y * scale + shift`` from input ``x = 0.5`` as an ``n``-node tape, built with numpy.

    Nodes: ``x``, the two constants, then alternating mul and add; ``n`` odd.
    """
    code = np.empty(n, np.uint8)
    code[:3] = (ops.INPUT.code, ops.CONST.code, ops.CONST.code)
    code[3::2] = ops.BY_NAME["mul"].code
    code[4::2] = ops.BY_NAME["add"].code
    arg0 = np.full(n, -1, np.int32)
    arg1 = np.full(n, -1, np.int32)
    arg0[3] = 0
    arg0[4:] = np.arange(3, n - 1)
    arg1[3::2] = 1
    arg1[4::2] = 2
    const = np.zeros(n)
    const[:3] = (0.5, scale, shift)
    return Tape.from_arrays(code, arg0, arg1, const, {"x": 0})
