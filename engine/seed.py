"""The seed example's expression: the project's reference graph, written once.

The seed document's example builds ``g`` from ``a = -4`` and ``b = 2`` and
prints ``24.7041`` (``g``), ``138.8338`` (dg/da) and ``645.5773`` (dg/db).
Tests, benchmarks and the fuzzers build that graph from here;
``examples/seed.py`` keeps the example itself, verbatim.
"""

from __future__ import annotations

from .engine import Value

__all__ = ["SEED_NUMBERS", "seed_expression", "seed_graph"]

SEED_NUMBERS = (24.7041, 138.8338, 645.5773)
"""What the seed example prints: g, dg/da and dg/db, to four places."""


def seed_expression(a: Value, b: Value) -> Value:
    """The seed document's expression of ``a`` and ``b`` (its example, line for line)."""
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
    return g


def seed_graph(a0: float = -4.0, b0: float = 2.0) -> tuple[Value, Value, Value]:
    """The seed example's graph at ``a = a0``, ``b = b0``: returns ``(a, b, g)``."""
    a, b = Value(a0), Value(b0)
    return a, b, seed_expression(a, b)
