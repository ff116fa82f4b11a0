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
  cycles, and far less memory. With the extension built, the nodes the
  operators make are not even tracked by the cycle collector (building a
  big graph no longer triggers collections that walk all of it); they are
  freed by reference counting as before. So a node's ``data`` or ``grad``
  must not hold a container that refers back to its graph: such a cycle
  would never be collected. Custom nodes (closures) stay tracked.
* Calling ``backward()`` again resets the gradients of interior nodes and
  *adds* to the gradients of leaves (as PyTorch does), instead of
  micrograd's doubling of stale interior gradients. Call ``zero_grad``
  (``Module.zero_grad`` or by hand) between steps, as with micrograd.
* ``a - b`` and ``a / b`` are single nodes (``'-'``, ``'/'``), not
  ``a + (-b)`` and ``a * b**-1``: fewer nodes and one rounding fewer.
* Math follows IEEE 754: ``Value(-1).log()`` is ``nan``, ``Value(1) / 0`` is
  ``inf``. Inside ``with strict():`` any non-finite result raises
  ``FloatingPointError`` instead, naming the operation and its operands.

micrograd's own way of adding an op works too: ``out = Value(t, (self,),
'tanh')`` followed by ``out._backward = fn`` makes a *custom* node whose
gradient step is the closure ``fn``; ``backward()`` calls the closures in
its deterministic order. Such a node has no wire code, so sending its graph
to the service fails (naming the op) before anything is sent.

Beyond one gradient: ``jacobian(outputs, inputs)`` and ``hvp(output, inputs,
vector)`` (forward-over-reverse, with each op's second derivative from the
op table), and the ternary ``where(cond, x, y)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from . import ops as _ops

__all__ = ["Value", "hvp", "jacobian", "strict", "topological_order", "where"]

Number = int | float

_STRICT: ContextVar[bool] = ContextVar("micrograd_strict", default=False)
"""Whether strict mode is on in this thread or asyncio task (a context variable, so a block
in one thread or task never changes what another computes)."""
_WIDE = False
"""Whether this process has made a ``where`` or a custom node (more than two arguments or a
closure): from then on traversals take the general path, which knows their arguments."""


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
_ABS, _WHERE = _ops.BY_NAME["abs"].code, _ops.BY_NAME["where"].code
_CUSTOM = 0
"""``_code`` of a node made micrograd's way, ``Value(data, children, op)``: no table entry."""
# A where node keeps its branches in _a and _b and its condition in _c, so that the table's
# (cond, x, y) partials reach the branches through the same two-argument step as other ops.


def _where_partials(x: float, y: float, cond: Any, out: float) -> tuple[float, float]:
    """Partials of a where node w.r.t. its branches (``_a``, ``_b``): 1 for the chosen one."""
    return (1.0, 0.0) if cond.data > 0.0 else (0.0, 1.0)


_PARTIALS[_WHERE] = _where_partials
_SECOND = {op.code: op.second for op in _ops.OPS}
_SECOND[_WHERE] = lambda x, y, cond, o: (0.0, 0.0, 0.0)


class _ClosureOp:
    """What a custom node holds in place of a constant: its arguments, label and closure."""

    __slots__ = ("backward", "children", "label")

    def __init__(self, children: tuple[Value, ...], label: str) -> None:
        self.children = children
        self.label = label
        self.backward: Callable[[], None] = _nothing


def _nothing() -> None:
    """micrograd's ``_backward`` of a leaf."""


class Value:
    """A scalar node of an expression graph, with its value and gradient."""

    __slots__ = ("_a", "_b", "_c", "_code", "data", "grad")

    def __init__(self, data: Number, _children: Sequence[Value] = (), _op: str = "") -> None:
        """A leaf holding ``data``; with ``_children`` or ``_op``, a custom node micrograd's way.

        A custom node's gradient step is whatever closure is assigned to its
        ``_backward`` afterwards (micrograd's ``out._backward = fn``).
        """
        self.data: float = float(data)
        self.grad: float = 0.0
        self._a: Value | None = None
        self._b: Value | None = None
        self._code: int = _INPUT
        self._c: Any = 0.0
        if _children or _op:
            self._code = _CUSTOM
            self._c = _ClosureOp(_custom_children(_children, _op), str(_op))
            global _WIDE
            _WIDE = True

    # -- graph structure -------------------------------------------------

    @property
    def _prev(self) -> set[Value]:
        """The set of this node's arguments, as in micrograd."""
        return set(_arguments(self))

    @property
    def _op(self) -> str:
        """micrograd's label of the op that made this node (``''`` for a leaf)."""
        if self._code == _CUSTOM:
            return self._c.label  # type: ignore[no-any-return]
        op = _ops.BY_CODE[self._code]
        if op.name == "pow":
            return f"**{_number_label(self._c)}"
        return op.label

    @property
    def op(self) -> _ops.Op:
        """The op-table entry of the operation that made this node.

        Raises ``LookupError`` for a custom node (``Value(data, children, op)``), which has none.
        """
        if self._code == _CUSTOM:
            raise LookupError(
                f"{self._c.label!r} is a custom op (Value(data, children, op) with a _backward "
                "closure); it has no op-table entry"
            )
        return _ops.BY_CODE[self._code]

    @property
    def _backward(self) -> Callable[[], None]:
        """micrograd's local gradient step: add this node's share into its arguments' ``grad``.

        For a custom node, the closure assigned to it; for every other node, the
        op table's chain-rule step (so micrograd's step-by-step ``o._backward()`` works).
        """
        if self._code == _CUSTOM:
            return self._c.backward  # type: ignore[no-any-return]
        return lambda: _local_step(self)

    @_backward.setter
    def _backward(self, fn: Callable[[], None]) -> None:
        if self._code != _CUSTOM:
            raise AttributeError(
                "only a node made by Value(data, children, op) takes a _backward closure; "
                "nodes made by operators and methods get theirs from the op table"
            )
        self._c.backward = fn

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

    def __abs__(self) -> Value:
        """``abs(v)``: the op `abs`."""
        return _node(_ABS, self, None)

    # -- generated from the op table by scripts/gen-ops: do not edit --------
    def relu(self) -> Value:
        """max(0, x) (op `relu`)."""
        return _node(10, self, None)

    def tanh(self) -> Value:
        """tanh(x) (op `tanh`)."""
        return _node(11, self, None)

    def exp(self) -> Value:
        """e ** x (op `exp`)."""
        return _node(12, self, None)

    def log(self) -> Value:
        """natural logarithm (op `log`)."""
        return _node(13, self, None)

    def sigmoid(self) -> Value:
        """1 / (1 + e ** -x) (op `sigmoid`)."""
        return _node(14, self, None)

    def sin(self) -> Value:
        """sin(x) (op `sin`)."""
        return _node(15, self, None)

    def cos(self) -> Value:
        """cos(x) (op `cos`)."""
        return _node(16, self, None)

    def tan(self) -> Value:
        """tan(x) (op `tan`)."""
        return _node(17, self, None)

    def asin(self) -> Value:
        """arcsine, in [-π/2, π/2] (op `asin`)."""
        return _node(18, self, None)

    def acos(self) -> Value:
        """arccosine, in [0, π] (op `acos`)."""
        return _node(19, self, None)

    def atan(self) -> Value:
        """arctangent, in (-π/2, π/2) (op `atan`)."""
        return _node(20, self, None)

    def sinh(self) -> Value:
        """hyperbolic sine (op `sinh`)."""
        return _node(21, self, None)

    def cosh(self) -> Value:
        """hyperbolic cosine (op `cosh`)."""
        return _node(22, self, None)

    def asinh(self) -> Value:
        """inverse hyperbolic sine (op `asinh`)."""
        return _node(23, self, None)

    def acosh(self) -> Value:
        """inverse hyperbolic cosine, ≥ 0 (op `acosh`)."""
        return _node(24, self, None)

    def atanh(self) -> Value:
        """inverse hyperbolic tangent (op `atanh`)."""
        return _node(25, self, None)

    def sqrt(self) -> Value:
        """square root (op `sqrt`)."""
        return _node(26, self, None)

    def abs(self) -> Value:
        """|x| (also the builtin `abs(v)`) (op `abs`)."""
        return _node(27, self, None)

    def log1p(self) -> Value:
        """log(1 + x), accurate for small x (op `log1p`)."""
        return _node(28, self, None)

    def expm1(self) -> Value:
        """e ** x - 1, accurate for small x (op `expm1`)."""
        return _node(29, self, None)

    def log2(self) -> Value:
        """base-2 logarithm (op `log2`)."""
        return _node(30, self, None)

    def log10(self) -> Value:
        """base-10 logarithm (op `log10`)."""
        return _node(31, self, None)

    def erf(self) -> Value:
        """the error function 2/√π ∫₀ˣ e^(-t²) dt (op `erf`)."""
        return _node(32, self, None)

    def softplus(self) -> Value:
        """log(1 + e ** x); x itself above 20 (PyTorch's threshold) (op `softplus`)."""
        return _node(33, self, None)

    def floor(self) -> Value:
        """the largest integer ≤ x (op `floor`)."""
        return _node(34, self, None)

    def ceil(self) -> Value:
        """the smallest integer ≥ x (op `ceil`)."""
        return _node(35, self, None)

    def sign(self) -> Value:
        """-1, 0 or 1 by the sign of x (0 for nan, as torch.sign) (op `sign`)."""
        return _node(36, self, None)

    def atan2(self, other: Value | Number) -> Value:
        """the angle of the point (y, x) in (-π, π], as torch.atan2(x, y) (op `atan2`)."""
        return _node(37, self, _lift(other))

    def maximum(self, other: Value | Number) -> Value:
        """the larger of x and y (nan if either is) (op `maximum`)."""
        return _node(38, self, _lift(other))

    def minimum(self, other: Value | Number) -> Value:
        """the smaller of x and y (nan if either is) (op `minimum`)."""
        return _node(39, self, _lift(other))
    # -- end of generated methods

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
            return  # (a where or custom node makes the native walk decline)
        if _WIDE:
            _backward_general(self)
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


def _backward_general(root: Value) -> None:
    """``backward`` for graphs that may hold custom nodes: their closures run in the same order."""
    order = topological_order(root)
    for v in order:
        if v._a is not None or (v._code == _CUSTOM and v._c.children):
            v.grad = 0.0
    root.grad = 1.0 if (root._a is not None or root._code == _CUSTOM) else root.grad + 1.0
    for v in reversed(order):
        _local_step(v)
    if _STRICT.get():
        _check_gradients(order)


def _local_step(v: Value) -> None:
    """One node's share of the chain rule: its gradient times its partials, into its arguments."""
    if v._code == _CUSTOM:
        v._c.backward()
        return
    a = v._a
    if a is None:
        return
    g = v.grad
    b = v._b
    if b is None:
        da, _ = _PARTIALS[v._code](a.data, 0.0, v._c, v.data)
        a.grad += da * g
    else:
        da, db = _PARTIALS[v._code](a.data, b.data, v._c, v.data)
        a.grad += da * g
        b.grad += db * g


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


def _custom_children(children: Sequence[Value], label: str) -> tuple[Value, ...]:
    """A custom node's arguments, each once, in the given order (micrograd keeps a set)."""
    unique: dict[Value, None] = {}
    for child in children:
        if not isinstance(child, Value):
            raise TypeError(
                f"Value(data, children, {label!r}): every child must be a Value, "
                f"got {type(child).__name__}"
            )
        unique[child] = None
    return tuple(unique)


def _arguments(v: Value) -> tuple[Value, ...]:
    """The node's arguments in tape order (a where node: condition, then, else)."""
    code = v._code
    if code == _WHERE:
        return (v._c, v._a, v._b)  # type: ignore[return-value]
    if code == _CUSTOM:
        return v._c.children  # type: ignore[no-any-return]
    a, b = v._a, v._b
    if a is None:
        return ()
    return (a,) if b is None else (a, b)


def where(cond: Value | Number, x: Value | Number, y: Value | Number) -> Value:
    """``x`` where ``cond.data > 0``, else ``y`` (op `where`); no gradient flows into ``cond``.

    Like ``torch.where(cond > 0, x, y)``: the gradient goes to the chosen
    branch only, and a ``nan`` condition picks ``y``.
    """
    global _WIDE
    p, a, b = _lift(cond), _lift(x), _lift(y)
    v = _new(Value)
    v.data = a.data if p.data > 0.0 else b.data
    v.grad = 0.0
    v._a = a
    v._b = b
    v._code = _WHERE
    v._c = p
    _WIDE = True
    return v


try:  # nodes the cycle collector does not visit (they are in no cycle), when the extension is built
    from ._kernel import new_node as _new
except ImportError:  # pragma: no cover - pure-Python installs
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
    if _WIDE:
        return _general_order([root])
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


def _general_order(roots: Sequence[Value]) -> list[Value]:
    """``topological_order`` for any nodes (where, custom) and several roots, iteratively.

    The same depth-first post-order, first arguments first; each root's
    nodes follow those of the roots before it.
    """
    order: list[Value] = []
    seen: set[Value] = set()
    stack: list[Value | None] = list(reversed(roots))
    push = stack.append
    pop = stack.pop
    while stack:
        v = pop()
        if v is None:
            order.append(pop())  # type: ignore[arg-type]
            continue
        if v in seen:
            continue
        seen.add(v)
        push(v)
        push(None)
        for arg in reversed(_arguments(v)):
            if arg not in seen:
                push(arg)
    return order


def graph_order(roots: Sequence[Value]) -> list[Value]:
    """Every node the ``roots`` depend on, arguments first, in ``topological_order``'s order."""
    if len(roots) == 1:
        return topological_order(roots[0])
    return _general_order(roots)


def jacobian(outputs: Sequence[Value], inputs: Sequence[Value]) -> list[list[float]]:
    """The Jacobian ``d outputs[i] / d inputs[j]`` as a list of rows, one per output.

    One reverse sweep per output over the nodes it depends on (custom nodes'
    closures included); a column is 0 where an output does not depend on that
    input. Every node's ``grad`` is left as it was.
    """
    outs, ins = list(outputs), list(inputs)
    _check_values("outputs", outs)
    _check_values("inputs", ins)
    touched = _general_order(outs) if _WIDE else graph_order(outs)
    saved = [v.grad for v in touched]
    rows: list[list[float]] = []
    try:
        for out in outs:
            order = topological_order(out)
            for v in order:
                v.grad = 0.0
            out.grad = 1.0
            for v in reversed(order):
                _local_step(v)
            reached = set(order)
            rows.append([x.grad if x in reached else 0.0 for x in ins])
    finally:
        for v, g in zip(touched, saved):
            v.grad = g
    return rows


def hvp(output: Value, inputs: Sequence[Value], vector: Sequence[float]) -> list[float]:
    """The Hessian-vector product ``H v`` of ``output`` w.r.t. the leaves ``inputs``.

    Forward-over-reverse: a tangent sweep (``vector`` seeded on ``inputs``)
    carried through the reverse sweep, using each op's second derivative from
    the op table. Custom nodes have no second derivative and raise
    ``LookupError`` naming their op. No ``grad`` is touched.
    """
    ins = list(inputs)
    _check_values("inputs", ins)
    vec = [float(t) for t in vector]
    if len(vec) != len(ins):
        raise ValueError(f"vector has {len(vec)} entries for {len(ins)} inputs")
    order = topological_order(output)
    index = {v: i for i, v in enumerate(order)}
    n = len(order)
    tangent = [0.0] * n
    for j, (x, t) in enumerate(zip(ins, vec)):
        if x._a is not None or x._code == _CUSTOM:
            raise ValueError(f"inputs[{j}] is not a leaf: hvp differentiates w.r.t. leaves")
        i = index.get(x)
        if i is not None:
            tangent[i] += t
    args: list[tuple[int, ...]] = []
    for i, v in enumerate(order):
        if v._code == _CUSTOM:
            v.op  # noqa: B018 - raises LookupError naming the custom op
        if v._code == _WHERE:
            chosen: Value = v._a if v._c.data > 0.0 else v._b  # type: ignore[assignment]
            args.append((index[chosen],))
            tangent[i] = tangent[index[chosen]]
            continue
        a, b = v._a, v._b
        if a is None:
            args.append(())
            continue
        ai = index[a]
        if b is None:
            da, _ = _PARTIALS[v._code](a.data, 0.0, v._c, v.data)
            tangent[i] = da * tangent[ai]
            args.append((ai,))
        else:
            bi = index[b]
            da, db = _PARTIALS[v._code](a.data, b.data, v._c, v.data)
            tangent[i] = da * tangent[ai] + db * tangent[bi]
            args.append((ai, bi))
    g = [0.0] * n
    gt = [0.0] * n
    g[n - 1] = 1.0
    for i in range(n - 1, -1, -1):
        v = order[i]
        arg = args[i]
        if not arg:
            continue
        gi, gti = g[i], gt[i]
        if v._code == _WHERE:
            g[arg[0]] += gi
            gt[arg[0]] += gti
            continue
        a, b = v._a, v._b
        ai = arg[0]
        if b is None:
            da, _ = _PARTIALS[v._code](a.data, 0.0, v._c, v.data)  # type: ignore[union-attr]
            daa, _, _ = _SECOND[v._code](a.data, 0.0, v._c, v.data)  # type: ignore[union-attr]
            g[ai] += da * gi
            gt[ai] += da * gti + gi * (daa * tangent[ai])
        else:
            bi = arg[1]
            da, db = _PARTIALS[v._code](a.data, b.data, v._c, v.data)  # type: ignore[union-attr]
            daa, dab, dbb = _SECOND[v._code](a.data, b.data, v._c, v.data)  # type: ignore[union-attr]
            ta, tb = tangent[ai], tangent[bi]
            g[ai] += da * gi
            g[bi] += db * gi
            gt[ai] += da * gti + gi * (daa * ta + dab * tb)
            gt[bi] += db * gti + gi * (dab * ta + dbb * tb)
    return [gt[index[x]] if x in index else 0.0 for x in ins]


def _check_values(what: str, nodes: list[Value]) -> None:
    """Raise ``TypeError`` unless every entry is a ``Value``."""
    for j, v in enumerate(nodes):
        if not isinstance(v, Value):
            raise TypeError(f"{what}[{j}] must be a Value, got {type(v).__name__}")
