"""``Value``: a scalar that remembers how it was computed, micrograd-style.

Every arithmetic operator builds a new node of the expression graph;
``backward()`` then runs the chain rule from that node back to the leaves
and leaves ``d(out)/d(node)`` in every node's ``grad``. The math of each
operation lives in the op table (``micrograd.ops``); this class only wires
the table into Python's operators.

Differences from micrograd 0.1.0, all deliberate:

* ``backward()`` is iterative, so graphs of any depth work under Python's
  default recursion limit, and it visits nodes in a fixed order, so the
  same graph gives bit-identical gradients on every run.
* Nodes hold their arguments in slots instead of closures: no reference
  cycles, so the garbage collector has little to do, and far less memory.
* Calling ``backward()`` again resets the gradients of interior nodes and
  *adds* to the gradients of leaves (as PyTorch does), instead of
  micrograd's doubling of stale interior gradients. Call ``zero_grad``
  (``Module.zero_grad`` or by hand) between steps, as with micrograd.
* ``a - b`` and ``a / b`` are single nodes (``'-'``, ``'/'``), not
  ``a + (-b)`` and ``a * b**-1``: fewer nodes and one rounding fewer.
* Math follows IEEE 754: ``Value(-1).log()`` is ``nan``, ``Value(1) / 0`` is
  ``inf``. Inside ``with strict():`` any non-finite result raises
  ``FloatingPointError`` instead, naming the operation and its operands.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from . import ops as _ops

__all__ = ["Value", "strict", "topological_order"]

Number = int | float

_STRICT: ContextVar[bool] = ContextVar("micrograd_strict", default=False)
"""Whether strict mode is on in this thread or asyncio task (a context variable, so a block
in one thread or task never changes what another computes)."""


@contextmanager
def strict() -> Iterator[None]:
    """Within this block, a non-finite forward value or gradient raises ``FloatingPointError``.

    Only this thread (or asyncio task) is affected: others keep IEEE semantics.
    """
    token = _STRICT.set(True)
    try:
        yield
    finally:
        _STRICT.reset(token)


def _check(op: _ops.Op, out: float, x: float, y: float, c: float) -> None:
    """Raise in strict mode when ``op`` produced a non-finite number."""
    if not math.isfinite(out):
        args = {0: f"value={c!r}", 1: f"x={x!r}", 2: f"x={x!r}, y={y!r}"}[op.arity]
        if op.uses_value and op.arity:
            args += f", exponent={c!r}"
        raise FloatingPointError(f"{op.name}({args}) = {out!r} (strict mode)")


# Per-code lookups, read on every node.
try:  # the C reverse sweep, when the extension is built (same operations, same order)
    from ._kernel import value_backward as _native_backward
except ImportError:  # pragma: no cover - pure-Python installs
    _native_backward = None  # type: ignore[assignment]
_ARITY_BYTES = bytes(
    _ops.BY_CODE[k].arity if k in _ops.BY_CODE else 255 for k in range(_ops.MAX_CODE + 1)
)
"""Per-code arity (255: no op), the table the native walks check nodes against."""

_FORWARD = {op.code: op.forward for op in _ops.OPS}
_PARTIALS = {op.code: op.partials for op in _ops.OPS}
_INPUT = _ops.INPUT.code
_CONST = _ops.CONST.code
_ADD, _SUB, _MUL, _DIV, _NEG = (_ops.BY_NAME[n].code for n in ("add", "sub", "mul", "div", "neg"))
_POW, _POW_VALUE = _ops.BY_NAME["pow"].code, _ops.BY_NAME["pow_value"].code
_RELU, _TANH, _EXP, _LOG, _SIGMOID = (
    _ops.BY_NAME[n].code for n in ("relu", "tanh", "exp", "log", "sigmoid")
)


class Value:
    """A scalar node of an expression graph, with its value and gradient."""

    __slots__ = ("_a", "_b", "_c", "_code", "data", "grad")

    def __init__(self, data: Number, _children: tuple[Value, ...] = (), _op: str = "") -> None:
        """A leaf holding ``data`` (micrograd's ``_children``/``_op`` are accepted only empty)."""
        if _children or _op:
            raise TypeError(
                "Value(data, _children, _op) is not supported: operations are defined "
                "in the op table (micrograd.ops); build nodes with operators instead"
            )
        self.data: float = float(data)
        self.grad: float = 0.0
        self._a: Value | None = None
        self._b: Value | None = None
        self._code: int = _INPUT
        self._c: float = 0.0

    # -- graph structure -------------------------------------------------

    @property
    def _prev(self) -> set[Value]:
        """The set of this node's arguments, as in micrograd."""
        return {v for v in (self._a, self._b) if v is not None}

    @property
    def _op(self) -> str:
        """micrograd's label of the op that made this node (``''`` for a leaf)."""
        op = _ops.BY_CODE[self._code]
        if op.name == "pow":
            return f"**{_number_label(self._c)}"
        return op.label

    @property
    def op(self) -> _ops.Op:
        """The op-table entry of the operation that made this node."""
        return _ops.BY_CODE[self._code]

    def __repr__(self) -> str:
        return f"Value(data={self.data}, grad={self.grad})"

    # -- operators, every one a table lookup ------------------------------

    def __add__(self, other: Value | Number) -> Value:
        return _node(_ADD, self, _lift(other))

    def __radd__(self, other: Number) -> Value:
        return _node(_ADD, _lift(other), self)

    def __sub__(self, other: Value | Number) -> Value:
        return _node(_SUB, self, _lift(other))

    def __rsub__(self, other: Number) -> Value:
        return _node(_SUB, _lift(other), self)

    def __mul__(self, other: Value | Number) -> Value:
        return _node(_MUL, self, _lift(other))

    def __rmul__(self, other: Number) -> Value:
        return _node(_MUL, _lift(other), self)

    def __truediv__(self, other: Value | Number) -> Value:
        return _node(_DIV, self, _lift(other))

    def __rtruediv__(self, other: Number) -> Value:
        return _node(_DIV, _lift(other), self)

    def __neg__(self) -> Value:
        return _node(_NEG, self, None)

    def __pow__(self, other: Value | Number) -> Value:
        if isinstance(other, Value):
            return _node(_POW_VALUE, self, other)
        if not isinstance(other, (int, float)):
            return NotImplemented
        return _node(_POW, self, None, float(other))

    def __rpow__(self, other: Number) -> Value:
        return _node(_POW_VALUE, _lift(other), self)

    def relu(self) -> Value:
        """``max(0, self)``."""
        return _node(_RELU, self, None)

    def tanh(self) -> Value:
        """Hyperbolic tangent."""
        return _node(_TANH, self, None)

    def exp(self) -> Value:
        """``e ** self``."""
        return _node(_EXP, self, None)

    def log(self) -> Value:
        """Natural logarithm (``nan`` below zero, ``-inf`` at zero)."""
        return _node(_LOG, self, None)

    def sigmoid(self) -> Value:
        """Logistic sigmoid ``1 / (1 + e ** -self)``."""
        return _node(_SIGMOID, self, None)

    # -- reverse mode -----------------------------------------------------

    def backward(self) -> None:
        """Fill every reachable node's ``grad`` with ``d(self)/d(node)``.

        Interior nodes get this pass's gradient; leaves (inputs, constants)
        accumulate into what they held, so call ``zero_grad`` between steps.
        Runs on the native reverse sweep when the extension is built (outside
        ``strict()``), with the same operations in the same order.
        """
        native = _native_backward is not None and not _STRICT.get()
        if native and _native_backward(self, _ARITY_BYTES):
            return
        order = topological_order(self)
        for v in order:
            if v._a is not None:
                v.grad = 0.0
        self.grad = 1.0 if self._a is not None else self.grad + 1.0
        partials = _PARTIALS
        for v in reversed(order):
            a = v._a
            if a is None:
                continue
            g = v.grad
            b = v._b
            if b is None:
                da, _ = partials[v._code](a.data, 0.0, v._c, v.data)
                a.grad += da * g
            else:
                da, db = partials[v._code](a.data, b.data, v._c, v.data)
                a.grad += da * g
                b.grad += db * g
        if _STRICT.get():
            _check_gradients(order)


def _check_gradients(order: list[Value]) -> None:
    """Strict mode: raise naming the op whose backward step first made a gradient non-finite.

    Walks from the output back, as ``backward`` did, re-deriving each node's
    local derivatives; only when every contribution was finite but a sum
    overflowed does it fall back to naming the node whose gradient is not finite.
    """
    for v in reversed(order):
        a = v._a
        if a is None or not math.isfinite(v.grad):
            continue
        b = v._b
        y = 0.0 if b is None else b.data
        da, db = _PARTIALS[v._code](a.data, y, v._c, v.data)  # type: ignore[misc]
        for name, d in (("x", da), ("y", db)):
            if not math.isfinite(d * v.grad):
                op = v.op
                args = f"x={a.data!r}" if b is None else f"x={a.data!r}, y={y!r}"
                if op.uses_value:
                    args += f", exponent={v._c!r}"
                raise FloatingPointError(
                    f"gradient through {op.name}({args}) is not finite: "
                    f"d/d{name} = {d!r} (strict mode)"
                )
    for v in order:
        if not math.isfinite(v.grad):
            raise FloatingPointError(
                f"gradient of {v!r} (op {v.op.name!r}) is not finite (strict mode)"
            )


def _number_label(c: float) -> str:
    """Format an exponent the way micrograd's f-string would (2, not 2.0)."""
    return str(int(c)) if c.is_integer() else repr(c)


_new = object.__new__


def _lift(x: Value | Number) -> Value:
    """Wrap a Python number as a constant leaf; pass a ``Value`` through."""
    if isinstance(x, Value):
        return x
    if not isinstance(x, (int, float)):
        raise TypeError(f"unsupported operand for Value: {type(x).__name__}")
    v = _new(Value)  # the slots set directly: constants are made on every operator call
    d = float(x)
    v.data = d
    v.grad = 0.0
    v._a = None
    v._b = None
    v._code = _CONST
    v._c = d
    return v


def _node(code: int, a: Value, b: Value | None, c: float = 0.0) -> Value:
    """Make the node ``code(a, b)``, computing its value through the op table."""
    v = _new(Value)
    if b is None:
        v.data = _FORWARD[code](a.data, 0.0, c)
        if _STRICT.get():
            _check(_ops.BY_CODE[code], v.data, a.data, 0.0, c)
    else:
        v.data = _FORWARD[code](a.data, b.data, c)
        if _STRICT.get():
            _check(_ops.BY_CODE[code], v.data, a.data, b.data, c)
    v.grad = 0.0
    v._a = a
    v._b = b
    v._code = code
    v._c = c
    return v


def topological_order(root: Value) -> list[Value]:
    """Every node ``root`` depends on, arguments before users, iteratively.

    The order is a depth-first post-order taking first arguments first, so it
    is the same on every run (no set iteration decides it).
    """
    order: list[Value] = []
    seen: set[Value] = set()
    stack: list[Value | None] = [root]
    push = stack.append
    pop = stack.pop
    while stack:
        v = pop()
        if v is None:  # sentinel: the node below it has all arguments done
            order.append(pop())  # type: ignore[arg-type]
            continue
        if v in seen:
            continue
        seen.add(v)
        push(v)
        push(None)
        b = v._b
        if b is not None and b not in seen:
            push(b)
        a = v._a
        if a is not None and a not in seen:
            push(a)
    return order
