"""One least-recently-used map, bounded by entries and optionally by bytes; thread-safe.

The server's graph cache, its memory of recently decoded small graphs and
the client's memory of the graphs it sent are all this one structure.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["LRU"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most ``max_entries`` values (and ``max_bytes`` by ``size``), least recently used
    dropped first."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int | None = None,
        size: Callable[[V], int] | None = None,
    ) -> None:
        """Bound by ``max_entries``; with ``max_bytes``, also by the sum of ``size(value)``."""
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size = size
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    @property
    def nbytes(self) -> int:
        """The sum of the held values' sizes (0 without ``size``)."""
        return self._bytes

    def get(self, key: K) -> V | None:
        """The value under ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
            return entry[0]

    def peek(self, key: K) -> V | None:
        """The value under ``key`` without marking it used."""
        entry = self._items.get(key)
        return None if entry is None else entry[0]

    def put(self, key: K, value: V) -> bool:
        """Hold ``value`` under ``key``, dropping the least recently used to make room;
        ``False`` (and nothing held) if it can never fit. A key already held is kept as it
        is and marked used."""
        size = self._size(value) if self._size is not None else 0
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return True
            if self.max_entries <= 0 or (self.max_bytes is not None and size > self.max_bytes):
                return False
            while self._items and (
                len(self._items) >= self.max_entries
                or (self.max_bytes is not None and self._bytes + size > self.max_bytes)
            ):
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
            self._items[key] = (value, size)
            self._bytes += size
            return True
