"""Adding an op is one place: everything generated from the op table is current, and every
place that cannot be generated has every op (a failure names the op and the place).

The places: the native kernel's dispatch list (``engine/_ops_list.h``, generated) and its
math (``engine/_ops_math.h``, by hand: a missing function does not compile), ``Value``'s
methods (generated), the wire's ``Op`` enum (by hand), the docs table (generated) and
``GetServerInfo`` (read from the table). Second derivatives are checked against central
differences of the first, since only the HVP sweeps use them.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from micrograd import _kernel, ops
from micrograd.engine import Value
from micrograd.v1 import graph_pb2

ROOT = Path(__file__).resolve().parent.parent
INNER = [op for op in ops.OPS if op.arity > 0]
METHOD = re.compile(r"^x\.(\w+)\((y?)\)$")


def test_generated_files_are_current() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-ops"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr


def test_every_op_is_in_every_place() -> None:
    wire = {v.name: v.number for v in graph_pb2.Op.DESCRIPTOR.values}
    native = {code: name for code, name, _ in _kernel.OPS}
    api = (ROOT / "docs" / "API.md").read_text()
    math_h = (ROOT / "engine" / "_ops_math.h").read_text()
    missing = []
    for op in ops.OPS:
        if wire.get(f"OP_{op.name.upper()}") != op.code:
            missing.append(f"{op.name}: the Op enum in proto/micrograd/v1/graph.proto")
        if native.get(op.code) != op.name:
            missing.append(f"{op.name}: the native kernel (engine/_ops_list.h)")
        if op.arity and not re.search(rf"\b{op.name}(_f\b|, )", math_h):
            missing.append(f"{op.name}: its math in engine/_ops_math.h")
        if f"| `{op.name}` | `OP_{op.name.upper()} = {op.code}` |" not in api:
            missing.append(f"{op.name}: the table in docs/API.md")
        if (m := METHOD.match(op.expr)) and not callable(getattr(Value, m[1], None)):
            missing.append(f"{op.name}: the Value method {m[1]}")
        if op.arity and not (op.doc and op.domain):
            missing.append(f"{op.name}: doc and domain in the table")
    assert not missing, "ops missing from: " + "; ".join(missing)
    assert set(wire) == {"OP_UNSPECIFIED", *(f"OP_{op.name.upper()}" for op in ops.OPS)}


def test_value_spells_every_op_as_pytorch_names_it() -> None:
    spelled = {m[1] for op in ops.OPS if (m := METHOD.match(op.expr))}
    unary = "sin cos tan asin acos atan sinh cosh asinh acosh atanh sqrt abs log1p expm1"
    expected = set(f"{unary} log2 log10 erf softplus floor ceil sign atan2 maximum minimum".split())
    assert expected <= spelled
    assert abs(Value(-3.0)).op is ops.BY_NAME["abs"]


@pytest.mark.parametrize("op", INNER, ids=lambda op: op.name)
def test_second_derivatives_are_central_differences_of_the_first(op: ops.Op) -> None:
    points = [-1.7, -0.6, 0.35, 0.8, 1.3, 2.2]
    checked = 0
    for x in points:
        for y in points if op.arity >= 2 else [0.0]:
            if op.name in ("maximum", "minimum") and x == y:
                continue  # the tie is a kink
            for c in (2.5, -1.5, 0.5) if op.uses_value else (0.0,):
                last = 0.7 if op.arity == 3 else c
                args = [x, y, last]
                value = op.forward(*args)
                second = op.second(*args, value)
                if not math.isfinite(value) or op.name in ("floor", "ceil", "sign"):
                    assert all(d == 0.0 for d in second) or not math.isfinite(value)
                    continue
                # d/dx_k of the partial d/dx_j is second[(j, k)]: xx, xy, yy (ternary: flat).
                index = {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 2}
                for j in range(min(op.arity, 2)):
                    for k in range(min(op.arity, 2)):
                        h = 1e-6 * max(1.0, abs(args[k]))
                        up, down = list(args), list(args)
                        up[k] += h
                        down[k] -= h
                        d_up = op.partials(*up, op.forward(*up))[j]
                        d_down = op.partials(*down, op.forward(*down))[j]
                        if not (math.isfinite(d_up) and math.isfinite(d_down)):
                            continue
                        slope = (d_up - d_down) / (2 * h)
                        got = second[index[(j, k)]]
                        assert math.isclose(got, slope, rel_tol=1e-5, abs_tol=1e-7), (
                            f"{op.name}{tuple(args)} d2/d{'xy'[j]}d{'xy'[k]}: {got!r} vs {slope!r}"
                        )
                        checked += 1
    assert checked > 0 or op.name in ("floor", "ceil", "sign", "where")
