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
from .engine import Value

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
    """What evaluates a tape: a forward and a reverse sweep over its arrays."""

    name: str

    def forward(self, tape: Columns, values: np.ndarray) -> None:
        """Fill the non-leaf rows of ``values`` (``(n,)`` or ``(n, B)``) in place."""

    def backward(self, tape: Columns, values: np.ndarray, grads: np.ndarray, output: int) -> None:
        """Fill ``grads`` (zeroed, shaped like ``values``) with d(output)/d(node) in place."""


class PythonKernel:
    """The portable reference kernel: the op table's Python and numpy forms, node by node."""

    name = "python"

    def forward(self, tape: Columns, values: np.ndarray) -> None:
        """Forward sweep; per-node Python floats for one binding, numpy rows for a batch."""
        if values.ndim == 2:
            self._forward_batch(tape, values)
            return
        fwd = [None] + [op.forward for op in _ops.OPS]
        v = values.tolist()
        code = tape.code.tolist()
        a = tape.arg0.tolist()
        b = tape.arg1.tolist()
        c = tape.const.tolist()
        arity = _ops.ARITY.tolist()
        for i in range(len(code)):
            k = code[i]
            n_args = arity[k]
            if n_args == 2:
                v[i] = fwd[k](v[a[i]], v[b[i]], c[i])  # type: ignore[misc]
            elif n_args == 1:
                v[i] = fwd[k](v[a[i]], 0.0, c[i])  # type: ignore[misc]
        values[:] = v

    def backward(self, tape: Columns, values: np.ndarray, grads: np.ndarray, output: int) -> None:
        """Reverse sweep from ``output`` through the nodes it depends on."""
        if values.ndim == 2:
            self._backward_batch(tape, values, grads, output)
            return
        part = [None] + [op.partials for op in _ops.OPS]
        v = values.tolist()
        g = [0.0] * len(v)
        g[output] = 1.0
        reached = bytearray(len(v))
        reached[output] = 1
        code = tape.code.tolist()
        a = tape.arg0.tolist()
        b = tape.arg1.tolist()
        c = tape.const.tolist()
        arity = _ops.ARITY.tolist()
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
            else:
                dx, _ = part[k](v[ai], 0.0, c[i], v[i])  # type: ignore[misc]
                g[ai] += dx * gi
        grads[:] = g

    @staticmethod
    def _forward_batch(tape: Columns, values: np.ndarray) -> None:
        """Batch forward: one numpy call per node over all bindings."""
        ops = _ops.BY_CODE
        with np.errstate(all="ignore"):
            for i, (k, ai, bi, ci) in enumerate(
                zip(tape.code.tolist(), tape.arg0.tolist(), tape.arg1.tolist(), tape.const.tolist())
            ):
                op = ops[k]
                if op.arity == 2:
                    values[i] = op.vforward(values[ai], values[bi], ci)
                elif op.arity == 1:
                    values[i] = op.vforward(values[ai], 0.0, ci)

    @staticmethod
    def _backward_batch(tape: Columns, values: np.ndarray, grads: np.ndarray, output: int) -> None:
        """Batch reverse sweep: one numpy call per node over all bindings."""
        ops = _ops.BY_CODE
        code, a, b, c = (
            tape.code.tolist(),
            tape.arg0.tolist(),
            tape.arg1.tolist(),
            tape.const.tolist(),
        )
        reached = bytearray(len(code))
        reached[output] = 1
        grads[output] = 1.0
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
                else:
                    dx, _ = op.vpartials(values[ai], 0.0, c[i], values[i])
                    grads[ai] += dx * gi


def _node_builder(op: _ops.Op) -> Callable[[Value, Value, float], Value]:
    """``op``'s ``expr`` as a function of argument nodes and the constant, via Value's operators."""
    built = eval(f"lambda x, y, c: {op.expr}", {"__builtins__": {}, "Value": Value})
    return built  # type: ignore[no-any-return]


_BUILD: list[Callable[[Value, Value, float], Value] | None] = [None] * (_ops.MAX_CODE + 1)
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
        for i, (k, a, b, c) in enumerate(
            zip(tape.code.tolist(), tape.arg0.tolist(), tape.arg1.tolist(), tape.const.tolist())
        ):
            make = build[k]
            if make is None:
                append(Value(leaf_values[i]))
            else:
                append(make(nodes[a], nodes[b] if b >= 0 else nodes[a], c))
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
