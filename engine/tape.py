"""The tape: an expression graph compiled to flat arrays, and its sweeps.

A ``Tape`` lists nodes in topological order as parallel numpy arrays: the
op code of each node, the indices of its arguments (two columns, and a
third, ``arg2``, only when some node is ternary), and its constant
``value``. A forward sweep fills every node's value; a reverse
sweep fills the gradient of one output with respect to every node. Nothing
here holds a Python object per node, so the same arrays go straight from
the wire decoder to a kernel and back out into a response.

The sweeps themselves are done by a kernel (``micrograd.kernels``); the
tape validates its columns and hands them over.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import engine as _engine
from . import ops as _ops
from .engine import Value, graph_order, topological_order
from .errors import GraphError
from .kernels import Kernel, get_kernel

try:  # the C walk of a Value graph, when the extension is built
    from .native import value_columns as _native_columns
except ImportError:  # pragma: no cover - pure-Python installs
    _native_columns = None  # type: ignore[assignment]

__all__ = ["Tape"]

_WHERE = _ops.BY_NAME["where"].code
_INPUT = _ops.INPUT.code


@dataclass(frozen=True, eq=False)
class Tape:
    """A graph as arrays in topological order: ``code``, ``arg0``, ``arg1``, ``const``.

    ``arg0``/``arg1`` are ``-1`` where the op takes fewer arguments; ``arg2``
    holds third arguments (``where``), or is ``None`` when no node has one;
    ``const`` holds constants, input defaults and ``pow`` exponents.
    ``inputs`` lists the indices of the input nodes in order and ``names``
    maps node names to node indices (any node may be named; only inputs
    can be bound by name).
    """

    code: np.ndarray
    arg0: np.ndarray
    arg1: np.ndarray
    const: np.ndarray
    names: Mapping[str, int] = field(default_factory=dict)
    arg2: np.ndarray | None = None
    inputs: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", np.flatnonzero(self.code == _INPUT).astype(np.int64))
        # A tape never changes once built, so what is derived from it (``inputs``, the native
        # kernel's compiled programs, the graph id) stays true: it holds read-only views (a
        # caller's own array keeps its flags; changing it under a tape is not supported).
        for name in ("code", "arg0", "arg1", "const", "arg2", "inputs"):
            column = getattr(self, name)
            if isinstance(column, np.ndarray) and column.flags.writeable:
                view = column.view()
                view.flags.writeable = False
                object.__setattr__(self, name, view)

    def __len__(self) -> int:
        return int(self.code.shape[0])

    # -- construction ------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        code: np.ndarray | Sequence[int],
        arg0: np.ndarray | Sequence[int],
        arg1: np.ndarray | Sequence[int],
        const: np.ndarray | Sequence[float],
        names: Mapping[str, int] | None = None,
        arg2: np.ndarray | Sequence[int] | None = None,
    ) -> Tape:
        """Validate the columns in one vectorised pass and build a tape.

        Raises ``GraphError`` naming the first node that is wrong: an unknown
        op, a missing or surplus argument, an argument that is not an earlier
        node, or a name on a node that does not exist. ``arg2`` (third
        arguments, -1 where none) may be left out when no node is ternary.
        """
        c = _checked_codes(code)
        a, b = np.asarray(arg0), np.asarray(arg1)
        z = None if arg2 is None else np.asarray(arg2)
        k = np.ascontiguousarray(const, dtype=np.float64)
        n = c.shape[0]
        if n == 0:
            raise GraphError(None, "the graph has no nodes")
        if not (a.shape == b.shape == k.shape == (n,)) or (z is not None and z.shape != (n,)):
            raise GraphError(
                None, "code, arg0, arg1, arg2 and const must be 1-D and of the same length"
            )
        _validate(c, a, b, k, z)
        a = np.ascontiguousarray(a, dtype=np.int32)
        b = np.ascontiguousarray(b, dtype=np.int32)
        if z is not None:
            z = np.ascontiguousarray(z, dtype=np.int32) if (z != -1).any() else None
        return cls(c, a, b, k, _checked_names(names, n), z)

    @classmethod
    def from_checked_columns(
        cls,
        code: np.ndarray,
        arg0: np.ndarray,
        arg1: np.ndarray,
        const: np.ndarray,
        names: Mapping[str, int] | None = None,
        arg2: np.ndarray | None = None,
    ) -> Tape:
        """Build from columns a decoder has already validated by ``from_arrays``'s rules.

        For ``micrograd.native.unpack_columns``, which checks while it
        decodes; only the names are checked here. Columns must be uint8,
        int32, int32 and float64 (``arg2`` int32 or ``None``).
        """
        return cls(code, arg0, arg1, const, _checked_names(names, int(code.shape[0])), arg2)

    @classmethod
    def from_nodes(
        cls,
        nodes: Iterable[
            tuple[str | int, Sequence[int], float] | tuple[str | int, Sequence[int], float, str]
        ],
    ) -> Tape:
        """Build from ``(op, args, value[, name])`` tuples in topological order.

        ``op`` is an op name (``"mul"``) or wire code; ``args`` index earlier
        nodes. Meant for hand-written graphs and tests: per-node Python.
        """
        code: list[int] = []
        a: list[int] = []
        b: list[int] = []
        z: list[int] = []
        k: list[float] = []
        names: dict[str, int] = {}
        for i, node in enumerate(nodes):
            op_ref, args, value = node[0], node[1], node[2]
            op = _ops.BY_NAME.get(op_ref) if isinstance(op_ref, str) else _ops.BY_CODE.get(op_ref)
            if op is None:
                raise GraphError(i, f"unknown op {op_ref!r}; known: {', '.join(_ops.BY_NAME)}")
            if len(args) != op.arity:
                raise GraphError(i, f"{op.name} takes {op.arity} argument(s), got {len(args)}")
            code.append(op.code)
            a.append(args[0] if op.arity >= 1 else -1)
            b.append(args[1] if op.arity >= 2 else -1)
            z.append(args[2] if op.arity == 3 else -1)
            k.append(float(value))
            if len(node) > 3 and node[3]:  # type: ignore[misc]
                names[node[3]] = i  # type: ignore[misc]
        return cls.from_arrays(code, a, b, k, names, z)

    @classmethod
    def from_value(
        cls, root: Value, names: Mapping[str, Value] | None = None
    ) -> tuple[Tape, list[Value]]:
        """Compile the graph behind ``root`` (its last node); also return the nodes in order.

        Raises ``GraphError`` naming the op of a custom node (micrograd's
        ``Value(data, children, op)``): it has no wire code. The walk runs in C
        when the extension is built (same order as ``topological_order``; it
        declines graphs with ``where`` or custom nodes), in Python otherwise.
        """
        targets = list((names or {}).values())
        walked = _native_columns(root, targets) if _native_columns is not None else None
        if walked is not None:
            order, code, a, b, const, found = walked
            name_index: dict[str, int] = {}
            for name, i in zip((names or {}), found, strict=True):
                if i < 0:
                    raise GraphError(None, f"input {name!r} is not part of the graph")
                name_index[name] = i
            return cls(code, a, b, const, name_index), order
        if _engine._WIDE:
            return cls.from_values([root], names)
        order = topological_order(root)
        index = {v: i for i, v in enumerate(order)}
        n = len(order)
        code = np.fromiter((v._code for v in order), dtype=np.uint8, count=n)
        a = np.fromiter(
            (-1 if v._a is None else index[v._a] for v in order), dtype=np.int32, count=n
        )
        b = np.fromiter(
            (-1 if v._b is None else index[v._b] for v in order), dtype=np.int32, count=n
        )
        const = np.fromiter(
            (v.data if v._a is None else v._c for v in order), dtype=np.float64, count=n
        )
        name_index = {}
        for name, v in (names or {}).items():
            if v not in index:
                raise GraphError(None, f"input {name!r} is not part of the graph")
            name_index[name] = index[v]
        return cls(code, a, b, const, name_index), order

    @classmethod
    def from_values(
        cls, roots: Sequence[Value], names: Mapping[str, Value] | None = None
    ) -> tuple[Tape, list[Value]]:
        """Compile the graph behind several ``roots`` (any nodes: where, custom ones refused).

        The nodes come in ``graph_order``; return the tape and the nodes in order.
        """
        order = graph_order(list(roots))
        index = {v: i for i, v in enumerate(order)}
        n = len(order)
        code = np.zeros(n, dtype=np.uint8)
        cols = np.full((3, n), -1, dtype=np.int32)
        const = np.zeros(n, dtype=np.float64)
        for i, v in enumerate(order):
            if v._code == _engine._CUSTOM:
                raise GraphError(
                    i,
                    f"op {v._op!r} is a custom op (Value(data, children, {v._op!r}) with a "
                    "_backward closure) and has no wire code; build it from the op table's "
                    f"ops instead (known: {', '.join(_ops.BY_NAME)})",
                )
            code[i] = v._code
            args = _engine._arguments(v)
            for s, arg in enumerate(args):
                cols[s, i] = index[arg]
            const[i] = v.data if not args else (0.0 if v._code == _WHERE else v._c)
        name_index: dict[str, int] = {}
        for name, v in (names or {}).items():
            if v not in index:
                raise GraphError(None, f"input {name!r} is not part of the graph")
            name_index[name] = index[v]
        arg2 = cols[2].copy() if (cols[2] != -1).any() else None
        tape = cls(code, cols[0].copy(), cols[1].copy(), const, name_index, arg2)
        return tape, order

    # -- evaluation --------------------------------------------------------

    def leaf_values(self, bindings: np.ndarray | Sequence[float] | None = None) -> np.ndarray:
        """Values with leaves filled in: constants, then input defaults overridden by ``bindings``.

        ``bindings`` has one entry per input node (``(k,)``) or one row per
        binding (``(B, k)``); the result is ``(n,)`` or ``(n, B)``.
        """
        if bindings is None:
            return self.const.copy()
        bind = np.asarray(bindings, dtype=np.float64)
        k = self.inputs.shape[0]
        if bind.ndim == 1:
            if bind.shape[0] != k:
                raise GraphError(
                    None, f"expected {k} input value(s), got {bind.shape[0]}", "inputs"
                )
            values = self.const.copy()
            values[self.inputs] = bind
            return values
        if bind.ndim != 2 or bind.shape[1] != k:
            raise GraphError(None, f"a batch must have shape (B, {k}), got {bind.shape}", "inputs")
        values = np.repeat(self.const[:, None], bind.shape[0], axis=1)
        values[self.inputs, :] = bind.T
        return values

    def forward(
        self, bindings: np.ndarray | Sequence[float] | None = None, kernel: Kernel | None = None
    ) -> np.ndarray:
        """Every node's value: shape ``(n,)``, or ``(B, n)`` for a batch of bindings."""
        values = self.leaf_values(bindings)
        (kernel or get_kernel()).forward(self, values)
        return values if values.ndim == 1 else values.T

    def backward(
        self, values: np.ndarray, output: int = -1, kernel: Kernel | None = None
    ) -> np.ndarray:
        """Gradient of node ``output`` (default: last) w.r.t. every node, shaped like ``values``."""
        out = self.check_output(output)
        cols = np.ascontiguousarray(values if values.ndim == 1 else values.T, dtype=np.float64)
        grads = np.zeros(cols.shape)  # C order, as the kernels want (zeros_like would keep F)
        (kernel or get_kernel()).backward(self, cols, grads, out)
        return grads if grads.ndim == 1 else grads.T

    def evaluate(
        self,
        bindings: np.ndarray | Sequence[float] | None = None,
        output: int = -1,
        kernel: Kernel | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Forward then backward: ``(values, grads)``, each ``(n,)`` or ``(B, n)``."""
        kern = kernel or get_kernel()
        out = self.check_output(output)
        values = self.leaf_values(bindings)
        kern.forward(self, values)
        grads = np.zeros_like(values)
        kern.backward(self, values, grads, out)
        if values.ndim == 1:
            return values, grads
        return values.T, grads.T

    def evaluate_selected(
        self,
        bindings: np.ndarray | Sequence[Sequence[float]],
        selection: np.ndarray | Sequence[int],
        output: int = -1,
        gradients: bool = True,
        kernel: Kernel | None = None,
        threads: int = 1,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """A batch's values and gradients at the ``selection`` nodes only: ``(B, s)`` each.

        ``bindings`` is ``(B, k)`` over the inputs. A kernel with a tiled
        sweep (the native one) never holds the full ``(n, B)`` arrays and may
        use up to ``threads`` threads; any other kernel runs the full sweeps
        and picks the columns. Gradients are ``None`` unless asked for.
        """
        kern = kernel or get_kernel()
        out = self.check_output(output)
        n = len(self)
        sel = np.asarray(selection, dtype=np.int64).reshape(-1)
        if sel.size and (int(sel.min()) < 0 or int(sel.max()) >= n):
            raise GraphError(None, f"a selected node is out of range for {n} nodes", "selection")
        bind = np.asarray(bindings, dtype=np.float64)
        k = self.inputs.shape[0]
        if bind.ndim != 2 or bind.shape[1] != k:
            raise GraphError(None, f"a batch must have shape (B, {k}), got {bind.shape}", "inputs")
        tiled = getattr(kern, "evaluate_selected", None)
        if tiled is not None:
            picked: tuple[np.ndarray, np.ndarray | None] = tiled(
                self, self.inputs, bind, out, sel, gradients, threads
            )
            return picked
        values = self.leaf_values(bind)
        kern.forward(self, values)
        chosen = np.ascontiguousarray(values[sel].T)
        if not gradients:
            return chosen, None
        grads = np.zeros(values.shape)
        kern.backward(self, values, grads, out)
        return chosen, np.ascontiguousarray(grads[sel].T)

    def check_output(self, output: int) -> int:
        """Resolve a possibly negative output index, or raise ``GraphError``."""
        n = len(self)
        if not -n <= output < n:
            raise GraphError(None, f"output {output} is out of range for {n} nodes", "output")
        return output % n


def _checked_names(names: Mapping[str, int] | None, n: int) -> dict[str, int]:
    """The names as a dict, each pointing at one of the ``n`` nodes."""
    checked = dict(names or {})
    for name, i in checked.items():
        if not 0 <= i < n:
            raise GraphError(
                None, f"name {name!r} refers to node {i}, but the graph has {n} nodes", "names"
            )
    return checked


def _checked_codes(code: np.ndarray | Sequence[int]) -> np.ndarray:
    """Op codes as contiguous uint8, reporting the first one outside the table."""
    given = np.asarray(code)
    if given.size == 0:  # checked first: an empty list has numpy's default dtype, float
        raise GraphError(None, "the graph has no nodes")
    if given.dtype.kind not in "iu":
        raise GraphError(None, f"op codes must be integers, got {given.dtype}")
    bad = np.flatnonzero((given < 1) | (given > _ops.MAX_CODE))
    if bad.size:
        i = int(bad[0])
        raise GraphError(i, _ops.unknown_op(int(given[i])))
    return np.ascontiguousarray(given, dtype=np.uint8)


def _validate(
    code: np.ndarray, a: np.ndarray, b: np.ndarray, const: np.ndarray, z: np.ndarray | None = None
) -> None:
    """Check argument references and constants of every node at once (numpy, no Python loop).

    ``a``, ``b`` and ``z`` may be any integer dtype; they are compared before narrowing.
    """
    if z is None:
        z = np.full(code.shape[0], -1, dtype=np.int32)
    if a.dtype.kind not in "iu" or b.dtype.kind not in "iu" or z.dtype.kind not in "iu":
        raise GraphError(None, f"argument indices must be integers, got {a.dtype} and {b.dtype}")
    arity = _ops.ARITY[code]
    idx = np.arange(code.shape[0], dtype=np.int64)
    stray = ~_ops.USES_VALUE[code] & (const != 0.0)
    if stray.any():
        i = int(np.flatnonzero(stray)[0])
        op = _ops.BY_CODE[int(code[i])]
        raise GraphError(
            i,
            f"{op.name} does not use a value, but value is {const[i]!r}; leave it 0",
            f"nodes[{i}].value",
        )
    for slot, col, needed in ((0, a, arity >= 1), (1, b, arity >= 2), (2, z, arity == 3)):
        missing = needed & (col < 0)
        surplus = ~needed & (col != -1)
        forward_ref = needed & (col >= idx)
        problems = missing | surplus | forward_ref
        if problems.any():
            i = int(np.flatnonzero(problems)[0])
            op = _ops.BY_CODE[int(code[i])]
            if missing[i]:
                reason = f"{op.name} takes {op.arity} argument(s); argument {slot} is missing"
            elif surplus[i]:
                reason = f"{op.name} takes {op.arity} argument(s); argument {slot} must be absent"
            else:
                reason = (
                    f"argument {slot} refers to node {int(col[i])}, which does not come before "
                    f"node {i} (nodes may only refer to earlier nodes)"
                )
            raise GraphError(
                i, reason, f"nodes[{i}].args[{slot}]" if not surplus[i] else f"nodes[{i}].args"
            )
