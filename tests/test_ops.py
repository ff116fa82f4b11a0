"""Every op of the table, on ``Value`` and on the tape, against PyTorch float64 and calculus.

The ops are read from ``micrograd.ops.OPS`` and built from each entry's
``expr``, so an op that ``Value`` or a tape kernel lacks fails here. The
points include awkward ones (signed zeros, subnormals, overflow, infinities,
nan, ties, domain edges); PyTorch float64 autograd is the reference, with the
few places where it deliberately differs listed in ``_pytorch_differs``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from micrograd import ops
from micrograd.engine import Value, strict, where
from micrograd.kernels import available_kernels, get_kernel
from micrograd.tape import Tape

torch = pytest.importorskip("torch")

INNER = [op for op in ops.OPS if op.arity > 0]
LEAVES = [op for op in ops.OPS if op.arity == 0]
KERNELS = available_kernels()

INF, NAN = math.inf, math.nan
AWKWARD = [0.0, -0.0, 1.0, -1.0, 0.5, -2.5, 3.0, 1e-300, -1e-300, 710.0, -710.0, 40.0, -40.0,
           1e308, -1e308, INF, -INF, NAN, 20.0, 20.5, 1.5707963267948966, 1e22]  # fmt: skip
"""Argument values: signed zeros, subnormal-adjacent, exp/sigmoid tails, overflow, inf, nan,
softplus's threshold, a float next to a pole of tan, a huge argument for sin and cos."""
CONDITIONS = [1.0, -1.0, 0.0, -0.0, 1e-300, NAN, INF]
"""Conditions of ``where``: both sides, zeros (not > 0), nan (picks the else branch)."""
BRANCHES = [0.5, -2.5, INF, NAN, 0.0]
EXPONENTS = [2.0, 3.0, 0.5, -0.5, 1 / 3, -1.0, -1.5, 0.0, 1.0, -2.0, 2.5]
"""Constants for ops that read the node's value (the exponent of ``pow``)."""
SMOOTH = [-2.5, -0.7, 0.3, 1.0, 1.9]
"""Points away from kinks and poles, for finite differences."""

STEPS = ("floor", "ceil", "sign")
"""Ops that jump (at integers, at 0): central differences only away from the jumps."""

TORCH_SPELLING = {
    "softplus": "torch.nn.functional.softplus(x)",
    "where": "torch.where(x > 0, y, z)",
}
"""How PyTorch writes the ops whose ``Value`` spelling is not a tensor method."""

Point = tuple[float, float, float, float]
"""``(x, y, z, c)``: the arguments (0.0 where the op takes fewer) and the constant."""


def _points(op: ops.Op, xs: list[float]) -> list[Point]:
    """Points covering ``xs`` in each argument and every exponent."""
    if op.arity == 3:
        return [(p, y, z, 0.0) for p in CONDITIONS for y in BRANCHES for z in BRANCHES]
    ys = xs if op.arity == 2 else [0.0]
    cs = EXPONENTS if op.uses_value else [0.0]
    return [(x, y, 0.0, c) for x in xs for y in ys for c in cs]


def _same(a: float, b: float, rtol: float = 1e-12) -> bool:
    """Equal as IEEE results: nan matches nan, infinities by sign, finite within ``rtol``.

    Differences below 1e-300 count as equal: PyTorch's sigmoid flushes its
    far tail (``1 / (1 + exp(710))``) to 0 where ours keeps the subnormal.
    """
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(abs(a), abs(b)) or abs(a - b) < 1e-300


def _build(op: ops.Op, args: list[Value], c: float) -> Value:
    """``op`` applied to ``args`` through ``Value``, built from the op's ``expr``."""
    env = {"x": args[0], "y": args[1], "z": args[2], "c": c, "Value": Value, "where": where}
    out = eval(op.expr, {"__builtins__": {}}, env)
    assert isinstance(out, Value), f"{op.expr} did not build a Value"
    assert out.op is op, f"{op.expr} built {out.op.name}, not {op.name}"
    return out


def _on_value(op: ops.Op, point: Point) -> tuple[float, ...]:
    """``(out, d/dx, d/dy, d/dz)`` through ``Value``."""
    x, y, z, c = point
    args = [Value(x), Value(y), Value(z)]
    out = _build(op, args, c)
    out.backward()
    return (out.data, *(a.grad for a in args))


def _on_torch(op: ops.Op, point: Point) -> tuple[float, ...]:
    """``(out, d/dx, d/dy, d/dz)`` by PyTorch float64 autograd on the same op."""
    x, y, z, c = point
    args = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, y, z)]
    env = {"x": args[0], "y": args[1], "z": args[2], "c": c, "torch": torch}
    out = eval(TORCH_SPELLING.get(op.name, op.expr), {"__builtins__": {}}, env)
    out.backward()
    return (out.item(), *(0.0 if a.grad is None else a.grad.item() for a in args))


def _pytorch_differs(op: ops.Op, x: float, c: float) -> bool:
    """Points where PyTorch deliberately departs from IEEE/C semantics (documented below).

    * ``x ** 0.5`` and ``x ** -0.5``: PyTorch computes ``sqrt``/``rsqrt``, so
      ``(-inf) ** 0.5`` is nan (C ``pow``: inf) and ``(-0.0) ** -0.5`` is
      ``-inf`` (C ``pow``: inf). We follow C ``pow`` everywhere.
    * relu at nan: PyTorch passes the gradient (its backward tests the output
      ``nan <= 0``, which is false); ours is ``1 if x > 0 else 0``, so 0.
    """
    negative_zero = x == 0.0 and math.copysign(1.0, x) < 0
    if op.name == "pow" and c in (0.5, -0.5) and (x == -INF or negative_zero):
        return True
    return op.name == "relu" and math.isnan(x)


def _graph(op: ops.Op, c: float) -> Tape:
    """The tape ``op(x[, y[, z]])`` over its input nodes: the op is the last node."""
    inputs = [("input", (), 0.0, name) for name in "xyz"[: op.arity]]
    return Tape.from_nodes([*inputs, (op.name, tuple(range(op.arity)), c)])


def _by_exponent(points: list[Point]) -> Iterator[tuple[float, np.ndarray]]:
    """Group points by constant: one batch per ``c``, rows ``(x, y, z)``."""
    for c in sorted({p[3] for p in points}):
        yield c, np.array([p[:3] for p in points if p[3] == c])


# -- the table itself ---------------------------------------------------------


def test_table_codes_are_dense_and_names_unique() -> None:
    assert [op.code for op in ops.OPS] == list(range(1, len(ops.OPS) + 1))
    assert len(ops.BY_NAME) == len(ops.OPS)


def test_the_table_check_rejects_gaps_reordering_and_repeated_names() -> None:
    ops.check_table(ops.OPS)  # the real table passes
    first, second, third = ops.OPS[:3]
    with pytest.raises(ValueError, match=r"codes must run 1\.\.2"):
        ops.check_table([first, third])  # a gap
    with pytest.raises(ValueError, match=r"codes must run 1\.\.2"):
        ops.check_table([second, first])  # out of order
    twin = dataclasses.replace(second, name=first.name)
    with pytest.raises(ValueError, match=f"repeated: {first.name}"):
        ops.check_table([first, twin])


@pytest.mark.parametrize("op", INNER, ids=lambda op: op.name)
def test_value_builds_the_op_with_its_micrograd_label(op: ops.Op) -> None:
    args = [Value(1.5), Value(2.0), Value(-0.5)]
    out = _build(op, args, 2.0)
    expected = "**2" if op.name == "pow" else op.label
    assert out._op == expected
    assert out._prev == set(args[: op.arity])


def test_builtin_abs_is_the_abs_op() -> None:
    x = Value(-2.5)
    y = abs(x)
    y.backward()
    assert (y.op.name, y.data, x.grad) == ("abs", 2.5, -1.0)


# -- against PyTorch and finite differences -----------------------------------


@pytest.mark.parametrize("op", INNER, ids=lambda op: op.name)
def test_value_matches_pytorch_float64_at_awkward_points(op: ops.Op) -> None:
    checked = 0
    for point in _points(op, AWKWARD):
        if _pytorch_differs(op, point[0], point[3]):
            continue
        ours = _on_value(op, point)
        ref = _on_torch(op, point)
        for what, a, b in zip(("value", "d/dx", "d/dy", "d/dz"), ours, ref):
            assert _same(a, b), f"{op.name}{point} {what}: ours {a!r}, PyTorch {b!r}"
        checked += 1
    assert checked >= len(AWKWARD) - 4


@pytest.mark.parametrize("op", INNER, ids=lambda op: op.name)
def test_value_gradient_matches_central_differences(op: ops.Op) -> None:
    checked = 0
    if op.arity == 3:  # both branches, conditions away from 0
        points = [(p, y, z, 0.0) for p in (1.0, -1.0) for y in SMOOTH for z in SMOOTH]
    else:  # the rounding ops jump at integers
        points = [p for p in _points(op, SMOOTH) if op.name not in STEPS or not p[0].is_integer()]
    for x, y, z, c in points:
        out, gx, gy, gz = _on_value(op, (x, y, z, c))
        if not math.isfinite(out):
            continue  # outside the op's domain (log or a fractional power of a negative)
        for i, grad in ((0, gx), (1, gy), (2, gz))[: op.arity]:
            args = [x, y, z]
            h = 1e-6 * max(1.0, abs(args[i]))
            up, down = list(args), list(args)
            up[i] += h
            down[i] -= h
            f_up = op.forward(up[0], up[1], up[2] if op.arity == 3 else c)
            f_down = op.forward(down[0], down[1], down[2] if op.arity == 3 else c)
            if not (math.isfinite(f_up) and math.isfinite(f_down)):
                continue  # e.g. (-2.5) ** y: defined at integers y only
            slope = (f_up - f_down) / (2 * h)
            # Central differences: error O(h^2) times the third derivative, plus eps*f/h.
            assert math.isclose(grad, slope, rel_tol=1e-6, abs_tol=1e-8), (
                f"{op.name}(x={x}, y={y}, z={z}, c={c}) d/d{'xyz'[i]}: {grad!r} vs {slope!r}"
            )
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("op", LEAVES, ids=lambda op: op.name)
def test_leaf_op_holds_its_value_and_has_gradient_one(op: ops.Op) -> None:
    made = eval(op.expr, {"__builtins__": {}}, {"c": -2.5, "Value": Value})
    assert made == -2.5 or made.data == -2.5
    for kernel in KERNELS:
        tape = Tape.from_nodes([(op.name, (), -2.5)])
        values, grads = tape.evaluate(kernel=get_kernel(kernel))
        assert values.tolist() == [-2.5]
        assert grads.tolist() == [1.0]


# -- the tape: single and batch, every kernel ---------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op", INNER, ids=lambda op: op.name)
def test_tape_matches_value_at_awkward_points(op: ops.Op, kernel: str) -> None:
    kern = get_kernel(kernel)
    for point in _points(op, AWKWARD):
        expected = _on_value(op, point)
        values, grads = _graph(op, point[3]).evaluate(list(point[: op.arity]), kernel=kern)
        got = (values[-1], *grads[: op.arity], *[0.0] * (3 - op.arity))
        for what, a, b in zip(("value", "d/dx", "d/dy", "d/dz"), expected, got):
            assert _same(a, float(b)), f"{kernel} {op.name}{point} {what}: {a!r} vs {b!r}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op", INNER, ids=lambda op: op.name)
def test_tape_compiled_from_value_matches_value(op: ops.Op, kernel: str) -> None:
    kern = get_kernel(kernel)
    for x, y, z, c in _points(op, AWKWARD):
        args = [Value(x), Value(y), Value(z)]
        out = _build(op, args, c)
        out.backward()
        tape, order = Tape.from_value(out, dict(zip("xyz", args[: op.arity])))
        assert tape.code[-1] == op.code
        values, grads = tape.evaluate(kernel=kern)
        for node, value, grad in zip(order, values, grads):
            assert _same(node.data, float(value)) and _same(node.grad, float(grad)), (
                f"{kernel} {op.name}({x}, {y}, {z}, c={c}): {node!r} vs {value!r}, {grad!r}"
            )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op", INNER, ids=lambda op: op.name)
def test_tape_batch_equals_single_evaluations(op: ops.Op, kernel: str) -> None:
    kern = get_kernel(kernel)
    for c, rows in _by_exponent(_points(op, AWKWARD)):
        tape = _graph(op, c)
        bindings = rows[:, : op.arity]
        values, grads = tape.evaluate(bindings, kernel=kern)
        assert values.shape == grads.shape == (len(rows), len(tape))
        for r, binding in enumerate(bindings):
            one_values, one_grads = tape.evaluate(binding, kernel=kern)
            for a, b in zip([*one_values, *one_grads], [*values[r], *grads[r]]):
                assert _same(float(a), float(b)), f"{kernel} {op.name}{tuple(binding)}, c={c}"


# -- IEEE edge semantics, named --------------------------------------------------


def _value_and_grad(expr: str, x: float, c: float = 0.0) -> tuple[float, float]:
    vx = Value(x)
    out = eval(expr, {"__builtins__": {}}, {"x": vx, "c": c})
    out.backward()
    return out.data, vx.grad


def _torch_value_and_grad(expr: str, x: float, c: float = 0.0) -> tuple[float, float]:
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out = eval(expr, {"__builtins__": {}}, {"x": tx, "c": c})
    out.backward()
    return out.item(), 0.0 if tx.grad is None else tx.grad.item()


@pytest.mark.parametrize(
    ("expr", "x", "value", "grad"),
    [
        ("x.log()", 0.0, -INF, INF),  # log 0 = -inf, d/dx = 1/0 = inf
        ("x.log()", -0.0, -INF, -INF),  # 1/-0 = -inf
        ("x.log()", -1.0, NAN, -1.0),  # nan value; the local derivative 1/x is still -1
        ("1.0 / x", 0.0, INF, -INF),  # d/dx 1/x = -(1/x)/x = -inf/0
        ("1.0 / x", -0.0, -INF, -INF),
        ("-1.0 / x", 0.0, -INF, INF),
        ("x / 0.0", 0.0, NAN, INF),  # 0/0 = nan; d/dx = 1/0
        ("x / 0.0", 2.0, INF, INF),
        ("x / -0.0", 2.0, -INF, -INF),
        ("x.exp()", 710.0, INF, INF),  # Python's math.exp raises here; IEEE gives inf
        ("x.exp()", -750.0, 0.0, 0.0),
        ("x ** 0.5", -8.0, NAN, NAN),  # negative base, fractional exponent
        ("x ** (1/3)", -8.0, NAN, NAN),  # not the real cube root -2
        ("x ** -1.0", 0.0, INF, -INF),  # 0 ** negative odd integer keeps the zero's sign
        ("x ** -1.0", -0.0, -INF, -INF),
        ("x ** -2.0", -0.0, INF, INF),  # even: +inf; d/dx = -2 * (-0)**-3 = -2 * -inf
        ("x ** -0.5", 0.0, INF, -INF),
        ("x ** 0.0", 0.0, 1.0, 0.0),  # 0**0 = 1 and d/dx = 0 (PyTorch masks c = 0)
        ("x.relu()", 0.0, 0.0, 0.0),  # the kink: derivative 0, as PyTorch
        ("x.relu()", -0.0, 0.0, 0.0),
        ("x.sigmoid()", -800.0, 0.0, 0.0),
        ("x.tanh()", INF, 1.0, 0.0),
    ],
)
def test_ieee_edge_value_and_gradient_match_pytorch(
    expr: str, x: float, value: float, grad: float
) -> None:
    ours = _value_and_grad(expr, x)
    assert _same(ours[0], value) and _same(ours[1], grad), f"{expr} at {x}: {ours}"
    ref = _torch_value_and_grad(expr, x)
    assert _same(ref[0], value) and _same(ref[1], grad), f"PyTorch {expr} at {x}: {ref}"


def test_relu_of_nan_is_nan_with_gradient_zero() -> None:
    value, grad = _value_and_grad("x.relu()", NAN)
    assert math.isnan(value)
    assert grad == 0.0
    # PyTorch agrees on the value; its gradient is 1 (see _pytorch_differs).
    ref_value, ref_grad = _torch_value_and_grad("x.relu()", NAN)
    assert math.isnan(ref_value) and ref_grad == 1.0


def test_pow_follows_c_pow_where_pytorch_uses_sqrt() -> None:
    # C99 pow(-inf, 0.5) = +inf and pow(-0, -0.5) = +inf (Annex F.10.4.4).
    assert _value_and_grad("x ** c", -INF, 0.5) == (INF, 0.0)
    assert _value_and_grad("x ** c", -0.0, -0.5)[0] == INF
    assert _torch_value_and_grad("x ** c", -0.0, -0.5)[0] == -INF


def test_strict_mode_names_the_op_of_a_non_finite_forward() -> None:
    with strict(), pytest.raises(FloatingPointError, match=r"log\(x=0\.0\) = -inf"):
        Value(0.0).log()
    with strict(), pytest.raises(FloatingPointError, match=r"div\(x=1\.0, y=0\.0\) = inf"):
        Value(1.0) / 0
    with strict(), pytest.raises(FloatingPointError, match=r"exp\(x=1000\.0\) = inf"):
        Value(1000.0).exp()
    with strict(), pytest.raises(FloatingPointError, match=r"pow\(x=-8\.0, exponent=0\.5\) = nan"):
        Value(-8.0) ** 0.5


def test_strict_mode_names_the_op_of_a_non_finite_gradient() -> None:
    x = Value(0.0)
    with strict():
        y = (x**0.5) * 2.0  # forward is finite (0.0) ...
        message = r"gradient through pow\(x=0\.0, exponent=0\.5\) is not finite: d/dx = inf"
        with pytest.raises(FloatingPointError, match=message):
            y.backward()  # ... but d/dx x**0.5 = inf at 0


def test_strict_mode_ends_with_its_block() -> None:
    with strict(), pytest.raises(FloatingPointError):
        Value(-1.0).log()
    assert math.isnan(Value(-1.0).log().data)


def test_strict_mode_is_confined_to_its_thread() -> None:
    inside, entered, checked = [], threading.Event(), threading.Event()

    def other_thread() -> None:
        entered.wait(10)
        inside.append(Value(-1.0).log().data)  # IEEE here while the main thread is strict
        checked.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with strict():
        entered.set()
        assert checked.wait(10)
        with pytest.raises(FloatingPointError):
            Value(-1.0).log()
    worker.join(10)
    assert len(inside) == 1 and math.isnan(inside[0])


def test_strict_mode_is_confined_to_its_asyncio_task() -> None:
    async def strict_task(ready: asyncio.Event, done: asyncio.Event) -> None:
        with strict():
            ready.set()
            await done.wait()  # the other task computes while this one is strict

    async def main() -> float:
        ready, done = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(strict_task(ready, done))
        await ready.wait()
        result = Value(-1.0).log().data
        done.set()
        await task
        return result

    assert math.isnan(asyncio.run(main()))


def test_without_strict_mode_non_finite_results_are_values_not_errors() -> None:
    results: list[Any] = [Value(0.0).log(), Value(1.0) / 0, Value(1e3).exp(), Value(-8.0) ** 0.5]
    assert [r.data for r in results[:3]] == [-INF, INF, INF]
    assert math.isnan(results[3].data)
