"""The kernels that evaluate a tape, behind one protocol, and the registry that names them.

A kernel does a tape's two sweeps over its columns (``code``, ``arg0``,
``arg1``, ``const``):

* ``forward(tape, values)``: ``values`` (shape ``(n,)``, or ``(n, B)`` for
  a batch of B input bindings) arrives with leaves filled in; every other
  row is computed.
* ``backward(tape, values, grads, output)``: ``grads`` arrives zeroed; the
  output's row is set to 1 and gradients flow back through the nodes the
  output depends on (only those: a node outside the output's graph never
  touches a gradient, even with an infinite local derivative).

``PythonKernel`` reads the op table's scalar and numpy forms and is the
portable reference; ``NativeKernel`` (``micrograd.native``, C) is used when
the extension is built; ``ValueKernel`` evaluates through ``Value`` objects,
one per node, and is the engine's own definition of the numbers (slow, for
checking every other kernel against). Kernels read a tape's columns
(``micrograd.columns.Columns``), not ``Tape`` itself, so this module sits
below ``micrograd.tape``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from . import ops as _ops
from .columns import Columns
from .engine import Value, hvp, jacobian, where

try:  # the C kernel is optional: without the built extension, PythonKernel serves alone
    from .native import NativeKernel
except ImportError:  # pragma: no cover - exercised on machines without a compiler
    NativeKernel = None  # type: ignore[assignment,misc]

__all__ = [
    "Kernel",
    "PythonKernel",
    "ValueKernel",
    "available_kernels",
    "get_kernel",
]


class Kernel(Protocol):
    """What evaluates a tape: a forward and a reverse sweep over its arrays, and the two
    sweeps beyond one gradient (a reverse sweep seeded at several nodes, and
    forward-over-reverse for Hessian-vector products)."""

    name: str

    def forward(self, tape: Columns, values: np.ndarray) -> None:
        """Fill the non-leaf rows of ``values`` (``(n,)`` or ``(n, B)``) in place."""

    def backward(self, tape: Columns, values: np.ndarray, grads: np.ndarray, output: int) -> None:
        """Fill ``grads`` (zeroed, shaped like ``values``) with d(output)/d(node) in place."""

    def vjp(self, tape: Columns, values: np.ndarray, cotangents: np.ndarray, output: int) -> None:
        """One reverse sweep from every row of ``cotangents`` (up to ``output``) that holds a
        nonzero weight; ``cotangents`` becomes sum_k w_k d(node_k)/d(node), per column."""

    def hvp(
        self,
        tape: Columns,
        values: np.ndarray,
        tangents: np.ndarray,
        grads: np.ndarray,
        grad_tangents: np.ndarray,
        output: int,
    ) -> None:
        """Forward-over-reverse: fill ``values`` and ``tangents`` (leaf rows given), then
        ``grads`` and ``grad_tangents`` (zeroed); at the inputs the latter is ``H v``."""


_SCALAR_FORWARD: list[Callable[..., float] | None] = [None] * (_ops.MAX_CODE + 1)
_SCALAR_PARTIALS: list[Callable[..., tuple[float, ...]] | None] = [None] * (_ops.MAX_CODE + 1)
for _op in _ops.OPS:
    _SCALAR_FORWARD[_op.code] = _op.forward
    _SCALAR_PARTIALS[_op.code] = _op.partials
_ARITY_LIST: list[int] = _ops.ARITY.tolist()
_READS_CONST: np.ndarray = _ops.USES_VALUE & (_ops.ARITY > 0)
_ADD, _MUL, _RELU = (_ops.BY_NAME[name].code for name in ("add", "mul", "relu"))
"""The ops of nearly every node of a network's loss, spelled out in the single-binding
sweeps as their table entries compute them (``x + y``, partials ``(1, 1)``; ``x * y``,
``(y, x)``; ``relu``): the same operations, so the same bits (tests/test_python_kernel.py)."""


def _third(tape: Columns) -> list[int]:
    """The third-argument column as a list (-1 everywhere when the tape has none)."""
    return [-1] * int(tape.code.shape[0]) if tape.arg2 is None else tape.arg2.tolist()


def _lists(tape: Columns) -> tuple[list[int], list[int], list[int], list[int], list[float]]:
    """``code, arg0, arg1, arg2, const`` as Python lists, for the node-by-node sweeps."""
    return (
        tape.code.tolist(),
        tape.arg0.tolist(),
        tape.arg1.tolist(),
        _third(tape),
        tape.const.tolist(),
    )


def _inner_consts(tape: Columns) -> list[float]:
    """The constant column as a list where an inner node reads it; else zeros (cheaper: the
    single-binding sweeps read no leaf's constant, and an op that takes none ignores it)."""
    n = int(tape.code.shape[0])
    return tape.const.tolist() if bool(_READS_CONST[tape.code].any()) else [0.0] * n


def _inner_nodes(tape: Columns, nodes: slice) -> tuple[list[int], list[int], list[int], list[int]]:
    """Index, code, first and second argument of the non-leaf nodes among ``nodes``, in its
    order: the single-binding sweeps have nothing to do at a leaf."""
    index = np.arange(int(tape.code.shape[0]))[nodes]
    index = index[_ops.ARITY[tape.code[index]] > 0]
    return (
        index.tolist(),
        tape.code[index].tolist(),
        tape.arg0[index].tolist(),
        tape.arg1[index].tolist(),
    )


def _reaches_every_node(tape: Columns, output: int) -> bool:
    """Whether every node before ``output`` is an argument of some node up to ``output``.

    Then the reverse sweep reaches them all (by induction from ``output`` down), and it
    needs no record of which nodes it reached: a tape compiled from one ``Value`` is such.
    """
    m = output + 1
    used = np.zeros(m, dtype=bool)
    for column in (tape.arg0, tape.arg1, tape.arg2):
        if column is not None:
            args = column[:m]
            used[args[args >= 0]] = True
    return bool(used[:output].all())


def _reverse_all(tape: Columns, v: list[float], g: list[float], output: int) -> None:
    """The single-binding reverse sweep when it reaches every node (``_reaches_every_node``)."""
    part = _SCALAR_PARTIALS
    arity = _ARITY_LIST
    c = _inner_consts(tape)
    z = _third(tape)
    for i, k, ai, bi in zip(*_inner_nodes(tape, slice(output, None, -1))):
        if k == _MUL:  # partials (y, x)
            gi = g[i]
            g[ai] += v[bi] * gi
            g[bi] += v[ai] * gi
        elif k == _ADD:  # partials (1, 1): 1.0 * gi is gi, bit for bit
            gi = g[i]
            g[ai] += gi
            g[bi] += gi
        elif k == _RELU:
            g[ai] += (1.0 if v[ai] > 0.0 else 0.0) * g[i]
        else:
            n_args = arity[k]
            if n_args == 2:
                gi = g[i]
                dx, dy = part[k](v[ai], v[bi], c[i], v[i])  # type: ignore[misc]
                g[ai] += dx * gi
                g[bi] += dy * gi
            elif n_args == 1:
                gi = g[i]
                dx, _ = part[k](v[ai], 0.0, c[i], v[i])  # type: ignore[misc]
                g[ai] += dx * gi
            elif n_args == 3:
                gi = g[i]
                zi = z[i]
                dx, dy, dz = part[k](v[ai], v[bi], v[zi], v[i])  # type: ignore[misc]
                g[ai] += dx * gi
                g[bi] += dy * gi
                g[zi] += dz * gi


def _reverse_reached(
    tape: Columns, v: list[float], g: list[float], output: int, reached: bytearray
) -> None:
    """The single-binding reverse sweep through the nodes marked in ``reached`` as it goes."""
    part = _SCALAR_PARTIALS
    arity = _ARITY_LIST
    code, a, b, z = tape.code.tolist(), tape.arg0.tolist(), tape.arg1.tolist(), _third(tape)
    c = _inner_consts(tape)
    for i in range(output, -1, -1):
        if not reached[i]:
            continue
        k = code[i]
        n_args = arity[k]
        if n_args == 0:
            continue
        gi = g[i]
        ai = a[i]
        reached[ai] = 1
        if n_args == 2:
            bi = b[i]
            reached[bi] = 1
            dx, dy = part[k](v[ai], v[bi], c[i], v[i])  # type: ignore[misc]
            g[ai] += dx * gi
            g[bi] += dy * gi
        elif n_args == 1:
            dx, _ = part[k](v[ai], 0.0, c[i], v[i])  # type: ignore[misc]
            g[ai] += dx * gi
        else:
            bi, zi = b[i], z[i]
            reached[bi] = 1
            reached[zi] = 1
            dx, dy, dz = part[k](v[ai], v[bi], v[zi], v[i])  # type: ignore[misc]
            g[ai] += dx * gi
            g[bi] += dy * gi
            g[zi] += dz * gi


class PythonKernel:
    """The portable reference kernel: the op table's Python and numpy forms, node by node."""

    name = "python"

    def forward(self, tape: Columns, values: np.ndarray) -> None:
        """Forward sweep; per-node Python floats for one binding, numpy rows for a batch."""
        if values.ndim == 2:
            self._forward_batch(tape, values)
            return
        fwd = _SCALAR_FORWARD
        arity = _ARITY_LIST
        v = values.tolist()
        z = _third(tape)
        c = _inner_consts(tape)
        for i, k, ai, bi in zip(*_inner_nodes(tape, slice(None))):
            if k == _MUL:
                v[i] = v[ai] * v[bi]
            elif k == _ADD:
                v[i] = v[ai] + v[bi]
            elif k == _RELU:
                x = v[ai]
                v[i] = 0.0 if x <= 0.0 else x
            else:
                n_args = arity[k]
                if n_args == 2:
                    v[i] = fwd[k](v[ai], v[bi], c[i])  # type: ignore[misc]
                elif n_args == 1:
                    v[i] = fwd[k](v[ai], 0.0, c[i])  # type: ignore[misc]
                elif n_args == 3:
                    v[i] = fwd[k](v[ai], v[bi], v[z[i]])  # type: ignore[misc]
        values[:] = v

    def backward(self, tape: Columns, values: np.ndarray, grads: np.ndarray, output: int) -> None:
        """Reverse sweep from ``output`` through the nodes it depends on."""
        self._reverse(tape, values, grads, output, seeded=False)

    def vjp(self, tape: Columns, values: np.ndarray, cotangents: np.ndarray, output: int) -> None:
        """Reverse sweep seeded with the weights in ``cotangents`` (see ``Kernel.vjp``)."""
        self._reverse(tape, values, cotangents, output, seeded=True)

    def _reverse(
        self, tape: Columns, values: np.ndarray, grads: np.ndarray, output: int, seeded: bool
    ) -> None:
        if values.ndim == 2:
            self._backward_batch(tape, values, grads, output, seeded)
            return
        v = values.tolist()
        n = len(v)
        if seeded:
            g = grads.tolist()
        else:
            g = [0.0] * n
            g[output] = 1.0
        if _reaches_every_node(tape, output):
            _reverse_all(tape, v, g, output)
        else:
            reached = bytearray(n)
            if seeded:
                for i in np.flatnonzero(grads[: output + 1] != 0.0).tolist():
                    reached[i] = 1
            reached[output] = 1
            _reverse_reached(tape, v, g, output, reached)
        grads[:] = g

    @staticmethod
    def _forward_batch(tape: Columns, values: np.ndarray) -> None:
        """Batch forward: one numpy call per node over all bindings."""
        ops = _ops.BY_CODE
        with np.errstate(all="ignore"):
            for i, (k, ai, bi, zi, ci) in enumerate(zip(*_lists(tape))):
                op = ops[k]
                if op.arity == 2:
                    values[i] = op.vforward(values[ai], values[bi], ci)
                elif op.arity == 1:
                    values[i] = op.vforward(values[ai], 0.0, ci)
                elif op.arity == 3:
                    values[i] = op.vforward(values[ai], values[bi], values[zi])

    @staticmethod
    def _backward_batch(
        tape: Columns, values: np.ndarray, grads: np.ndarray, output: int, seeded: bool
    ) -> None:
        """Batch reverse sweep: one numpy call per node over all bindings."""
        ops = _ops.BY_CODE
        code, a, b, z, c = _lists(tape)
        reached = bytearray(len(code))
        if seeded:
            for i in np.flatnonzero((grads[: output + 1] != 0.0).any(axis=1)).tolist():
                reached[i] = 1
        else:
            grads[output] = 1.0
        reached[output] = 1
        with np.errstate(all="ignore"):
            for i in range(output, -1, -1):
                op = ops[code[i]]
                if not reached[i] or op.arity == 0:
                    continue
                gi = grads[i]
                ai = a[i]
                reached[ai] = 1
                if op.arity == 2:
                    bi = b[i]
                    reached[bi] = 1
                    dx, dy = op.vpartials(values[ai], values[bi], c[i], values[i])
                    grads[ai] += dx * gi
                    grads[bi] += dy * gi
                elif op.arity == 1:
                    dx, _ = op.vpartials(values[ai], 0.0, c[i], values[i])
                    grads[ai] += dx * gi
                else:
                    bi, zi = b[i], z[i]
                    reached[bi] = 1
                    reached[zi] = 1
                    dx, dy, dz = op.vpartials(values[ai], values[bi], values[zi], values[i])
                    grads[ai] += dx * gi
                    grads[bi] += dy * gi
                    grads[zi] += dz * gi

    def hvp(
        self,
        tape: Columns,
        values: np.ndarray,
        tangents: np.ndarray,
        grads: np.ndarray,
        grad_tangents: np.ndarray,
        output: int,
    ) -> None:
        """Forward-over-reverse with the table's numpy forms, in the C kernel's order."""
        single = values.ndim == 1
        arrays = (values, tangents, grads, grad_tangents)
        v, t, g, gt = (x[:, None] if single else x for x in arrays)
        ops = _ops.BY_CODE
        code, a, b, z, c = _lists(tape)
        with np.errstate(all="ignore"):
            for i, k in enumerate(code):
                op = ops[k]
                ai, bi, zi = a[i], b[i], z[i]
                if op.arity == 1:
                    v[i] = op.vforward(v[ai], 0.0, c[i])
                    dx, _ = op.vpartials(v[ai], 0.0, c[i], v[i])
                    t[i] = dx * t[ai]
                elif op.arity == 2:
                    v[i] = op.vforward(v[ai], v[bi], c[i])
                    dx, dy = op.vpartials(v[ai], v[bi], c[i], v[i])
                    t[i] = dx * t[ai] + dy * t[bi]
                elif op.arity == 3:
                    v[i] = op.vforward(v[ai], v[bi], v[zi])
                    dx, dy, dz = op.vpartials(v[ai], v[bi], v[zi], v[i])
                    t[i] = dx * t[ai] + dy * t[bi] + dz * t[zi]
            reached = bytearray(len(code))
            reached[output] = 1
            g[output] = 1.0
            for i in range(output, -1, -1):
                op = ops[code[i]]
                if not reached[i] or op.arity == 0:
                    continue
                gi, dgi = g[i].copy(), gt[i].copy()
                ai, bi, zi = a[i], b[i], z[i]
                if op.arity == 1:
                    reached[ai] = 1
                    dx, _ = op.vpartials(v[ai], 0.0, c[i], v[i])
                    dxx, _, _ = op.vsecond(v[ai], 0.0, c[i], v[i])
                    g[ai] += dx * gi
                    gt[ai] += dx * dgi + gi * (dxx * t[ai])
                elif op.arity == 2:
                    reached[ai] = reached[bi] = 1
                    dx, dy = op.vpartials(v[ai], v[bi], c[i], v[i])
                    dxx, dxy, dyy = op.vsecond(v[ai], v[bi], c[i], v[i])
                    ta, tb = t[ai], t[bi]
                    g[ai] += dx * gi
                    g[bi] += dy * gi
                    gt[ai] += dx * dgi + gi * (dxx * ta + dxy * tb)
                    gt[bi] += dy * dgi + gi * (dxy * ta + dyy * tb)
                else:
                    reached[ai] = reached[bi] = reached[zi] = 1
                    dx, dy, dz = op.vpartials(v[ai], v[bi], v[zi], v[i])
                    xx, xy, yy, xz, yz, zz = op.vsecond(v[ai], v[bi], v[zi], v[i])
                    ta, tb, tz = t[ai], t[bi], t[zi]
                    g[ai] += dx * gi
                    g[bi] += dy * gi
                    g[zi] += dz * gi
                    gt[ai] += dx * dgi + gi * (xx * ta + xy * tb + xz * tz)
                    gt[bi] += dy * dgi + gi * (xy * ta + yy * tb + yz * tz)
                    gt[zi] += dz * dgi + gi * (xz * ta + yz * tb + zz * tz)


def _node_builder(op: _ops.Op) -> Callable[[Value, Value, Value, float], Value]:
    """``op``'s ``expr`` as a function of argument nodes and the constant, via Value's operators."""
    built = eval(
        f"lambda x, y, z, c: {op.expr}", {"__builtins__": {}, "Value": Value, "where": where}
    )
    return built  # type: ignore[no-any-return]


_BUILD: list[Callable[[Value, Value, Value, float], Value] | None] = [None] * (_ops.MAX_CODE + 1)
for _op in _ops.OPS:
    if _op.arity:
        _BUILD[_op.code] = _node_builder(_op)


class ValueKernel:
    """Evaluate a tape by building the ``Value`` graph it describes (the reference engine)."""

    name = "value"

    @staticmethod
    def _build(tape: Columns, leaves: np.ndarray) -> list[Value]:
        """One ``Value`` per node: leaves hold ``leaves[i]``, other nodes apply their op."""
        nodes: list[Value] = []
        append = nodes.append
        build = _BUILD
        leaf_values = leaves.tolist()
        for i, (k, a, b, z, c) in enumerate(zip(*_lists(tape))):
            make = build[k]
            if make is None:
                append(Value(leaf_values[i]))
            else:
                x = nodes[a]
                append(make(x, nodes[b] if b >= 0 else x, nodes[z] if z >= 0 else x, c))
        return nodes

    def forward(self, tape: Columns, values: np.ndarray) -> None:
        """Fill ``values`` (``(n,)`` or ``(n, B)``) from a ``Value`` graph per binding."""
        columns = values[:, None] if values.ndim == 1 else values
        for j in range(columns.shape[1]):
            nodes = self._build(tape, columns[:, j])
            columns[:, j] = [v.data for v in nodes]

    def backward(self, tape: Columns, values: np.ndarray, grads: np.ndarray, output: int) -> None:
        """Fill ``grads`` with ``Value.backward()`` from node ``output``, per binding."""
        columns = values[:, None] if values.ndim == 1 else values
        grad_columns = grads[:, None] if grads.ndim == 1 else grads
        for j in range(columns.shape[1]):
            nodes = self._build(tape, columns[:, j])
            nodes[output].backward()
            grad_columns[:, j] = [v.grad for v in nodes]

    def vjp(self, tape: Columns, values: np.ndarray, cotangents: np.ndarray, output: int) -> None:
        """The weighted sum of ``jacobian`` rows of the seeded nodes, per binding."""
        columns = values[:, None] if values.ndim == 1 else values
        seeds = cotangents[:, None] if cotangents.ndim == 1 else cotangents
        for j in range(columns.shape[1]):
            nodes = self._build(tape, columns[:, j])
            rows = np.flatnonzero(seeds[: output + 1, j] != 0.0)
            weights = seeds[rows, j].copy()
            rows_of = jacobian([nodes[r] for r in rows.tolist()], nodes)
            jac = np.array(rows_of, dtype=np.float64).reshape(-1, len(nodes))
            seeds[:, j] = weights @ jac

    def hvp(
        self,
        tape: Columns,
        values: np.ndarray,
        tangents: np.ndarray,
        grads: np.ndarray,
        grad_tangents: np.ndarray,
        output: int,
    ) -> None:
        """``micrograd.engine.hvp`` per binding: fills values, grads and the leaf rows of
        ``grad_tangents`` (interior rows and ``tangents`` are left as they came)."""
        columns = values[:, None] if values.ndim == 1 else values
        tan = tangents[:, None] if tangents.ndim == 1 else tangents
        g = grads[:, None] if grads.ndim == 1 else grads
        gt = grad_tangents[:, None] if grad_tangents.ndim == 1 else grad_tangents
        leaves = np.flatnonzero(_ops.ARITY[tape.code] == 0)
        for j in range(columns.shape[1]):
            nodes = self._build(tape, columns[:, j])
            columns[:, j] = [v.data for v in nodes]
            nodes[output].backward()
            g[:, j] = [v.grad for v in nodes]
            leaf_nodes = [nodes[i] for i in leaves.tolist()]
            gt[leaves, j] = hvp(nodes[output], leaf_nodes, tan[leaves, j].tolist())


_KERNELS: dict[str, Kernel] = {"python": PythonKernel(), "value": ValueKernel()}
if NativeKernel is not None:
    _KERNELS["native"] = NativeKernel()
_SPEED = {"native": 0, "python": 1}


def available_kernels() -> list[str]:
    """Names of the tape-sweeping kernels that can run here, fastest first.

    The ``value`` reference kernel is always there too (``get_kernel("value")``)
    but is not listed: it builds Python objects per node and is for checking.
    """
    return sorted((name for name in _KERNELS if name in _SPEED), key=_SPEED.__getitem__)


def get_kernel(name: str | None = None) -> Kernel:
    """The kernel called ``name``; by default the fastest one available."""
    if name is None:
        return _KERNELS[available_kernels()[0]]
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(
            f"unknown kernel {name!r}; available here: {', '.join(available_kernels())}"
        ) from None
