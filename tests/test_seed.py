"""The seed document's example, run verbatim, and its numbers checked in full precision.

The seed is the user's own specification: the script below is copied from it
character for character and must print ``24.7041``, ``138.8338`` and
``645.5773``. The full-precision checks hold the same graph to PyTorch float64.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from micrograd.engine import Value
from micrograd.tape import Tape

SEED_EXAMPLE = """\
from micrograd.engine import Value

a = Value(-4.0)
b = Value(2.0)
c = a + b
d = a * b + b**3
c += c + 1
c += 1 + c + (-a)
d += d * 2 + (b + a).relu()
d += 3 * d + (b - a).relu()
e = c - d
f = e**2
g = f / 2.0
g += 10.0 / f
print(f'{g.data:.4f}') # prints 24.7041, the outcome of this forward pass
g.backward()
print(f'{a.grad:.4f}') # prints 138.8338, i.e. the numerical value of dg/da
print(f'{b.grad:.4f}') # prints 645.5773, i.e. the numerical value of dg/db
"""

SEED_OUTPUT = ["24.7041", "138.8338", "645.5773"]
"""The three lines the seed says the example prints."""


def test_seed_example_runs_verbatim_and_prints_its_numbers(tmp_path: Path) -> None:
    script = tmp_path / "seed_example.py"
    script.write_text(SEED_EXAMPLE)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == SEED_OUTPUT


def _seed_graph(a: object, b: object) -> object:
    """The seed's expression, written once for ``Value`` and PyTorch tensors alike."""
    c = a + b  # type: ignore[operator]
    d = a * b + b**3  # type: ignore[operator]
    c += c + 1
    c += 1 + c + (-a)  # type: ignore[operator]
    d += d * 2 + (b + a).relu()  # type: ignore[operator]
    d += 3 * d + (b - a).relu()  # type: ignore[operator]
    e = c - d
    f = e**2
    g = f / 2.0
    g += 10.0 / f
    return g


def test_seed_numbers_match_pytorch_float64() -> None:
    torch = pytest.importorskip("torch")
    a, b = Value(-4.0), Value(2.0)
    g = _seed_graph(a, b)
    assert isinstance(g, Value)
    g.backward()
    ta = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    tg = _seed_graph(ta, tb)
    tg.backward()  # type: ignore[attr-defined]
    assert math.isclose(g.data, tg.item(), rel_tol=1e-12)  # type: ignore[attr-defined]
    assert math.isclose(a.grad, ta.grad.item(), rel_tol=1e-12)
    assert math.isclose(b.grad, tb.grad.item(), rel_tol=1e-12)
    # PyTorch float64 gives g = 24.70408163265306, dg/da = 138.83381924198252,
    # dg/db = 645.5772594752186; the seed rounds them to four places.
    assert math.isclose(g.data, 24.70408163265306, rel_tol=1e-12)
    assert math.isclose(a.grad, 138.83381924198252, rel_tol=1e-12)
    assert math.isclose(b.grad, 645.5772594752186, rel_tol=1e-12)


def test_seed_graph_through_the_tape_matches_value() -> None:
    a, b = Value(-4.0), Value(2.0)
    g = _seed_graph(a, b)
    assert isinstance(g, Value)
    g.backward()
    tape, order = Tape.from_value(g, {"a": a, "b": b})
    values, grads = tape.evaluate()
    assert values[-1] == g.data
    assert grads[tape.names["a"]] == a.grad
    assert grads[tape.names["b"]] == b.grad
    assert [v.data for v in order] == values.tolist()
