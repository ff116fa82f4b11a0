"""Number arrays on the wire: little-endian float64 bytes and repeated doubles."""

from __future__ import annotations

import numpy as np
from micrograd.v1 import gradient_service_pb2 as pb

__all__ = ["f64_array", "f64_bytes", "response_arrays"]

_F64 = np.dtype("<f8")


def f64_bytes(a: np.ndarray) -> bytes:
    """``a`` flattened (row-major) as little-endian float64 bytes."""
    return np.ascontiguousarray(a, dtype=_F64).tobytes()


def f64_array(data: bytes) -> np.ndarray:
    """Little-endian float64 bytes as a read-only array (no copy); raises on a ragged length."""
    if len(data) % 8:
        raise ValueError(f"{len(data)} bytes is not a whole number of float64 values")
    return np.frombuffer(data, dtype=_F64)


def response_arrays(
    resp: pb.EvaluateResponse, batched: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Values and gradients of an ``EvaluateResponse`` as arrays.

    Shapes are ``(k,)`` for one binding and ``(rows, k)`` when ``batched``;
    either wire form (repeated doubles or ``_f64`` bytes) is read.
    """
    values = (
        f64_array(resp.values_f64) if resp.values_f64 else np.array(resp.values, dtype=np.float64)
    )
    grads = f64_array(resp.grads_f64) if resp.grads_f64 else np.array(resp.grads, dtype=np.float64)
    if batched:
        rows = max(int(resp.rows), 1)
        values = values.reshape(rows, -1)
        grads = grads.reshape(rows, -1) if grads.size else grads.reshape(rows, 0)
    return values, grads
