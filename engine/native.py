"""The native kernel: the tape sweeps in C, and the wire decoder beside them.

``NativeKernel`` runs the same forward and reverse sweeps as
``micrograd.kernels.PythonKernel`` with the same IEEE results (libm's ``exp``,
``log``, ``tanh`` and ``pow``; no fast-math), in a tight C loop that
releases the GIL, so several threads can evaluate tapes at once. A batch
``(n, B)`` is swept node by node with a contiguous loop over the B
bindings. When the extension ``micrograd._kernel`` is built (see
``setup.py``), ``micrograd.kernels`` registers a default ``NativeKernel`` as
``"native"`` and uses it first.

Denormals. Gradients that decay through a long chain become subnormal
numbers, which x86 processors handle up to ten times slower.
``NativeKernel(flush_denormals=True)`` sets the processor's flush-to-zero
and denormals-are-zero modes (MXCSR FTZ and DAZ) for the duration of each
sweep, in the sweeping thread only, and restores them afterwards: every
subnormal input and result is then taken as 0, which is no longer exactly
IEEE. It is off by default; ``get_kernel("native")`` is the exact kernel.
On processors other than x86 the option is accepted and does nothing
(``FLUSH_DENORMALS_SUPPORTED`` says which applies).

``decode_graph`` reads the protobuf bytes of a ``micrograd.v1.Graph``
straight into tape columns, without building a message object per node.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _kernel
from . import ops as _ops
from .columns import Columns
from .errors import GraphError

__all__ = [
    "FLUSH_DENORMALS_SUPPORTED",
    "TILE",
    "DecodedGraph",
    "NativeKernel",
    "SweepStopped",
    "assign_values",
    "decode_graph",
    "pack_value",
    "unpack_columns",
    "value_columns",
]

FLUSH_DENORMALS_SUPPORTED: bool = bool(_kernel.FLUSH_DENORMALS_SUPPORTED)
"""Whether ``flush_denormals=True`` changes anything on this processor."""

TILE: int = int(_kernel.TILE)
"""Bindings per tile of ``NativeKernel.evaluate_selected``."""


class SweepStopped(Exception):
    """A sweep that stopped part-way because its ``stop`` flag was set or ``expires`` passed."""


class NativeKernel:
    """The C sweeps over a tape: one binding ``(n,)`` or a node-major batch ``(n, B)``.

    ``forward`` and ``backward`` also take ``stop`` (a buffer whose first byte,
    once non-zero, stops the sweep) and ``expires`` (a ``time.monotonic()``
    instant); the sweep looks at both every 16,384 cells and raises
    ``SweepStopped``, so a cancelled call lets go of its thread at once.
    """

    name = "native"
    stoppable = True
    """Whether ``forward``/``backward`` take ``stop`` and ``expires``."""

    def __init__(self, flush_denormals: bool = False) -> None:
        """``flush_denormals``: treat subnormal numbers as 0 during sweeps (faster, not exact)."""
        self.flush_denormals = bool(flush_denormals)

    def __repr__(self) -> str:
        return f"NativeKernel(flush_denormals={self.flush_denormals})"

    def forward(
        self,
        tape: Columns,
        values: np.ndarray,
        stop: np.ndarray | None = None,
        expires: float | None = None,
    ) -> None:
        """Fill the non-leaf rows of ``values`` (float64, leaves filled) in place."""
        _check_float64("values", values)
        target = values if values.flags.c_contiguous else np.ascontiguousarray(values)
        done = _kernel.forward(
            tape.code,
            tape.arg0,
            tape.arg1,
            tape.const,
            target,
            flush_denormals=self.flush_denormals,
            arg2=tape.arg2,
            stop=stop,
            expires=expires or 0.0,
        )
        if not done:
            raise SweepStopped("the forward sweep was stopped")
        if target is not values:
            values[...] = target

    def backward(
        self,
        tape: Columns,
        values: np.ndarray,
        grads: np.ndarray,
        output: int,
        stop: np.ndarray | None = None,
        expires: float | None = None,
    ) -> None:
        """Add d(output)/d(node) into ``grads`` (zeroed, shaped like ``values``) in place."""
        self._reverse(tape, values, grads, output, False, stop, expires)

    def vjp(
        self,
        tape: Columns,
        values: np.ndarray,
        cotangents: np.ndarray,
        output: int,
        stop: np.ndarray | None = None,
        expires: float | None = None,
    ) -> None:
        """One reverse sweep seeded at several nodes: ``cotangents`` holds the weights in rows
        up to ``output`` and becomes the vector-Jacobian product (per column for a batch)."""
        self._reverse(tape, values, cotangents, output, True, stop, expires)

    def _reverse(
        self,
        tape: Columns,
        values: np.ndarray,
        grads: np.ndarray,
        output: int,
        seeded: bool,
        stop: np.ndarray | None,
        expires: float | None,
    ) -> None:
        _check_float64("values", values)
        _check_float64("grads", grads)
        target = grads if grads.flags.c_contiguous else np.ascontiguousarray(grads)
        done = _kernel.backward(
            tape.code,
            tape.arg0,
            tape.arg1,
            tape.const,
            np.ascontiguousarray(values),
            target,
            output,
            flush_denormals=self.flush_denormals,
            arg2=tape.arg2,
            seeded=seeded,
            stop=stop,
            expires=expires or 0.0,
        )
        if not done:
            raise SweepStopped("the reverse sweep was stopped")
        if target is not grads:
            grads[...] = target

    def hvp(
        self,
        tape: Columns,
        values: np.ndarray,
        tangents: np.ndarray,
        grads: np.ndarray,
        grad_tangents: np.ndarray,
        output: int,
    ) -> None:
        """Forward-over-reverse in C: values and tangents forward, then grads and
        ``grad_tangents`` (zeroed; at the inputs, the Hessian-vector product)."""
        arrays = [values, tangents, grads, grad_tangents]
        for what, array in zip(("values", "tangents", "grads", "grad_tangents"), arrays):
            _check_float64(what, array)
        work = [a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in arrays]
        _kernel.hvp(
            tape.code,
            tape.arg0,
            tape.arg1,
            tape.const,
            work[0],
            work[1],
            work[2],
            work[3],
            output,
            flush_denormals=self.flush_denormals,
            arg2=tape.arg2,
        )
        for given, used in zip(arrays, work):
            if used is not given:
                given[...] = used

    def evaluate_selected(
        self,
        tape: Columns,
        inputs: np.ndarray,
        bindings: np.ndarray,
        output: int,
        selection: np.ndarray,
        gradients: bool = True,
        threads: int = 1,
        stop: np.ndarray | None = None,
        expires: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Values and gradients of the ``selection`` nodes for every row of ``bindings``.

        ``bindings`` is ``(B, k)`` over the ``inputs`` nodes, ``selection``
        node indices; returns ``(B, s)`` arrays (gradients ``None`` unless
        asked). The batch is swept ``TILE`` bindings at a time in cache-sized
        buffers spread over up to ``threads`` threads; a batch smaller than a
        tile runs binding by binding through the tape's compiled program
        (``program``). Bit-identical to the full sweeps.
        """
        bind = np.ascontiguousarray(bindings, dtype=np.float64)
        sel = np.ascontiguousarray(selection, dtype=np.int64)
        rows = int(bind.shape[0])
        program = self.program(tape, inputs, output, build=False) if rows < TILE else None
        if program is None and (rows < TILE or tape.arg2 is not None):
            # the full sweeps: a first small call, or a ternary tape (tiles take binary ops)
            values = np.repeat(tape.const[:, None], rows, axis=1)
            values[inputs, :] = bind.T
            self.forward(tape, values, stop, expires)
            picked = np.ascontiguousarray(values[sel].T)
            if not gradients:
                return picked, None
            grads = np.zeros_like(values)
            self.backward(tape, values, grads, output, stop, expires)
            return picked, np.ascontiguousarray(grads[sel].T)
        values_out = np.empty((rows, sel.shape[0]))
        grads_out = np.empty((rows, sel.shape[0])) if gradients else None
        flush, until = self.flush_denormals, expires or 0.0
        if program is not None:  # one binding after another through the compiled program
            done = _kernel.run_program(
                program,
                bind,
                sel,
                values_out,
                grads_out,
                flush_denormals=flush,
                stop=stop,
                expires=until,
            )
        else:
            done = _kernel.evaluate_tiles(
                tape.code,
                tape.arg0,
                tape.arg1,
                tape.const,
                np.ascontiguousarray(inputs, dtype=np.int64),
                bind,
                output,
                sel,
                values_out,
                grads_out,
                threads=max(1, min(int(threads), rows // TILE)),
                flush_denormals=flush,
                stop=stop,
                expires=until,
            )
        if not done:
            raise SweepStopped("the selected sweeps were stopped")
        return values_out, grads_out

    def program(
        self, tape: Columns, inputs: np.ndarray, output: int, build: bool = True
    ) -> object | None:
        """The compiled one-binding program of ``tape`` for ``output`` bound through ``inputs``.

        Built in C and kept for the last ``PROGRAMS_KEPT`` (tape, output)
        pairs while their tape lives, up to ``PROGRAM_BYTES_KEPT`` in all (a
        tape is immutable). Building one costs several sweeps, so with
        ``build=False`` a pair seen for the first time gets ``None`` (the
        caller sweeps the tape itself) and the program is built on the second.
        """
        inputs = np.ascontiguousarray(inputs, dtype=np.int64)
        key = (id(tape), int(output))
        with _PROGRAMS_LOCK:
            kept = _PROGRAMS.get(key)
            if (
                kept is not None
                and kept[0]() is tape
                and kept[2] is not None
                and (kept[1] is inputs or np.array_equal(kept[1], inputs))
            ):
                _PROGRAMS.move_to_end(key)
                return kept[2]
            first_sight = kept is None or kept[0]() is not tape
        size = PROGRAM_BYTES_PER_NODE * len(tape.code)
        if size > PROGRAM_BYTES_KEPT and not build:
            return None  # never kept: the caller's own sweeps are as fast as building one
        try:
            ref: Callable[[], object] = weakref.ref(tape)
        except TypeError:  # not weakly referable: never kept
            ref = _dead
        if first_sight and not build:
            with _PROGRAMS_LOCK:  # seen once: remembered without a program
                _keep(key, (ref, inputs, None))
            return None
        program = _kernel.compile_program(
            tape.code,
            tape.arg0,
            tape.arg1,
            tape.const,
            inputs,
            int(output),
            arg2=tape.arg2,
        )
        if ref is not _dead and size <= PROGRAM_BYTES_KEPT:
            with _PROGRAMS_LOCK:
                _keep(key, (ref, inputs, program))
        return program


PROGRAMS_KEPT = 16
"""How many (tape, output) pairs ``NativeKernel.program`` remembers, with or without a program."""
PROGRAM_BYTES_KEPT = 256 << 20
"""The most memory the kept programs may take in all (estimated at ``PROGRAM_BYTES_PER_NODE``)."""
PROGRAM_BYTES_PER_NODE = 80
"""About what a compiled program takes per tape node: steps, partials and its kept workspace."""
_Kept = tuple[Callable[[], object], np.ndarray, object | None]
_PROGRAMS: OrderedDict[tuple[int, int], _Kept] = OrderedDict()
_PROGRAMS_LOCK = threading.Lock()


def _dead() -> None:
    """A reference to nothing: a tape that cannot be weakly referenced is never found again."""
    return None


def _keep(key: tuple[int, int], entry: _Kept) -> None:
    """Remember ``entry`` as the newest kept pair; drop the oldest past either budget (call
    under ``_PROGRAMS_LOCK``)."""
    _PROGRAMS[key] = entry
    _PROGRAMS.move_to_end(key)

    def kept_bytes() -> int:
        return sum(
            PROGRAM_BYTES_PER_NODE * len(getattr(tape, "code", ()))
            for ref, _, program in _PROGRAMS.values()
            if program is not None and (tape := ref()) is not None
        )

    while len(_PROGRAMS) > PROGRAMS_KEPT or (
        len(_PROGRAMS) > 1 and kept_bytes() > PROGRAM_BYTES_KEPT
    ):
        _PROGRAMS.popitem(last=False)


def _check_float64(what: str, array: np.ndarray) -> None:
    """Raise ``TypeError`` unless ``array`` is a float64 numpy array."""
    if not isinstance(array, np.ndarray) or array.dtype != np.float64:
        got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise TypeError(f"{what} must be a float64 numpy array, got {got}")


class DecodedGraph(NamedTuple):
    """The columns of a wire ``Graph``, ready for ``Tape.from_arrays``."""

    code: np.ndarray
    """uint8 op codes, as sent (not yet checked against the op table)."""
    arg0: np.ndarray
    """int32 first argument of each node, -1 where the node has none."""
    arg1: np.ndarray
    """int32 second argument of each node, -1 where the node has none."""
    arg2: np.ndarray | None
    """int32 third argument of each node (-1 where none), or None when no node has one."""
    const: np.ndarray
    """float64 ``value`` of each node (0 where not sent)."""
    names: list[tuple[int, str]]
    """``(node, name)`` for every node with a non-empty name, in node order."""


def decode_graph(data: bytes | bytearray | memoryview) -> DecodedGraph:
    """Decode the protobuf wire bytes of a ``micrograd.v1.Graph`` into columns.

    Accepts packed and unpacked ``args`` and skips unknown fields. Malformed
    bytes (a truncated varint or field, an invalid wire type, more than two
    args on a node) raise ``GraphError`` naming the node. Only the framing is
    checked here; ``Tape.from_arrays`` then checks ops and argument indices.
    """
    try:
        n, code, arg0, arg1, arg2, const, names = _kernel.decode_graph(data)
    except ValueError as exc:
        if len(exc.args) != 2:
            raise
        node, reason = exc.args
        raise GraphError(node, reason) from None
    return DecodedGraph(
        np.frombuffer(code, dtype=np.uint8, count=n),
        np.frombuffer(arg0, dtype=np.int32, count=n),
        np.frombuffer(arg1, dtype=np.int32, count=n),
        None if arg2 is None else np.frombuffer(arg2, dtype=np.int32, count=n),
        np.frombuffer(const, dtype=np.float64, count=n),
        names,
    )


_NOT_AN_OP = 255
_ARITY = bytes(
    _ops.BY_CODE[k].arity if k in _ops.BY_CODE else _NOT_AN_OP for k in range(_ops.MAX_CODE + 1)
)
_USES_VALUE = bytes(
    int(_ops.BY_CODE[k].uses_value) if k in _ops.BY_CODE else 0 for k in range(_ops.MAX_CODE + 1)
)


def unpack_columns(
    ops: bytes, args: bytes, values: bytes
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Validate a ``PackedGraph``'s byte columns in one C pass: ``(arg0, arg1, arg2, const)``.

    ``arg2`` is ``None`` when no node has a third argument.

    ``ops`` is itself the code column. The checks are those of
    ``micrograd.codec.unpack`` plus ``Tape.from_arrays``: known ops, exact
    argument and value counts, arguments that are earlier nodes. Raises
    ``GraphError`` with the same node, field and reason as those would.
    """
    try:
        arg0, arg1, arg2, const = _kernel.unpack_columns(ops, args, values, _ARITY, _USES_VALUE)
    except ValueError as exc:
        if len(exc.args) != 3:
            raise
        node, field, reason = exc.args
        raise GraphError(None if node < 0 else node, reason, field) from None
    return (
        np.frombuffer(arg0, dtype=np.int32),
        np.frombuffer(arg1, dtype=np.int32),
        None if arg2 is None else np.frombuffer(arg2, dtype=np.int32),
        np.frombuffer(const, dtype=np.float64),
    )


def value_columns(
    root: object, targets: Sequence[object]
) -> tuple[list[Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]] | None:
    """The tape columns of the ``Value`` graph behind ``root``, walked in C.

    Returns ``(order, code, arg0, arg1, const, indices)`` in the order of
    ``micrograd.engine.topological_order``, ``indices`` giving each of
    ``targets``' node index (-1: not in the graph); ``None`` when the graph
    holds anything but plain ``Value`` nodes of known ops (use the Python path).
    """
    walked = _kernel.value_columns(root, targets, _ARITY)
    if walked is None:
        return None
    order, code, arg0, arg1, const, indices = walked
    return (
        order,
        np.frombuffer(code, dtype=np.uint8),
        np.frombuffer(arg0, dtype=np.int32),
        np.frombuffer(arg1, dtype=np.int32),
        np.frombuffer(const, dtype=np.float64),
        indices,
    )


def pack_value(
    root: object, targets: Sequence[object]
) -> tuple[list[Any], bytes, bytes, bytes, list[int]] | None:
    """The ``PackedGraph`` columns ``(order, ops, args, values, indices)`` of ``root``'s graph.

    As ``value_columns``, but straight into the wire's little-endian byte columns.
    """
    packed: tuple[list[Any], bytes, bytes, bytes, list[int]] | None = _kernel.pack_value(
        root, targets, _ARITY, _USES_VALUE
    )
    return packed


def assign_values(order: list[Any], values: np.ndarray, grads: np.ndarray) -> bool:
    """Write values and gradients onto ``Value`` nodes in tape order, as ``backward()`` would.

    Interior nodes take their gradient, leaves add it to theirs. ``False``
    (nothing written) when a node is not a plain ``Value``.
    """
    done: bool = _kernel.assign_values(
        order,
        np.ascontiguousarray(values, dtype=np.float64),
        np.ascontiguousarray(grads, dtype=np.float64),
        _ARITY,
    )
    return done
