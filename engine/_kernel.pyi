"""Types of the C extension ``micrograd._kernel`` (see ``_kernel.c`` and ``native.py``)."""

from typing import Any

OPS: tuple[tuple[int, str, int], ...]
"""``(code, name, arity)`` of every op the native sweeps implement."""
FLUSH_DENORMALS_SUPPORTED: bool
"""Whether ``flush_denormals=True`` sets the processor's FTZ/DAZ modes here."""

def forward(
    code: Any,
    arg0: Any,
    arg1: Any,
    const: Any,
    values: Any,
    flush_denormals: bool = False,
    arg2: Any = None,
) -> None:
    """Fill the non-leaf rows of ``values`` ((n,) or (n, B) float64) in place."""

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
) -> None:
    """Add d(output)/d(node) into ``grads`` (zeroed, or holding cotangent seeds) in place."""

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
