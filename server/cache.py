"""The graph cache: registered tapes by ``graph_id``, least recently used dropped first.

Bounded twice, by entry count and by the bytes of the tapes' arrays, so a
server's memory stays predictable whatever clients register. The cache is
only an optimisation the protocol allows a server to lose: a miss is
``NOT_FOUND`` and the caller sends the graph again.
"""

from __future__ import annotations

from collections.abc import Hashable

from micrograd.codec.lru import LRU
from micrograd.tape import Tape

__all__ = ["GraphCache", "RecentGraphs", "tape_bytes"]

_NAME_OVERHEAD = 64
"""Rough bytes of one ``names`` entry (key string plus dict slot) beyond its characters."""


def tape_bytes(tape: Tape) -> int:
    """Memory a tape holds: its numpy columns plus an estimate for its names."""
    arrays = tape.code.nbytes + tape.arg0.nbytes + tape.arg1.nbytes + tape.const.nbytes
    arrays += tape.inputs.nbytes
    return arrays + sum(len(name) + _NAME_OVERHEAD for name in tape.names)


class GraphCache:
    """LRU map ``graph_id -> Tape`` bounded by ``max_entries`` and ``max_bytes``; thread-safe."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        """A cache of at most ``max_entries`` tapes totalling at most ``max_bytes``."""
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._tapes: LRU[str, Tape] = LRU(max_entries, max_bytes, tape_bytes)
        self.hits = 0
        """``get`` calls that found their graph."""
        self.misses = 0
        """``get`` calls that did not."""

    def __len__(self) -> int:
        return len(self._tapes)

    def __contains__(self, graph_id: object) -> bool:
        return graph_id in self._tapes

    @property
    def nbytes(self) -> int:
        """Total bytes of the cached tapes."""
        return self._tapes.nbytes

    def get(self, graph_id: str) -> Tape | None:
        """The tape registered as ``graph_id`` (now the most recently used), or ``None``.

        Counted in ``hits`` and ``misses``.
        """
        tape = self._tapes.get(graph_id)
        if tape is None:
            self.misses += 1
        else:
            self.hits += 1
        return tape

    def peek(self, graph_id: str) -> Tape | None:
        """Like ``get``, but neither counted nor marked as used (for sizing a request)."""
        return self._tapes.peek(graph_id)

    def put(self, graph_id: str, tape: Tape) -> bool:
        """Store ``tape``, evicting the least recently used; ``False`` if it can never fit."""
        return self._tapes.put(graph_id, tape)


class RecentGraphs:
    """Small graphs decoded lately, keyed by what their messages hold: a repeat skips decode
    and hashing.

    Clients often send the same small graph again and again with new inputs;
    for those, decoding and validating dominates the call. Only graphs of at
    most ``max_nodes`` nodes are kept, at most ``max_entries`` of them (LRU).
    """

    def __init__(self, max_entries: int = 256, max_nodes: int = 1024) -> None:
        """Keep up to ``max_entries`` graphs of up to ``max_nodes`` nodes."""
        self.max_entries = max_entries
        self.max_nodes = max_nodes
        self._graphs: LRU[Hashable, tuple[Tape, str]] = LRU(max_entries)

    def get(self, key: Hashable) -> tuple[Tape, str] | None:
        """The tape and graph id decoded from a message with this key before, if remembered."""
        return self._graphs.get(key)

    def put(self, key: Hashable, tape: Tape, graph_id: str) -> None:
        """Remember a decoded graph (ignored when it is larger than ``max_nodes``)."""
        if len(tape) <= self.max_nodes:
            self._graphs.put(key, (tape, graph_id))
