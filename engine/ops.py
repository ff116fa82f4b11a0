"""The op table: every operation the engine knows, defined once.

Each entry says everything there is to know about one operation: its name,
its stable wire code (the value of ``micrograd.v1.Op``), how many node
arguments it takes, whether it reads the node's constant ``value``, how it
computes forward, its local partial derivatives right beside that, its
second derivatives (for Hessian-vector products), and its domain and kinks
for the docs. ``Value``'s methods, the tape kernels, the protobuf codec,
the native kernel's dispatch list, the docs and the tests all read or are
generated from this table (``scripts/gen-ops``; a test fails when anything
generated is stale or a backend lacks an op).

Arithmetic follows IEEE 754 like PyTorch float64: ``log(-1)`` is ``nan``,
``1/0`` is ``inf``, overflow is ``inf``. Python's own float operators and
``math`` functions raise instead, so the forward functions below catch
those cases and return the IEEE result. (``micrograd.engine.strict`` turns
non-finite results into errors for callers who prefer that.) Derivatives
are PyTorch's formulas, so gradients agree at domain edges too
(``sqrt(0)`` has gradient ``inf``, ``asin(2)`` has ``nan``).

Conventions shared by every entry, so that kernels can treat ops alike:

* ``forward(x, y, c)``: ``x`` and ``y`` are the argument values (0.0 where
  the op takes fewer), ``c`` is the node's constant ``value``.
* ``partials(x, y, c, out)`` returns ``(d out/d x, d out/d y)``; ``out`` is
  the forward result, passed in so derivatives can reuse it.
* ``second(x, y, c, out)`` returns ``(d²/dx², d²/dx dy, d²/dy²)``.
* Ternary ops (``where``) use no constant: their third argument ``z`` takes
  the place of ``c`` (``forward(x, y, z)``), and ``partials`` and
  ``second`` return one entry per argument and per pair
  (``(dx, dy, dz)`` and ``(dxx, dxy, dyy, dxz, dyz, dzz)``).

The numpy twins (``vforward``, ``vpartials``, ``vsecond``) compute the same
over arrays of bindings; an entry that gives none gets the scalar function
applied element by element, so an op is correct in every kernel as soon as
its scalar math is.
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
    "MAX_ARITY",
    "MAX_CODE",
    "OPS",
    "USES_VALUE",
    "Op",
    "check_table",
    "unknown_op",
]

Partials = tuple[float, ...]


@dataclass(frozen=True)
class Op:
    """One operation: identity, shape and math."""

    code: int
    """Stable wire code: the ``micrograd.v1.Op`` enum value. Never reused."""
    name: str
    """Lower-case name used in the APIs, docs and JSON (``"add"``); PyTorch's name."""
    arity: int
    """Number of node arguments (0 for leaves, at most ``MAX_ARITY``)."""
    uses_value: bool
    """Whether the node's constant ``value`` is meaningful for this op."""
    label: str
    """micrograd's ``Value._op`` string for this op (``'+'``, ``'ReLU'``)."""
    expr: str
    """How ``Value`` spells it: ``x``, ``y``, ``z`` the argument nodes, ``c`` the constant.

    ``x.name()`` and ``x.name(y)`` spellings become generated ``Value``
    methods (``scripts/gen-ops``)."""
    forward: Callable[[float, float, float], float]
    """``forward(x, y, c)``: the output from argument values and constant."""
    partials: Callable[[float, float, float, float], Partials]
    """``partials(x, y, c, out)``: local derivatives w.r.t. each argument."""
    second: Callable[[float, float, float, float], Partials]
    """``second(x, y, c, out)``: second derivatives ``(xx, xy, yy)`` (ternary: six)."""
    doc: str
    """One line for the docs and ``GetServerInfo``: what it computes."""
    domain: str = "every real number"
    """Where it is finite, and what it gives at the edges (for the docs)."""
    kinks: str = ""
    """The derivative taken where the op is not differentiable ("" if nowhere)."""
    partials_read: str = "xyo"
    """Which of the argument values (``x``, ``y``) and the output (``o``) ``partials`` reads:
    a batch kernel may drop a value no derivative reads once the forward sweep is past it."""
    vforward: Callable[[Any, Any, Any], Any] = None  # type: ignore[assignment]
    """``forward`` on numpy arrays (one element per input binding); None: element-wise."""
    vpartials: Callable[[Any, Any, Any, Any], tuple[Any, ...]] = None  # type: ignore[assignment]
    """``partials`` on numpy arrays; scalars broadcast. None: element-wise."""
    vsecond: Callable[[Any, Any, Any, Any], tuple[Any, ...]] = None  # type: ignore[assignment]
    """``second`` on numpy arrays. None: element-wise."""

    def __post_init__(self) -> None:
        ternary = self.arity == 3
        if self.vforward is None:
            object.__setattr__(self, "vforward", _elementwise(self.forward, 3, 1))
        if self.vpartials is None:
            n_partials = 3 if ternary else 2
            object.__setattr__(self, "vpartials", _elementwise(self.partials, 4, n_partials))
        if self.vsecond is None:
            n_second = 6 if ternary else 3
            object.__setattr__(self, "vsecond", _elementwise(self.second, 4, n_second))


def _elementwise(fn: Callable[..., Any], inputs: int, outputs: int) -> Callable[..., Any]:
    """``fn`` applied element by element over broadcast numpy arguments (float64 results)."""
    ufunc = np.frompyfunc(fn, inputs, outputs)

    def apply(*args: Any) -> Any:
        result = ufunc(*args)
        if outputs == 1:
            return np.asarray(result, dtype=np.float64)
        return tuple(np.asarray(r, dtype=np.float64) for r in result)

    return apply


_INF = math.inf
_NAN = math.nan
_LN2 = 0.6931471805599453
_LN10 = 2.302585092994046
_TWO_OVER_SQRT_PI = 1.1283791670955126
_SOFTPLUS_THRESHOLD = 20.0  # PyTorch's default: softplus(x) = x above it


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


def _log_base(fn: Callable[[float], float]) -> Callable[[float], float]:
    """``log2``/``log10`` with IEEE results: ``-inf`` at 0, ``nan`` below 0."""

    def log_base(x: float) -> float:
        if x > 0.0:
            return fn(x)
        return -_INF if x == 0.0 else _NAN

    return log_base


_log2 = _log_base(math.log2)
_log10 = _log_base(math.log10)


def _log1p(x: float) -> float:
    """``log(1 + x)`` accurate near 0: ``-inf`` at -1, ``nan`` below."""
    if x > -1.0:
        return math.log1p(x)
    return -_INF if x == -1.0 else _NAN


def _sqrt(x: float) -> float:
    """IEEE square root: ``sqrt(-0.0)`` is ``-0.0``, negative numbers give ``nan``."""
    return math.sqrt(x) if x >= 0.0 or x != x else _NAN


def _rsqrt(x: float) -> float:
    """``1 / sqrt(x)`` with IEEE results (``inf`` at +0, ``-inf`` at -0, ``nan`` below 0)."""
    if x > 0.0:
        return 1.0 / math.sqrt(x)
    if x == 0.0:
        return math.copysign(_INF, x)
    return _NAN


def _periodic(fn: Callable[[float], float]) -> Callable[[float], float]:
    """``sin``/``cos``/``tan`` that give ``nan`` at ``±inf`` instead of raising."""

    def periodic(x: float) -> float:
        return fn(x) if math.isfinite(x) else _NAN

    return periodic


_sin, _cos, _tan = _periodic(math.sin), _periodic(math.cos), _periodic(math.tan)


def _inverse_trig(fn: Callable[[float], float]) -> Callable[[float], float]:
    """``asin``/``acos``: ``nan`` outside ``[-1, 1]`` instead of raising."""

    def inverse(x: float) -> float:
        return fn(x) if -1.0 <= x <= 1.0 else _NAN

    return inverse


_asin, _acos = _inverse_trig(math.asin), _inverse_trig(math.acos)


def _overflowing(fn: Callable[[float], float]) -> Callable[[float], float]:
    """``sinh``/``cosh``/``expm1`` that overflow to ``±inf`` instead of raising."""

    def overflowing(x: float) -> float:
        try:
            return fn(x)
        except OverflowError:
            return math.copysign(_INF, fn(math.copysign(1.0, x)))

    return overflowing


_sinh, _cosh, _expm1 = _overflowing(math.sinh), _overflowing(math.cosh), _overflowing(math.expm1)


def _acosh(x: float) -> float:
    """``acosh``: ``nan`` below 1."""
    return math.acosh(x) if x >= 1.0 else _NAN


def _atanh(x: float) -> float:
    """``atanh``: ``±inf`` at ``±1``, ``nan`` beyond."""
    if -1.0 < x < 1.0:
        return math.atanh(x)
    if x == 1.0 or x == -1.0:
        return math.copysign(_INF, x)
    return _NAN


def _sign(x: float) -> float:
    """-1, 0 or 1 by the sign of ``x``; 0 for ±0 and for ``nan``, as ``torch.sign``."""
    if x > 0.0:
        return 1.0
    return -1.0 if x < 0.0 else 0.0


def _rounding(fn: Callable[[float], int]) -> Callable[[float], float]:
    """``floor``/``ceil`` over floats: infinities and nan pass through, zeros keep their sign."""

    def rounding(x: float) -> float:
        if not math.isfinite(x):
            return x
        return math.copysign(float(fn(x)), x)

    return rounding


_floor, _ceil = _rounding(math.floor), _rounding(math.ceil)


def _softplus(x: float) -> float:
    """``log(1 + e ** x)``, and ``x`` itself above PyTorch's threshold 20."""
    if x > _SOFTPLUS_THRESHOLD:
        return x
    return math.log1p(_exp(x)) if x == x else x


def _softplus_slope(x: float) -> float:
    """``d softplus / dx``: ``e**x / (e**x + 1)``, exactly 1 above the threshold (as PyTorch)."""
    if x > _SOFTPLUS_THRESHOLD:
        return 1.0
    z = _exp(x)
    return z / (z + 1.0)


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


def _atan2(x: float, y: float) -> float:
    """The angle of the point ``(y, x)``, ``torch.atan2(x, y)``; IEEE at infinities."""
    return math.atan2(x, y)


def _atan2_recip(x: float, y: float) -> float:
    """``1 / (x² + y²)``, taken as 0 at the origin (where PyTorch's atan2 gradient is 0)."""
    r = x * x + y * y
    return 0.0 if r == 0.0 else 1.0 / r


def _atan2_partials(x: float, y: float) -> Partials:
    """PyTorch's ``(y / (x² + y²), -x / (x² + y²))``, ``(0, -0)`` at the origin."""
    recip = _atan2_recip(x, y)
    return y * recip, -x * recip


def _atan2_second(x: float, y: float) -> Partials:
    """Second derivatives of ``atan2(x, y)``: ``(-2xy, x² - y², 2xy) / (x² + y²)²``."""
    recip = _atan2_recip(x, y)
    r2 = recip * recip
    return -2.0 * x * y * r2, (x * x - y * y) * r2, 2.0 * x * y * r2


def _maximum(x: float, y: float) -> float:
    """The larger of ``x`` and ``y``; ``nan`` if either is."""
    if x != x or y != y:
        return _NAN
    return x if x >= y else y


def _minimum(x: float, y: float) -> float:
    """The smaller of ``x`` and ``y``; ``nan`` if either is."""
    if x != x or y != y:
        return _NAN
    return x if x <= y else y


def _max_partials(x: float, y: float) -> Partials:
    """PyTorch's rule: all to the larger side, half each on a tie (and all to both at nan)."""
    if x == y:
        return 0.5, 0.5
    return (0.0 if x < y else 1.0), (0.0 if x > y else 1.0)


def _min_partials(x: float, y: float) -> Partials:
    """As ``_max_partials`` for the smaller side."""
    if x == y:
        return 0.5, 0.5
    return (0.0 if x > y else 1.0), (0.0 if x < y else 1.0)


def _pow_const_partial(x: float, c: float) -> float:
    """``d x**c / dx``; 0 when ``c == 0`` (PyTorch's convention, not 0*inf)."""
    if c == 0.0:
        return 0.0
    return c * _pow(x, c - 1.0)


def _pow_const_second(x: float, c: float) -> float:
    """``d² x**c / dx²``; 0 when ``c`` is 0 or 1."""
    if c == 0.0 or c == 1.0:
        return 0.0
    return c * (c - 1.0) * _pow(x, c - 2.0)


def _pow_value_partials(x: float, y: float, out: float) -> Partials:
    """Partials of ``x**y`` in both arguments with PyTorch's masking at 0."""
    dx = 0.0 if y == 0.0 else y * _pow(x, y - 1.0)
    dy = 0.0 if (x == 0.0 and y >= 0.0) else out * _log(x)
    return dx, dy


def _pow_value_second(x: float, y: float, out: float) -> Partials:
    """Second derivatives of ``x**y``: y(y-1)x^(y-2), x^(y-1)(1 + y log x), x^y log²x."""
    lx = _log(x)
    dxx = 0.0 if (y == 0.0 or y == 1.0) else y * (y - 1.0) * _pow(x, y - 2.0)
    dxy = 0.0 if (x == 0.0 and y >= 1.0) else _pow(x, y - 1.0) * (1.0 + y * lx)
    dyy = 0.0 if (x == 0.0 and y >= 0.0) else out * lx * lx
    return dxx, dxy, dyy


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


def _none(x: Any, y: Any, c: Any, o: Any) -> Partials:
    return 0.0, 0.0


def _flat(x: Any, y: Any, c: Any, o: Any) -> Partials:
    """Second derivatives of an op that is linear (or piecewise constant) in each argument."""
    return 0.0, 0.0, 0.0


def _where_partials(x: float, y: float, z: float, o: float) -> Partials:
    """The gradient goes to the chosen branch only, none to the condition."""
    return (0.0, 1.0, 0.0) if x > 0.0 else (0.0, 0.0, 1.0)


def _where_second(x: float, y: float, z: float, o: float) -> Partials:
    return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0


UnaryRule = Callable[[float, float], float]
Rule = Callable[[float, float, float, float], Partials]


def _unary(f1: UnaryRule) -> Rule:
    """A unary op's partials from ``f1(x, out)``: ``(f1, 0)``."""
    return lambda x, y, c, o: (f1(x, o), 0.0)


def _unary2(f2: UnaryRule) -> Rule:
    """A unary op's second derivatives from ``f2(x, out)``: ``(f2, 0, 0)``."""
    return lambda x, y, c, o: (f2(x, o), 0.0, 0.0)


def _asin_d(x: float, o: float) -> float:
    return _rsqrt(-x * x + 1.0)


def _asin_dd(x: float, o: float) -> float:
    r = _rsqrt(-x * x + 1.0)
    return x * r * r * r


def _acosh_d(x: float, o: float) -> float:
    return _rsqrt(x * x - 1.0)


def _acosh_dd(x: float, o: float) -> float:
    r = _rsqrt(x * x - 1.0)
    return -x * r * r * r


def _asinh_d(x: float, o: float) -> float:
    return _rsqrt(x * x + 1.0)


def _asinh_dd(x: float, o: float) -> float:
    r = _rsqrt(x * x + 1.0)
    return -x * r * r * r


def _atanh_d(x: float, o: float) -> float:
    return _div(1.0, 1.0 - x * x)


def _atanh_dd(x: float, o: float) -> float:
    r = _div(1.0, 1.0 - x * x)
    return 2.0 * x * r * r


def _atan_dd(x: float, o: float) -> float:
    r = _div(1.0, x * x + 1.0)
    return -2.0 * x * r * r


def _erf_d(x: float, o: float) -> float:
    return _TWO_OVER_SQRT_PI * _exp(-(x * x))


def _sqrt_dd(x: float, o: float) -> float:
    return _div(-1.0, 4.0 * o * o * o)


def _softplus_dd(x: float, o: float) -> float:
    if x > _SOFTPLUS_THRESHOLD:
        return 0.0
    s = _softplus_slope(x)
    return s * (1.0 - s)


# fmt: off
OPS: tuple[Op, ...] = (
    Op(code=1, name="input", arity=0, uses_value=True, label="", expr="Value(c)",
       doc="A leaf whose value the caller supplies; `value` is its default.",
       forward=_leaf, partials=_none, second=_flat, vforward=_leaf, vpartials=_none),
    Op(code=2, name="const", arity=0, uses_value=True, label="", expr="c",
       doc="A leaf holding the constant `value`.",
       forward=_leaf, partials=_none, second=_flat, vforward=_leaf, vpartials=_none),
    Op(code=3, name="add", arity=2, uses_value=False, label="+", expr="x + y", doc="x + y",
       partials_read="",
       forward=lambda x, y, c: x + y,
       partials=lambda x, y, c, o: (1.0, 1.0),
       second=_flat,
       vforward=lambda x, y, c: x + y,
       vpartials=lambda x, y, c, o: (1.0, 1.0)),
    Op(code=4, name="sub", arity=2, uses_value=False, label="-", expr="x - y", doc="x - y",
       partials_read="",
       forward=lambda x, y, c: x - y,
       partials=lambda x, y, c, o: (1.0, -1.0),
       second=_flat,
       vforward=lambda x, y, c: x - y,
       vpartials=lambda x, y, c, o: (1.0, -1.0)),
    Op(code=5, name="mul", arity=2, uses_value=False, label="*", expr="x * y", doc="x * y",
       partials_read="xy",
       forward=lambda x, y, c: x * y,
       partials=lambda x, y, c, o: (y, x),
       second=lambda x, y, c, o: (0.0, 1.0, 0.0),
       vforward=lambda x, y, c: x * y,
       vpartials=lambda x, y, c, o: (y, x)),
    Op(code=6, name="div", arity=2, uses_value=False, label="/", expr="x / y",
       doc="x / y (IEEE: division by zero gives inf or nan)",
       domain="y ≠ 0; x/0 is ±inf, 0/0 is nan",
       partials_read="yo",
       forward=lambda x, y, c: _div(x, y),
       partials=lambda x, y, c, o: (_div(1.0, y), -_div(o, y)),
       second=lambda x, y, c, o: (0.0, -_div(_div(1.0, y), y), 2.0 * _div(_div(o, y), y)),
       vforward=lambda x, y, c: x / y,
       vpartials=lambda x, y, c, o: (1.0 / y, -(o / y))),
    Op(code=7, name="neg", arity=1, uses_value=False, label="neg", expr="-x", doc="-x",
       partials_read="",
       forward=lambda x, y, c: -x,
       partials=lambda x, y, c, o: (-1.0, 0.0),
       second=_flat,
       vforward=lambda x, y, c: -x,
       vpartials=lambda x, y, c, o: (-1.0, 0.0)),
    Op(code=8, name="pow", arity=1, uses_value=True, label="**", expr="x ** c",
       doc="x ** value, a constant exponent (micrograd's `**`)",
       domain="C `pow`: a negative x with a fractional exponent is nan; 0 ** negative is inf",
       kinks="d/dx is 0 when the exponent is 0 (also at x = 0)",
       forward=lambda x, y, c: _pow(x, c),
       partials=lambda x, y, c, o: (_pow_const_partial(x, c), 0.0),
       second=lambda x, y, c, o: (_pow_const_second(x, c), 0.0, 0.0),
       vforward=lambda x, y, c: _np_pow(x, c),
       vpartials=lambda x, y, c, o: (_np_pow_const_partial(x, c), 0.0)),
    Op(code=9, name="pow_value", arity=2, uses_value=False, label="**", expr="x ** y",
       doc="x ** y with both operands nodes",
       domain="as `pow`; d/dy needs x > 0 (log x)",
       kinks="d/dx is 0 when y = 0; d/dy is 0 when x = 0 and y ≥ 0 (PyTorch's masking)",
       forward=lambda x, y, c: _pow(x, y),
       partials=lambda x, y, c, o: _pow_value_partials(x, y, o),
       second=lambda x, y, c, o: _pow_value_second(x, y, o),
       vforward=lambda x, y, c: np.power(x, y),
       vpartials=lambda x, y, c, o: _np_pow_value_partials(x, y, o)),
    Op(code=10, name="relu", arity=1, uses_value=False, label="ReLU", expr="x.relu()",
       doc="max(0, x)", kinks="0 at x = 0 (and at nan)",
       partials_read="x",
       forward=lambda x, y, c: _relu(x),
       partials=lambda x, y, c, o: (1.0 if x > 0.0 else 0.0, 0.0),
       second=_flat,
       vforward=lambda x, y, c: np.where(x > 0.0, x, np.where(x != x, x, 0.0)),
       vpartials=lambda x, y, c, o: ((x > 0.0).astype(np.float64), 0.0)),
    Op(code=11, name="tanh", arity=1, uses_value=False, label="tanh", expr="x.tanh()",
       doc="tanh(x)",
       partials_read="o",
       forward=lambda x, y, c: math.tanh(x),
       partials=lambda x, y, c, o: (1.0 - o * o, 0.0),
       second=lambda x, y, c, o: (-2.0 * o * (1.0 - o * o), 0.0, 0.0),
       vforward=lambda x, y, c: np.tanh(x),
       vpartials=lambda x, y, c, o: (1.0 - o * o, 0.0)),
    Op(code=12, name="exp", arity=1, uses_value=False, label="exp", expr="x.exp()",
       doc="e ** x", domain="every real number; overflow (x > 709.78) gives inf",
       partials_read="o",
       forward=lambda x, y, c: _exp(x),
       partials=lambda x, y, c, o: (o, 0.0),
       second=lambda x, y, c, o: (o, 0.0, 0.0),
       vforward=lambda x, y, c: np.exp(x),
       vpartials=lambda x, y, c, o: (o, 0.0)),
    Op(code=13, name="log", arity=1, uses_value=False, label="log", expr="x.log()",
       doc="natural logarithm", domain="x > 0; log 0 = -inf, x < 0 gives nan",
       partials_read="x",
       forward=lambda x, y, c: _log(x),
       partials=lambda x, y, c, o: (_div(1.0, x), 0.0),
       second=lambda x, y, c, o: (-_div(_div(1.0, x), x), 0.0, 0.0),
       vforward=lambda x, y, c: np.log(x),
       vpartials=lambda x, y, c, o: (1.0 / x, 0.0)),
    Op(code=14, name="sigmoid", arity=1, uses_value=False, label="sigmoid", expr="x.sigmoid()",
       doc="1 / (1 + e ** -x)",
       partials_read="o",
       forward=lambda x, y, c: _sigmoid(x),
       partials=lambda x, y, c, o: (o * (1.0 - o), 0.0),
       second=lambda x, y, c, o: (o * (1.0 - o) * (1.0 - 2.0 * o), 0.0, 0.0),
       vforward=lambda x, y, c: _np_sigmoid(x),
       vpartials=lambda x, y, c, o: (o * (1.0 - o), 0.0)),
    Op(code=15, name="sin", arity=1, uses_value=False, label="sin", expr="x.sin()",
       doc="sin(x)", domain="every finite number; ±inf gives nan",
       forward=lambda x, y, c: _sin(x),
       partials=_unary(lambda x, o: _cos(x)),
       second=_unary2(lambda x, o: -o)),
    Op(code=16, name="cos", arity=1, uses_value=False, label="cos", expr="x.cos()",
       doc="cos(x)", domain="every finite number; ±inf gives nan",
       forward=lambda x, y, c: _cos(x),
       partials=_unary(lambda x, o: -_sin(x)),
       second=_unary2(lambda x, o: -o)),
    Op(code=17, name="tan", arity=1, uses_value=False, label="tan", expr="x.tan()",
       doc="tan(x)", domain="every finite number (no float is exactly a pole); ±inf gives nan",
       forward=lambda x, y, c: _tan(x),
       partials=_unary(lambda x, o: 1.0 + o * o),
       second=_unary2(lambda x, o: 2.0 * o * (1.0 + o * o))),
    Op(code=18, name="asin", arity=1, uses_value=False, label="asin", expr="x.asin()",
       doc="arcsine, in [-π/2, π/2]",
       domain="-1 ≤ x ≤ 1, nan outside; d/dx = 1/√(1 - x²) is inf at ±1",
       forward=lambda x, y, c: _asin(x),
       partials=_unary(_asin_d),
       second=_unary2(_asin_dd)),
    Op(code=19, name="acos", arity=1, uses_value=False, label="acos", expr="x.acos()",
       doc="arccosine, in [0, π]",
       domain="-1 ≤ x ≤ 1, nan outside; d/dx = -1/√(1 - x²) is -inf at ±1",
       forward=lambda x, y, c: _acos(x),
       partials=_unary(lambda x, o: -_asin_d(x, o)),
       second=_unary2(lambda x, o: -_asin_dd(x, o))),
    Op(code=20, name="atan", arity=1, uses_value=False, label="atan", expr="x.atan()",
       doc="arctangent, in (-π/2, π/2)",
       forward=lambda x, y, c: math.atan(x),
       partials=_unary(lambda x, o: _div(1.0, x * x + 1.0)),
       second=_unary2(_atan_dd)),
    Op(code=21, name="sinh", arity=1, uses_value=False, label="sinh", expr="x.sinh()",
       doc="hyperbolic sine", domain="every real number; |x| > 710.4 overflows to ±inf",
       forward=lambda x, y, c: _sinh(x),
       partials=_unary(lambda x, o: _cosh(x)),
       second=_unary2(lambda x, o: o)),
    Op(code=22, name="cosh", arity=1, uses_value=False, label="cosh", expr="x.cosh()",
       doc="hyperbolic cosine", domain="every real number; |x| > 710.4 overflows to inf",
       forward=lambda x, y, c: _cosh(x),
       partials=_unary(lambda x, o: _sinh(x)),
       second=_unary2(lambda x, o: o)),
    Op(code=23, name="asinh", arity=1, uses_value=False, label="asinh", expr="x.asinh()",
       doc="inverse hyperbolic sine",
       forward=lambda x, y, c: math.asinh(x),
       partials=_unary(_asinh_d),
       second=_unary2(_asinh_dd)),
    Op(code=24, name="acosh", arity=1, uses_value=False, label="acosh", expr="x.acosh()",
       doc="inverse hyperbolic cosine, ≥ 0",
       domain="x ≥ 1, nan below; d/dx = 1/√(x² - 1) is inf at 1",
       forward=lambda x, y, c: _acosh(x),
       partials=_unary(_acosh_d),
       second=_unary2(_acosh_dd)),
    Op(code=25, name="atanh", arity=1, uses_value=False, label="atanh", expr="x.atanh()",
       doc="inverse hyperbolic tangent",
       domain="-1 < x < 1; ±1 gives ±inf (d/dx inf), beyond is nan",
       forward=lambda x, y, c: _atanh(x),
       partials=_unary(_atanh_d),
       second=_unary2(_atanh_dd)),
    Op(code=26, name="sqrt", arity=1, uses_value=False, label="sqrt", expr="x.sqrt()",
       doc="square root",
       domain="x ≥ 0, nan below; sqrt(-0) = -0; d/dx = 1/(2√x) is inf at 0 (-inf at -0)",
       forward=lambda x, y, c: _sqrt(x),
       partials=_unary(lambda x, o: _div(1.0, 2.0 * o)),
       second=_unary2(_sqrt_dd)),
    Op(code=27, name="abs", arity=1, uses_value=False, label="abs", expr="x.abs()",
       doc="|x| (also the builtin `abs(v)`)", kinks="0 at x = 0 and at nan (PyTorch's sgn)",
       forward=lambda x, y, c: abs(x),
       partials=_unary(lambda x, o: _sign(x)),
       second=_flat),
    Op(code=28, name="log1p", arity=1, uses_value=False, label="log1p", expr="x.log1p()",
       doc="log(1 + x), accurate for small x",
       domain="x > -1; -1 gives -inf, below is nan",
       forward=lambda x, y, c: _log1p(x),
       partials=_unary(lambda x, o: _div(1.0, x + 1.0)),
       second=_unary2(lambda x, o: -_div(_div(1.0, x + 1.0), x + 1.0))),
    Op(code=29, name="expm1", arity=1, uses_value=False, label="expm1", expr="x.expm1()",
       doc="e ** x - 1, accurate for small x",
       domain="every real number; overflow (x > 709.78) gives inf",
       forward=lambda x, y, c: _expm1(x),
       partials=_unary(lambda x, o: o + 1.0),
       second=_unary2(lambda x, o: o + 1.0)),
    Op(code=30, name="log2", arity=1, uses_value=False, label="log2", expr="x.log2()",
       doc="base-2 logarithm", domain="x > 0; 0 gives -inf, x < 0 gives nan",
       forward=lambda x, y, c: _log2(x),
       partials=_unary(lambda x, o: _div(1.0, x * _LN2)),
       second=_unary2(lambda x, o: -_div(_div(1.0, x * _LN2), x))),
    Op(code=31, name="log10", arity=1, uses_value=False, label="log10", expr="x.log10()",
       doc="base-10 logarithm", domain="x > 0; 0 gives -inf, x < 0 gives nan",
       forward=lambda x, y, c: _log10(x),
       partials=_unary(lambda x, o: _div(1.0, x * _LN10)),
       second=_unary2(lambda x, o: -_div(_div(1.0, x * _LN10), x))),
    Op(code=32, name="erf", arity=1, uses_value=False, label="erf", expr="x.erf()",
       doc="the error function 2/√π ∫₀ˣ e^(-t²) dt",
       forward=lambda x, y, c: math.erf(x),
       partials=_unary(_erf_d),
       second=_unary2(lambda x, o: -2.0 * x * _erf_d(x, o))),
    Op(code=33, name="softplus", arity=1, uses_value=False, label="softplus",
       expr="x.softplus()",
       doc="log(1 + e ** x); x itself above 20 (PyTorch's threshold)",
       kinks="above 20 the value is x and d/dx is 1 (a step of < 2.1e-9 at 20, as PyTorch)",
       forward=lambda x, y, c: _softplus(x),
       partials=_unary(lambda x, o: _softplus_slope(x)),
       second=_unary2(_softplus_dd)),
    Op(code=34, name="floor", arity=1, uses_value=False, label="floor", expr="x.floor()",
       doc="the largest integer ≤ x", kinks="derivative 0 everywhere, also at the integers",
       forward=lambda x, y, c: _floor(x),
       partials=_none, second=_flat),
    Op(code=35, name="ceil", arity=1, uses_value=False, label="ceil", expr="x.ceil()",
       doc="the smallest integer ≥ x", kinks="derivative 0 everywhere, also at the integers",
       forward=lambda x, y, c: _ceil(x),
       partials=_none, second=_flat),
    Op(code=36, name="sign", arity=1, uses_value=False, label="sign", expr="x.sign()",
       doc="-1, 0 or 1 by the sign of x (0 for nan, as torch.sign)",
       kinks="derivative 0 everywhere, also at 0",
       forward=lambda x, y, c: _sign(x),
       partials=_none, second=_flat),
    Op(code=37, name="atan2", arity=2, uses_value=False, label="atan2", expr="x.atan2(y)",
       doc="the angle of the point (y, x) in (-π, π], as torch.atan2(x, y)",
       domain="every pair; at (0, 0) the value is ±0 or ±π by the zeros' signs",
       kinks="0 at (0, 0); elsewhere PyTorch's y/(x² + y²) and -x/(x² + y²)",
       forward=lambda x, y, c: _atan2(x, y),
       partials=lambda x, y, c, o: _atan2_partials(x, y),
       second=lambda x, y, c, o: _atan2_second(x, y)),
    Op(code=38, name="maximum", arity=2, uses_value=False, label="maximum",
       expr="x.maximum(y)",
       doc="the larger of x and y (nan if either is)",
       kinks="a tie x = y sends half the gradient to each side (PyTorch's rule)",
       forward=lambda x, y, c: _maximum(x, y),
       partials=lambda x, y, c, o: _max_partials(x, y),
       second=_flat),
    Op(code=39, name="minimum", arity=2, uses_value=False, label="minimum",
       expr="x.minimum(y)",
       doc="the smaller of x and y (nan if either is)",
       kinks="a tie x = y sends half the gradient to each side (PyTorch's rule)",
       forward=lambda x, y, c: _minimum(x, y),
       partials=lambda x, y, c, o: _min_partials(x, y),
       second=_flat),
    Op(code=40, name="where", arity=3, uses_value=False, label="where", expr="where(x, y, z)",
       doc="y where x > 0, else z (x is the condition; a nan condition picks z)",
       kinks="the gradient flows into the chosen branch only, none into the condition",
       forward=lambda x, y, z: y if x > 0.0 else z,
       partials=_where_partials,
       second=_where_second),
)
# fmt: on

BY_CODE: dict[int, Op] = {op.code: op for op in OPS}
"""Op by wire code."""
BY_NAME: dict[str, Op] = {op.name: op for op in OPS}
"""Op by name."""
MAX_CODE: int = max(BY_CODE)
"""Largest wire code in use; codes run 1..MAX_CODE with no gaps."""


def unknown_op(code: int) -> str:
    """The one message for an op code outside the table, used by every decoder and kernel.

    The C decoders and sweeps format the same words (``_kernel*.c``); a test holds them equal.
    """
    unset = " (OP_UNSPECIFIED, the unset value)" if code == 0 else ""
    return f"unknown op {code}{unset}; known ops are 1..{MAX_CODE}"


MAX_ARITY: int = max(op.arity for op in OPS)
"""Most node arguments any op takes (the tape's argument columns)."""

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
