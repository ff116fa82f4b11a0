"""The op table: every operation the engine knows, defined once.

Each entry says everything there is to know about one operation: its name,
its stable wire code (the value of ``micrograd.v1.Op``), how many node
arguments it takes, whether it reads the node's constant ``value``, how it
computes forward, and its local partial derivatives right beside that.
``Value``, the tape kernels, the protobuf codec, the docs and the tests all
read this table; adding an op is one entry here plus its native kernel case.

Arithmetic follows IEEE 754 like PyTorch float64: ``log(-1)`` is ``nan``,
``1/0`` is ``inf``, overflow is ``inf``. Python's own float operators raise
instead, so the forward functions below catch those cases and return the
IEEE result. (``micrograd.engine.strict`` turns non-finite results into
errors for callers who prefer that.)

Conventions shared by every entry, so that kernels can treat ops alike:

* ``forward(x, y, c)``: ``x`` and ``y`` are the argument values (0.0 where
  the op takes fewer), ``c`` is the node's constant ``value``.
* ``partials(x, y, c, out)`` returns ``(d out/d x, d out/d y)``; ``out`` is
  the forward result, passed in so derivatives can reuse it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ARITY",
    "BY_CODE",
    "BY_NAME",
    "CONST",
    "INPUT",
    "MAX_CODE",
    "OPS",
    "USES_VALUE",
    "Op",
    "check_table",
]


@dataclass(frozen=True)
class Op:
    """One operation: identity, shape and math."""

    code: int
    """Stable wire code: the ``micrograd.v1.Op`` enum value. Never reused."""
    name: str
    """Lower-case name used in the APIs, docs and JSON (``"add"``)."""
    arity: int
    """Number of node arguments (0 for leaves)."""
    uses_value: bool
    """Whether the node's constant ``value`` is meaningful for this op."""
    label: str
    """micrograd's ``Value._op`` string for this op (``'+'``, ``'ReLU'``)."""
    expr: str
    """How ``Value`` spells it, with ``x``, ``y`` nodes and ``c`` the constant."""
    forward: Callable[[float, float, float], float]
    """``forward(x, y, c)``: the output from argument values and constant."""
    partials: Callable[[float, float, float, float], tuple[float, float]]
    """``partials(x, y, c, out)``: local derivatives w.r.t. ``x`` and ``y``."""
    doc: str
    """One line for the docs and ``GetServerInfo``."""
    vforward: Callable[[Any, Any, float], Any]
    """``forward`` on numpy arrays (one element per input binding)."""
    vpartials: Callable[[Any, Any, float, Any], tuple[Any, Any]]
    """``partials`` on numpy arrays; scalars broadcast."""


_INF = math.inf
_NAN = math.nan


def _div(x: float, y: float) -> float:
    """IEEE division: ``x/0`` is ``±inf`` (by the signs) or ``nan`` for ``0/0``."""
    try:
        return x / y
    except ZeroDivisionError:
        if x != x or x == 0.0:
            return _NAN
        return math.copysign(_INF, x) * math.copysign(1.0, y)


def _pow(x: float, y: float) -> float:
    """IEEE ``pow`` as C and PyTorch compute it (``nan`` for ``(-8)**0.5``)."""
    try:
        r = math.pow(x, y)
    except OverflowError:
        # Only finite x with |x| > 1 (or tiny |x| with y < 0) overflow; the
        # sign is negative only for a negative base raised to an odd integer.
        odd = y == math.floor(y) and math.fmod(y, 2.0) != 0.0
        return -_INF if (x < 0.0 and odd) else _INF
    except ValueError:
        if x == 0.0 and y < 0.0:  # pow(±0, negative): ±inf, sign kept for odd ints
            odd = y == math.floor(y) and math.fmod(y, 2.0) != 0.0
            return math.copysign(_INF, x) if odd else _INF
        return _NAN  # negative base, non-integer exponent
    return r


def _exp(x: float) -> float:
    """``exp`` that overflows to ``inf`` instead of raising."""
    try:
        return math.exp(x)
    except OverflowError:
        return _INF


def _log(x: float) -> float:
    """``log`` with IEEE results: ``-inf`` at 0, ``nan`` below 0."""
    if x > 0.0:
        return math.log(x)
    if x == 0.0:
        return -_INF
    return _NAN  # negative or nan


def _sigmoid(x: float) -> float:
    """Logistic function, written so that neither tail overflows."""
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    if x != x:
        return x
    e = _exp(x)
    return e / (1.0 + e)


def _relu(x: float) -> float:
    """``max(0, x)``, keeping ``nan`` as ``nan`` like PyTorch."""
    return 0.0 if x <= 0.0 else x


def _pow_const_partial(x: float, c: float) -> float:
    """``d x**c / dx``; 0 when ``c == 0`` (PyTorch's convention, not 0*inf)."""
    if c == 0.0:
        return 0.0
    return c * _pow(x, c - 1.0)


def _pow_value_partials(x: float, y: float, out: float) -> tuple[float, float]:
    """Partials of ``x**y`` in both arguments with PyTorch's masking at 0."""
    dx = 0.0 if y == 0.0 else y * _pow(x, y - 1.0)
    dy = 0.0 if (x == 0.0 and y >= 0.0) else out * _log(x)
    return dx, dy


def _np_sigmoid(x: Any) -> Any:
    """Vectorised logistic function, stable in both tails."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _np_pow(x: Any, c: float) -> Any:
    """Vectorised ``x ** c`` for a constant ``c``, exactly as C ``pow`` computes it.

    The exponent is passed as a full array because numpy's ``power`` turns a
    scalar 0.5 into ``sqrt`` (``nan`` for ``-inf``, ``-0.0`` for ``-0.0``)
    and small integers into products, which the scalar form does not.
    """
    return np.power(x, np.full_like(x, c, dtype=np.float64))


def _np_pow_const_partial(x: Any, c: float) -> Any:
    """Vectorised ``d x**c / dx`` (0 when ``c == 0``)."""
    return 0.0 if c == 0.0 else c * _np_pow(x, c - 1.0)


def _np_pow_value_partials(x: Any, y: Any, out: Any) -> tuple[Any, Any]:
    """Vectorised partials of ``x**y`` with the same masking as the scalar form."""
    dx = np.where(y == 0.0, 0.0, y * np.power(x, y - 1.0))
    dy = np.where((x == 0.0) & (y >= 0.0), 0.0, out * np.log(x))
    return dx, dy


def _leaf(x: Any, y: Any, c: float) -> float:
    return c


def _no_partials(x: Any, y: Any, c: float, o: Any) -> tuple[float, float]:
    return 0.0, 0.0


# fmt: off
OPS: tuple[Op, ...] = (
    Op(code=1, name="input", arity=0, uses_value=True, label="", expr="Value(c)",
       doc="A leaf whose value the caller supplies; `value` is its default.",
       forward=_leaf, partials=_no_partials, vforward=_leaf, vpartials=_no_partials),
    Op(code=2, name="const", arity=0, uses_value=True, label="", expr="c",
       doc="A leaf holding the constant `value`.",
       forward=_leaf, partials=_no_partials, vforward=_leaf, vpartials=_no_partials),
    Op(code=3, name="add", arity=2, uses_value=False, label="+", expr="x + y", doc="x + y",
       forward=lambda x, y, c: x + y,
       partials=lambda x, y, c, o: (1.0, 1.0),
       vforward=lambda x, y, c: x + y,
       vpartials=lambda x, y, c, o: (1.0, 1.0)),
    Op(code=4, name="sub", arity=2, uses_value=False, label="-", expr="x - y", doc="x - y",
       forward=lambda x, y, c: x - y,
       partials=lambda x, y, c, o: (1.0, -1.0),
       vforward=lambda x, y, c: x - y,
       vpartials=lambda x, y, c, o: (1.0, -1.0)),
    Op(code=5, name="mul", arity=2, uses_value=False, label="*", expr="x * y", doc="x * y",
       forward=lambda x, y, c: x * y,
       partials=lambda x, y, c, o: (y, x),
       vforward=lambda x, y, c: x * y,
       vpartials=lambda x, y, c, o: (y, x)),
    Op(code=6, name="div", arity=2, uses_value=False, label="/", expr="x / y",
       doc="x / y (IEEE: division by zero gives inf or nan)",
       forward=lambda x, y, c: _div(x, y),
       partials=lambda x, y, c, o: (_div(1.0, y), -_div(o, y)),
       vforward=lambda x, y, c: x / y,
       vpartials=lambda x, y, c, o: (1.0 / y, -(o / y))),
    Op(code=7, name="neg", arity=1, uses_value=False, label="neg", expr="-x", doc="-x",
       forward=lambda x, y, c: -x,
       partials=lambda x, y, c, o: (-1.0, 0.0),
       vforward=lambda x, y, c: -x,
       vpartials=lambda x, y, c, o: (-1.0, 0.0)),
    Op(code=8, name="pow", arity=1, uses_value=True, label="**", expr="x ** c",
       doc="x ** value, a constant exponent (micrograd's `**`)",
       forward=lambda x, y, c: _pow(x, c),
       partials=lambda x, y, c, o: (_pow_const_partial(x, c), 0.0),
       vforward=lambda x, y, c: _np_pow(x, c),
       vpartials=lambda x, y, c, o: (_np_pow_const_partial(x, c), 0.0)),
    Op(code=9, name="pow_value", arity=2, uses_value=False, label="**", expr="x ** y",
       doc="x ** y with both operands nodes",
       forward=lambda x, y, c: _pow(x, y),
       partials=lambda x, y, c, o: _pow_value_partials(x, y, o),
       vforward=lambda x, y, c: np.power(x, y),
       vpartials=lambda x, y, c, o: _np_pow_value_partials(x, y, o)),
    Op(code=10, name="relu", arity=1, uses_value=False, label="ReLU", expr="x.relu()",
       doc="max(0, x); derivative 0 at x = 0",
       forward=lambda x, y, c: _relu(x),
       partials=lambda x, y, c, o: (1.0 if x > 0.0 else 0.0, 0.0),
       vforward=lambda x, y, c: np.where(x > 0.0, x, np.where(x != x, x, 0.0)),
       vpartials=lambda x, y, c, o: ((x > 0.0).astype(np.float64), 0.0)),
    Op(code=11, name="tanh", arity=1, uses_value=False, label="tanh", expr="x.tanh()",
       doc="tanh(x)",
       forward=lambda x, y, c: math.tanh(x),
       partials=lambda x, y, c, o: (1.0 - o * o, 0.0),
       vforward=lambda x, y, c: np.tanh(x),
       vpartials=lambda x, y, c, o: (1.0 - o * o, 0.0)),
    Op(code=12, name="exp", arity=1, uses_value=False, label="exp", expr="x.exp()",
       doc="e ** x (overflow gives inf)",
       forward=lambda x, y, c: _exp(x),
       partials=lambda x, y, c, o: (o, 0.0),
       vforward=lambda x, y, c: np.exp(x),
       vpartials=lambda x, y, c, o: (o, 0.0)),
    Op(code=13, name="log", arity=1, uses_value=False, label="log", expr="x.log()",
       doc="natural log (log 0 = -inf, log of a negative number = nan)",
       forward=lambda x, y, c: _log(x),
       partials=lambda x, y, c, o: (_div(1.0, x), 0.0),
       vforward=lambda x, y, c: np.log(x),
       vpartials=lambda x, y, c, o: (1.0 / x, 0.0)),
    Op(code=14, name="sigmoid", arity=1, uses_value=False, label="sigmoid", expr="x.sigmoid()",
       doc="1 / (1 + e ** -x)",
       forward=lambda x, y, c: _sigmoid(x),
       partials=lambda x, y, c, o: (o * (1.0 - o), 0.0),
       vforward=lambda x, y, c: _np_sigmoid(x),
       vpartials=lambda x, y, c, o: (o * (1.0 - o), 0.0)),
)
# fmt: on

BY_CODE: dict[int, Op] = {op.code: op for op in OPS}
"""Op by wire code."""
BY_NAME: dict[str, Op] = {op.name: op for op in OPS}
"""Op by name."""
MAX_CODE: int = max(BY_CODE)
"""Largest wire code in use; codes run 1..MAX_CODE with no gaps."""

INPUT: Op = BY_NAME["input"]
CONST: Op = BY_NAME["const"]



def check_table(table: Sequence[Op]) -> None:
    """Raise ``ValueError`` unless ``table`` has codes 1..n in order and unique names.

    Kernels index arrays by code, so a gap or a repeat would silently misread ops.
    """
    codes = [op.code for op in table]
    if codes != list(range(1, len(table) + 1)):
        raise ValueError(f"op codes must run 1..{len(table)} in order, got {codes}")
    names = [op.name for op in table]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"op names must be unique; repeated: {', '.join(repeated)}")


check_table(OPS)

ARITY: np.ndarray = np.zeros(MAX_CODE + 1, dtype=np.int8)
"""Arity by wire code, for vectorised checks (index 0, the unused zero value, is 0)."""
USES_VALUE: np.ndarray = np.zeros(MAX_CODE + 1, dtype=bool)
"""Whether a node reads its constant ``value``, by wire code."""
for _op in OPS:
    ARITY[_op.code] = _op.arity
    USES_VALUE[_op.code] = _op.uses_value
del _op
