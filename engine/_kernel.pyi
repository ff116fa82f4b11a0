"""Types of the C extension ``micrograd._kernel`` (see ``_kernel.c`` and ``native.py``)."""

from typing import Any, TypeVar

_T = TypeVar("_T")

OPS: tuple[tuple[int, str, int], ...]
"""``(code, name, arity)`` of every op the native sweeps implement."""
FLUSH_DENORMALS_SUPPORTED: bool
"""Whether ``flush_denormals=True`` sets the processor's FTZ/DAZ modes here."""
TILE: int
"""Bindings per tile of ``evaluate_tiles``'s narrow tiles (the smallest batch it tiles)."""
TILE_WIDE: int
"""Bindings per tile of its wide tiles, taken when their rows fit the cache."""

def forward(
    code: Any,
    arg0: Any,
    arg1: Any,
    const: Any,
    values: Any,
    flush_denormals: bool = False,
    arg2: Any = None,
    stop: Any = None,
    expires: float = 0.0,
) -> bool:
    """Fill the non-leaf rows of ``values`` ((n,) or (n, B) float64) in place; False if it
    stopped early (``stop[0]`` set, or ``time.monotonic()`` past ``expires``)."""

def backward(
    code: Any,
    arg0: Any,
    arg1: Any,
    const: Any,
    values: Any,
    grads: Any,
    output: int,
    flush_denormals: bool = False,
    arg2: Any = None,
    seeded: bool = False,
    stop: Any = None,
    expires: float = 0.0,
) -> bool:
    """Add d(output)/d(node) into ``grads`` (zeroed, or holding cotangent seeds) in place;
    False if it stopped early (as ``forward``)."""

def hvp(
    code: Any,
    arg0: Any,
    arg1: Any,
    const: Any,
    values: Any,
    tangents: Any,
    grads: Any,
    grad_tangents: Any,
    output: int,
    flush_denormals: bool = False,
    arg2: Any = None,
) -> None:
    """Forward-over-reverse: values, tangents, grads and grad_tangents (H v at the inputs)."""

def decode_graph(
    buf: bytes | bytearray | memoryview,
) -> tuple[
    int, bytearray, bytearray, bytearray, bytearray | None, bytearray, list[tuple[int, str]]
]:
    """Columns of a wire ``micrograd.v1.Graph``: ``(n, code, arg0, arg1, arg2, const, names)``."""

def unpack_columns(
    ops: bytes, args: bytes, values: bytes, arity: bytes, uses_value: bytes
) -> tuple[bytearray, bytearray, bytearray | None, bytearray]:
    """Validated ``(arg0, arg1, arg2, const)`` of a PackedGraph's columns (arg2 None if unused)."""

def evaluate_tiles(
    code: Any,
    arg0: Any,
    arg1: Any,
    const: Any,
    inputs: Any,
    bindings: Any,
    output: int,
    selection: Any,
    values_out: Any,
    grads_out: Any = None,
    threads: int = 1,
    flush_denormals: bool = False,
    stop: Any = None,
    expires: float = 0.0,
    tile: int = 0,
) -> bool:
    """Fill ``values_out``/``grads_out`` ``(B, s)`` with the selected nodes of a batch, by tiles
    of ``tile`` bindings (``TILE``, ``TILE_WIDE``, 0: chosen from the graph); False if it stopped
    early (as ``forward``)."""

def compile_program(
    code: Any,
    arg0: Any,
    arg1: Any,
    const: Any,
    inputs: Any,
    output: int,
    arg2: Any = None,
) -> object:
    """A checked one-binding program of the tape for ``output``, bound through ``inputs``."""

def run_program(
    program: object,
    bindings: Any,
    selection: Any,
    values_out: Any,
    grads_out: Any = None,
    flush_denormals: bool = False,
    stop: Any = None,
    expires: float = 0.0,
) -> bool:
    """Fill ``values_out``/``grads_out`` ``(B, s)`` row by row through ``program``; False if it
    stopped early (as ``forward``)."""

def value_columns(
    root: Any, targets: Any, arity: bytes
) -> tuple[list[Any], bytearray, bytearray, bytearray, bytearray, list[int]] | None:
    """Tape columns of the ``Value`` graph behind ``root`` (None: take the Python path)."""

def pack_value(
    root: Any, targets: Any, arity: bytes, uses_value: bytes
) -> tuple[list[Any], bytes, bytes, bytes, list[int]] | None:
    """``PackedGraph`` columns of the ``Value`` graph behind ``root`` (None: Python path)."""

def assign_values(order: list[Any], values: Any, grads: Any, arity: bytes) -> bool:
    """Write values and gradients onto the nodes as ``Value.backward`` would."""

def value_backward(root: Any, arity: bytes) -> bool:
    """``Value.backward()`` on the C reverse sweep; False where Python must run it."""

def new_node(cls: type[_T]) -> _T:
    """``object.__new__(cls)``, not tracked by the cycle collector."""
