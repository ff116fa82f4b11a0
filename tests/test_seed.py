"""The seed document's example, run verbatim, and its numbers checked in full precision.

The seed is the user's own specification: ``examples/seed.py`` holds its
script character for character, and run on its own it must print
``24.7041``, ``138.8338`` and ``645.5773``. The full-precision checks hold
the same graph to PyTorch float64.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from micrograd.engine import Value
from micrograd.seed import seed_expression
from micrograd.tape import Tape

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "seed.py"
_TEXT = EXAMPLE.read_text()
SEED_EXAMPLE = _TEXT[_TEXT.index("from micrograd.engine import Value") :]
"""The seed's script: ``examples/seed.py`` below its docstring, which is the seed verbatim."""

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


def test_seed_numbers_match_pytorch_float64() -> None:
    torch = pytest.importorskip("torch")
    a, b = Value(-4.0), Value(2.0)
    g = seed_expression(a, b)
    assert isinstance(g, Value)
    g.backward()
    ta = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    tg: Any = seed_expression(ta, tb)  # the same lines, on torch tensors
    tg.backward()
    assert math.isclose(g.data, tg.item(), rel_tol=1e-12)
    assert math.isclose(a.grad, ta.grad.item(), rel_tol=1e-12)
    assert math.isclose(b.grad, tb.grad.item(), rel_tol=1e-12)
    # PyTorch float64 gives g = 24.70408163265306, dg/da = 138.83381924198252,
    # dg/db = 645.5772594752186; the seed rounds them to four places.
    assert math.isclose(g.data, 24.70408163265306, rel_tol=1e-12)
    assert math.isclose(a.grad, 138.83381924198252, rel_tol=1e-12)
    assert math.isclose(b.grad, 645.5772594752186, rel_tol=1e-12)


def test_seed_graph_through_the_tape_matches_value() -> None:
    a, b = Value(-4.0), Value(2.0)
    g = seed_expression(a, b)
    assert isinstance(g, Value)
    g.backward()
    tape, order = Tape.from_value(g, {"a": a, "b": b})
    values, grads = tape.evaluate()
    assert values[-1] == g.data
    assert grads[tape.names["a"]] == a.grad
    assert grads[tape.names["b"]] == b.grad
    assert [v.data for v in order] == values.tolist()
