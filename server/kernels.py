"""Which kernel evaluates tapes in this server, including the ``Value`` reference kernel.

``auto``, ``native`` and ``python`` come from the engine's kernel registry.
``value`` evaluates through ``micrograd.engine.Value`` objects, one per node,
built from the tape's arrays in order and differentiated with ``backward()``:
slow, but it is the engine's own definition of the numbers, so tests can
hold every other kernel equal to it through the server.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from micrograd import ops as _ops
from micrograd.engine import Value
from micrograd.tape import Kernel, Tape, get_kernel

from .config import SettingsError

__all__ = ["ValueKernel", "resolve_kernel"]


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
    def _build(tape: Tape, leaves: np.ndarray) -> list[Value]:
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

    def forward(self, tape: Tape, values: np.ndarray) -> None:
        """Fill ``values`` (``(n,)`` or ``(n, B)``) from a ``Value`` graph per binding."""
        columns = values[:, None] if values.ndim == 1 else values
        for j in range(columns.shape[1]):
            nodes = self._build(tape, columns[:, j])
            columns[:, j] = [v.data for v in nodes]

    def backward(self, tape: Tape, values: np.ndarray, grads: np.ndarray, output: int) -> None:
        """Fill ``grads`` with ``Value.backward()`` from node ``output``, per binding."""
        columns = values[:, None] if values.ndim == 1 else values
        grad_columns = grads[:, None] if grads.ndim == 1 else grads
        for j in range(columns.shape[1]):
            nodes = self._build(tape, columns[:, j])
            nodes[output].backward()
            grad_columns[:, j] = [v.grad for v in nodes]


def resolve_kernel(name: str, flush_denormals: bool = False) -> Kernel:
    """The kernel a ``--kernel`` setting names; ``SettingsError`` if it cannot run here."""
    if name == "value":
        kernel: Kernel = ValueKernel()
    else:
        try:
            kernel = get_kernel(None if name == "auto" else name)
        except ValueError as exc:
            raise SettingsError(f"--kernel {name}: {exc}") from None
    if flush_denormals:
        if kernel.name != "native":
            raise SettingsError(
                f"--flush-denormals needs the native kernel; the {kernel.name} kernel is exact IEEE"
            )
        from micrograd.native import NativeKernel

        kernel = NativeKernel(flush_denormals=True)
    return kernel
