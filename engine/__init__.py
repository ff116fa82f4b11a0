"""micrograd-rpc: a micrograd-compatible scalar autograd engine, served over gRPC.

``from micrograd.engine import Value`` and ``from micrograd.nn import MLP``
work as in micrograd; ``micrograd.tape`` is the compiled fast path and
``micrograd.ops`` the table that defines every operation.
"""

__version__ = "0.1.0"
