"""The errors a graph can raise, in one place below every module that raises them.

``GraphError`` names the first bad node of a graph; every decoder and
validator (the tape, the native decoders, the codec) raises it, and the
transports turn it into their invalid-argument error.
"""

from __future__ import annotations

__all__ = ["GraphError"]


class GraphError(ValueError):
    """A graph that cannot be evaluated, with the index of the first bad node.

    ``field`` is a path to the offending part (``"nodes[17].args[1]"``), for
    transports that report field violations; ``reason`` says what is wrong.
    """

    def __init__(self, node: int | None, reason: str, field: str | None = None) -> None:
        """``node`` is the offending node index (``None`` for the graph as a whole)."""
        self.node = node
        self.reason = reason
        self.field = field or ("graph" if node is None else f"nodes[{node}]")
        super().__init__(reason if node is None else f"node {node}: {reason}")
