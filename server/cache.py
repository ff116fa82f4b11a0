"""The graph cache: registered tapes by ``graph_id``, least recently used dropped first.

Bounded twice, by entry count and by the bytes of the tapes' arrays, so a
server's memory stays predictable whatever clients register. The cache is
only an optimisation the protocol allows a server to lose: a miss is
``NOT_FOUND`` and the caller sends the graph again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

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
        self._tapes: OrderedDict[str, tuple[Tape, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
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
        return self._bytes

    def get(self, graph_id: str) -> Tape | None:
        """The tape registered as ``graph_id`` (now the most recently used), or ``None``.

        Counted in ``hits`` and ``misses``.
        """
        with self._lock:
            entry = self._tapes.get(graph_id)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._tapes.move_to_end(graph_id)
            return entry[0]

    def peek(self, graph_id: str) -> Tape | None:
        """Like ``get``, but neither counted nor marked as used (for sizing a request)."""
        entry = self._tapes.get(graph_id)
        return None if entry is None else entry[0]

    def put(self, graph_id: str, tape: Tape) -> bool:
        """Store ``tape``, evicting the least recently used; ``False`` if it can never fit."""
        size = tape_bytes(tape)
        with self._lock:
            if graph_id in self._tapes:
                self._tapes.move_to_end(graph_id)
                return True
            if size > self.max_bytes or self.max_entries == 0:
                return False
            while self._tapes and (
                len(self._tapes) >= self.max_entries or self._bytes + size > self.max_bytes
            ):
                _, (_, dropped) = self._tapes.popitem(last=False)
                self._bytes -= dropped
            self._tapes[graph_id] = (tape, size)
            self._bytes += size
            return True


class RecentGraphs:
    """Small graphs decoded lately, keyed by their wire bytes: a repeat skips decode and hashing.

    Clients often send the same small graph again and again with new inputs;
    for those, decoding and validating dominates the call. Only graphs of at
    most ``max_nodes`` nodes are kept, at most ``max_entries`` of them (LRU).
    """

    def __init__(self, max_entries: int = 256, max_nodes: int = 1024) -> None:
        """Keep up to ``max_entries`` graphs of up to ``max_nodes`` nodes."""
        self.max_entries = max_entries
        self.max_nodes = max_nodes
        self._graphs: OrderedDict[bytes, tuple[Tape, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[Tape, str] | None:
        """The tape and graph id decoded from these wire bytes before, if remembered."""
        with self._lock:
            entry = self._graphs.get(key)
            if entry is not None:
                self._graphs.move_to_end(key)
            return entry

    def put(self, key: bytes, tape: Tape, graph_id: str) -> None:
        """Remember a decoded graph (ignored when it is larger than ``max_nodes``)."""
        if len(tape) > self.max_nodes or self.max_entries == 0:
            return
        with self._lock:
            self._graphs[key] = (tape, graph_id)
            self._graphs.move_to_end(key)
            while len(self._graphs) > self.max_entries:
                self._graphs.popitem(last=False)
