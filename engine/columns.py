"""What a kernel reads from a tape: its columns, as a protocol ``Tape`` satisfies.

Kept apart so that the kernels (Python, native, ``Value``) can name the type
they sweep without importing ``micrograd.tape``, which imports them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["Columns"]


class Columns(Protocol):
    """What a kernel sweeps: a tape's op codes, argument indices and constants, in order."""

    @property
    def code(self) -> np.ndarray:
        """uint8 op code of each node."""

    @property
    def arg0(self) -> np.ndarray:
        """int32 first argument of each node (-1 where none)."""

    @property
    def arg1(self) -> np.ndarray:
        """int32 second argument of each node (-1 where none)."""

    @property
    def arg2(self) -> np.ndarray | None:
        """int32 third argument of each node (-1 where none), or None when no node has one."""

    @property
    def const(self) -> np.ndarray:
        """float64 constant of each node (values of leaves, ``pow`` exponents)."""
