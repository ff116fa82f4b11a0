"""The portable Python kernel against the op table, read node by node.

``PythonKernel`` spells out the ops of nearly every node of a network's loss
(``add``, ``mul``, ``relu``), skips leaves, and sweeps backward without a
record of reached nodes when every node is reached. The reference here is
the plainest reading of the table: each node's ``forward``, then each
reached node's ``partials``, in tape order. Results must be bit-identical
(NaN equal to NaN, the sign of zero kept).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from micrograd import ops
from micrograd.kernels import PythonKernel, _reaches_every_node
from micrograd.tape import Tape

PYTHON = PythonKernel()
EDGE = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 2.5, -3.0, 1e-300, 710.0)
EXPONENTS = (0.0, 1.0, 2.0, -1.0, 0.5, -0.5, 1.5)


def reference(
    tape: Tape, leaves: np.ndarray, output: int, seeds: np.ndarray | None = None
) -> tuple[list[float], list[float]]:
    """Values and gradients straight from the op table (no fast path, every reached node)."""
    code, a, b = tape.code.tolist(), tape.arg0.tolist(), tape.arg1.tolist()
    z = [-1] * len(code) if tape.arg2 is None else tape.arg2.tolist()
    c = tape.const.tolist()
    v = leaves.tolist()
    for i, k in enumerate(code):
        op = ops.BY_CODE[k]
        if op.arity == 3:
            v[i] = op.forward(v[a[i]], v[b[i]], v[z[i]])
        elif op.arity:
            v[i] = op.forward(v[a[i]], v[b[i]] if op.arity == 2 else 0.0, c[i])
    g = [0.0] * len(v) if seeds is None else seeds.tolist()
    reached = [False] * len(v)
    if seeds is None:
        g[output] = 1.0
    else:
        reached = [x != 0.0 for x in g]
    reached[output] = True
    for i in range(output, -1, -1):
        op = ops.BY_CODE[code[i]]
        if not reached[i] or op.arity == 0:
            continue
        args = [a[i], b[i], z[i]][: op.arity]
        if op.arity == 3:
            partials = op.partials(v[a[i]], v[b[i]], v[z[i]], v[i])
        else:
            partials = op.partials(v[a[i]], v[b[i]] if op.arity == 2 else 0.0, c[i], v[i])
        for j, d in zip(args, partials, strict=False):
            g[j] += d * g[i]
            reached[j] = True
    return v, g


def same(x: np.ndarray | list[float], y: np.ndarray | list[float]) -> bool:
    """Bit-identical floats: NaN equal to NaN, -0.0 apart from 0.0."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return x.shape == y.shape and bool(
        np.all((x.view(np.uint64) == y.view(np.uint64)) | (np.isnan(x) & np.isnan(y)))
    )


def random_tape(seed: int, n: int = 300, every_node_used: bool = False) -> Tape:
    """A seeded random DAG over every op (``where`` included) with edge values among its
    leaves; with ``every_node_used``, a trailing ``add`` chain uses every earlier node."""
    rng = np.random.default_rng(seed)
    inner = [op for op in ops.OPS if op.arity > 0]
    rows: list[tuple[str, tuple[int, ...], float]] = []
    for i in range(n):
        if i < 8:
            value = EDGE[rng.integers(len(EDGE))] if rng.random() < 0.4 else rng.normal()
            rows.append(("input" if i % 2 == 0 else "const", (), float(value)))
            continue
        op = inner[(i - 8) % len(inner)] if i - 8 < len(inner) else rng.choice(inner)
        args = tuple(int(rng.integers(max(0, i - 20), i)) for _ in range(op.arity))
        c = float(EXPONENTS[rng.integers(len(EXPONENTS))]) if op.uses_value else 0.0
        rows.append((op.name, args, c))
    if every_node_used:
        total = 0
        for j in range(1, n):
            rows.append(("add", (total, j), 0.0))
            total = len(rows) - 1
    return Tape.from_nodes(rows)


@pytest.mark.parametrize("name", ["add", "mul", "relu"])
def test_spelled_out_ops_are_the_table_on_edge_values(name: str) -> None:
    # out = op(x[, y]) / w: the gradient reaching op's node is 1/w (inf, -inf, nan, 0, ...).
    op = ops.BY_NAME[name]
    args = tuple(range(op.arity))
    rows = [*[("input", (), 0.0)] * (op.arity + 1), (name, args, 0.0)]
    rows.append(("div", (len(rows) - 1, op.arity), 0.0))
    tape = Tape.from_nodes(rows)
    for point in itertools.product(*[EDGE] * (op.arity + 1)):
        leaves = tape.leaf_values(np.array(point))
        with np.errstate(all="ignore"):
            values, grads = tape.evaluate(np.array(point), kernel=PYTHON)
        expected_values, expected_grads = reference(tape, leaves, len(tape) - 1)
        assert same(values, expected_values), point
        assert same(grads, expected_grads), point


@pytest.mark.parametrize("every_node_used", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_random_dag_over_every_op_is_the_table(seed: int, every_node_used: bool) -> None:
    tape = random_tape(seed, every_node_used=every_node_used)
    leaves = tape.leaf_values(None)
    rng = np.random.default_rng(seed)
    for output in (len(tape) - 1, len(tape) // 2):
        assert _reaches_every_node(tape, output) == (every_node_used and output == len(tape) - 1)
        with np.errstate(all="ignore"):
            values, grads = tape.evaluate(output=output, kernel=PYTHON)
            expected_values, expected_grads = reference(tape, leaves, output)
            assert same(values, expected_values)
            assert same(grads, expected_grads)
            seeds = np.where(rng.random(len(tape)) < 0.2, rng.normal(size=len(tape)), 0.0)
            seeds[output + 1 :] = 0.0
            cotangents = seeds.copy()
            PYTHON.vjp(tape, values, cotangents, output)
            assert same(cotangents, reference(tape, leaves, output, seeds)[1])
