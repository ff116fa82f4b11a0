"""micrograd-rpc: a micrograd-compatible scalar autograd engine, served over gRPC.

``from micrograd.engine import Value`` and ``from micrograd.nn import MLP``
work as in micrograd; ``micrograd.tape`` is the compiled fast path,
``micrograd.kernels`` the sweeps that evaluate it, ``micrograd.errors`` the
errors a graph raises and ``micrograd.ops`` the table that defines every
operation.
"""

__version__ = "0.1.0"
