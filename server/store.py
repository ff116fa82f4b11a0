"""The graph store: registered graphs shared by every worker of a host, or by every replica.

A process's in-process LRU (``server/cache.py``) sits in front of one
``GraphStore``; a ``graph_id`` the LRU lacks is looked up here before the
call answers NOT_FOUND. Two implementations share one entry format:

* ``HostStore`` (the default): one file per graph under a runtime directory
  (``/dev/shm`` where it exists, so the files live in memory), written to a
  temporary name and renamed into place (a reader sees a whole entry or
  none), read back with one copy into the process (the columns are views of
  that buffer), bounded in bytes and entries with the least recently used
  files removed first. Read rather than mapped: a file truncated in place
  under a mapping would kill the process with SIGBUS.
* ``RedisStore`` (``redis://HOST:PORT/DB``): one key per graph with a TTL,
  Redis's own ``maxmemory`` LRU as the bound, short socket timeouts; after a
  failure the store is skipped for ``backoff`` seconds, so an unreachable
  Redis costs a call at most one timeout and never a hang.

The key is the graph's content hash. Every entry carries that id and an
XXH3-128 checksum of its columns, checked on every load: a damaged,
truncated or misfiled entry is counted, removed and treated as missing,
never evaluated. Redis entries are also hashed again (``codec.graph_id``),
so that not even a forged entry in a shared Redis can pass for a graph; the
host store's folder is writable by the server's own user only, and its
loads skip that (it would triple the time of loading a big graph).
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import stat
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import xxhash
from micrograd import codec
from micrograd.tape import Tape

from .config import Settings

__all__ = [
    "GraphStore",
    "HostStore",
    "RedisStore",
    "StoreCounts",
    "StoreUnavailable",
    "decode_entry",
    "default_directory",
    "encode_entry",
    "entry_bytes",
    "is_graph_id",
    "open_store",
]

log = logging.getLogger("micrograd.server")

_MAGIC = b"MGGRAPH1"
_HEADER = struct.Struct("<8sQQ16s72s")
"""magic, node count, bytes of the names blob, XXH3-128 checksum of everything after the
header, the graph id (ASCII, NUL-padded): 112 bytes, so the columns after it stay aligned."""
_GRAPH_ID = re.compile(r"sha256:[0-9a-f]{64}")
_SUFFIX = ".graph"
_TOUCH_AFTER = 10.0
"""A read marks its file used (for the LRU order) only if this process last marked it this
many seconds ago, which spares a system call on most reads."""
_SEEN_ENTRIES = 4096
"""Entries whose size a process remembers (about 100 bytes each)."""


class StoreUnavailable(OSError):
    """The store could not be read or written; the message says which store and why."""


@dataclass
class StoreCounts:
    """What a store did since the process started, for ``/metrics``."""

    hits: int = 0
    """Lookups that found a whole, verified entry."""
    misses: int = 0
    """Lookups that found nothing (or a corrupt entry)."""
    errors: int = 0
    """Reads or writes that failed because the store was unreachable or unwritable."""
    corrupt: int = 0
    """Entries that failed verification (wrong hash, truncated) and were dropped."""
    writes: int = 0
    """Entries written."""


class GraphStore(Protocol):
    """Graphs by content hash, shared beyond this process; every method may raise
    ``StoreUnavailable`` and none blocks for longer than the store's timeout."""

    location: str
    """Where the store is, for messages and logs (a directory or a ``redis://`` URL)."""
    remote: bool
    """Whether calls wait on the network (then they never run on the event loop)."""
    counts: StoreCounts

    def get(self, graph_id: str) -> Tape | None:
        """The verified tape stored as ``graph_id``, or ``None`` if absent or corrupt."""
        ...

    def put(self, graph_id: str, tape: Tape) -> bool:
        """Store ``tape`` as ``graph_id`` (or only mark it used, if already there); ``False``
        if it can never fit."""
        ...

    def nodes_hint(self, graph_id: str) -> int | None:
        """Cheap upper estimate of the stored graph's node count (0: absent; ``None``: unknown)."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


# -- the entry format ------------------------------------------------------


def _names_blob(tape: Tape) -> bytes:
    """The names as ``codec.graph_id`` hashes them: ``node\\0name\\0``, sorted by name."""
    return b"".join(f"{i}\0{name}\0".encode() for name, i in sorted(tape.names.items()))


def encode_entry(graph_id: str, tape: Tape) -> list[bytes | memoryview]:
    """``tape`` as store entry pieces (write them in order): the header, then the columns.

    Columns come widest first (``const`` float64, ``arg0``/``arg1`` int32,
    ``code`` uint8) so that each starts aligned to its width when the entry
    is read back, then the names blob.
    """
    body: list[bytes | memoryview] = [
        np.ascontiguousarray(tape.const, dtype="<f8").data.cast("B"),
        np.ascontiguousarray(tape.arg0, dtype="<i4").data.cast("B"),
        np.ascontiguousarray(tape.arg1, dtype="<i4").data.cast("B"),
        np.ascontiguousarray(tape.code, dtype=np.uint8).data.cast("B"),
        _names_blob(tape),
    ]
    checksum = xxhash.xxh3_128()
    for piece in body:
        checksum.update(piece)
    header = _HEADER.pack(
        _MAGIC, len(tape), len(body[-1]), checksum.digest(), graph_id.encode("ascii")
    )
    return [header, *body]


def entry_bytes(tape: Tape) -> int:
    """Size of a tape's store entry, in bytes."""
    return _HEADER.size + 17 * len(tape) + len(_names_blob(tape))


def decode_entry(graph_id: str, data: Any, rehash: bool = False) -> Tape | None:
    """The tape in a store entry (columns are views of ``data``, no copy), or ``None`` when the
    entry is truncated or damaged (its checksum), or filed under another id (its header).

    ``rehash`` also recomputes the content hash (``codec.graph_id``, about 3x the
    checksum's time): then even an entry forged by someone who can write the
    store cannot pass for ``graph_id``.
    """
    view = memoryview(data).cast("B")
    if view.nbytes < _HEADER.size:
        return None
    magic, n, names_len, checksum, stored_id = _HEADER.unpack_from(view)
    if magic != _MAGIC or n == 0 or view.nbytes != _HEADER.size + 17 * n + names_len:
        return None
    if stored_id.rstrip(b"\0") != graph_id.encode("ascii", "replace"):
        return None
    at = _HEADER.size
    if xxhash.xxh3_128_digest(view[at:]) != checksum:
        return None
    const = np.frombuffer(view, dtype="<f8", count=n, offset=at)
    arg0 = np.frombuffer(view, dtype="<i4", count=n, offset=at + 8 * n)
    arg1 = np.frombuffer(view, dtype="<i4", count=n, offset=at + 12 * n)
    code = np.frombuffer(view, dtype=np.uint8, count=n, offset=at + 16 * n)
    blob = bytes(view[at + 17 * n :])
    names: dict[str, int] = {}
    if blob:
        parts = blob.split(b"\0")
        if len(parts) % 2 != 1 or parts[-1]:
            return None
        try:
            for i in range(0, len(parts) - 1, 2):
                names[parts[i + 1].decode()] = int(parts[i])
        except ValueError:  # not digits, or not UTF-8
            return None
    tape = Tape(code, arg0, arg1, const, names)
    if rehash and codec.graph_id(tape) != graph_id:
        return None
    return tape


def is_graph_id(graph_id: str) -> bool:
    """Whether ``graph_id`` has the form of a content hash (``sha256:`` and 64 hex digits)."""
    return _GRAPH_ID.fullmatch(graph_id) is not None


# -- one host: files -------------------------------------------------------


def default_directory() -> Path:
    """Where the host store lives by default: a per-user folder in ``/dev/shm`` (memory) when
    it is writable, else in the system's temporary directory."""
    shm = Path("/dev/shm")
    base = (
        shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())
    )
    return base / f"micrograd-rpc-{os.getuid()}" / "graphs"


class HostStore:
    """Graphs as files in one directory, shared by every process of the host that uses it.

    Bounded by ``max_bytes`` and ``max_entries`` over all the files in the
    directory: after a write that crosses either, the least recently used
    files (oldest modification time; a read touches its file) are removed.
    """

    def __init__(self, directory: Path, max_bytes: int, max_entries: int) -> None:
        """A store in ``directory`` (created, owner-only, if missing); ``StoreUnavailable`` when
        it cannot be created or is writable by others."""
        self.directory = Path(directory)
        self.location = str(self.directory)
        self.remote = False
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.counts = StoreCounts()
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()
        """Entry size and when this process last marked it used, by graph id: an entry's
        size never changes (its name is its content), so a read needs no ``fstat``."""
        self._seen_lock = threading.Lock()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = self.directory.stat()
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot create the graph store {self.location}: {exc}"
            ) from None
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise StoreUnavailable(
                f"the graph store {self.location} is writable by other users or owned by "
                "another user; choose another --graph-store-dir"
            )
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise StoreUnavailable(f"the graph store {self.location} is not writable")

    def path(self, graph_id: str) -> Path | None:
        """The file of ``graph_id``, or ``None`` if it is not a content hash (never a path)."""
        name = self._file(graph_id)
        return None if name is None else Path(name)

    def _file(self, graph_id: str) -> str | None:
        """``path`` as a string (no ``Path`` object on the lookup path)."""
        if not is_graph_id(graph_id):
            return None
        return f"{self.location}/{graph_id.replace(':', '-')}{_SUFFIX}"

    def get(self, graph_id: str) -> Tape | None:
        """The verified tape in ``graph_id``'s file (read in one copy); ``None`` if absent."""
        path = self._file(graph_id)
        if path is None:
            self.counts.misses += 1
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.counts.misses += 1
            return None
        except OSError as exc:
            self.counts.errors += 1
            raise StoreUnavailable(f"cannot read the graph store {self.location}: {exc}") from None
        seen = self._seen.get(graph_id)
        try:
            size = os.fstat(fd).st_size if seen is None else seen[0]
            data = np.empty(size + 1, dtype=np.uint8)  # one byte more: a longer file shows
            got = os.preadv(fd, [data.data], 0)
            if got != size:  # not the entry seen before: read what is there now
                size = os.fstat(fd).st_size
                data = np.empty(size + 1, dtype=np.uint8)
                got = os.preadv(fd, [data.data], 0)
        except OSError as exc:
            self.counts.errors += 1
            raise StoreUnavailable(f"cannot read the graph store {self.location}: {exc}") from None
        finally:
            os.close(fd)
        tape = decode_entry(graph_id, data.data[:size]) if got == size else None
        if tape is None:
            self._forget(graph_id)
            self._drop_corrupt(path, graph_id)
            return None
        self.counts.hits += 1
        now = time.monotonic()
        if seen is None or now - seen[1] > _TOUCH_AFTER:
            _touch(path)
            self._remember(graph_id, size, now)
        return tape

    def _remember(self, graph_id: str, size: int, touched: float) -> None:
        """Note an entry's size (and when it was marked used), for the next reads."""
        with self._seen_lock:
            self._seen[graph_id] = (size, touched)
            self._seen.move_to_end(graph_id)
            while len(self._seen) > _SEEN_ENTRIES:
                self._seen.popitem(last=False)

    def _forget(self, graph_id: str) -> None:
        with self._seen_lock:
            self._seen.pop(graph_id, None)

    def _drop_corrupt(self, path: str, graph_id: str) -> None:
        self.counts.corrupt += 1
        self.counts.misses += 1
        log.warning("graph store: entry %s in %s is corrupt; removed", graph_id, self.location)
        _unlink(path)

    def put(self, graph_id: str, tape: Tape) -> bool:
        """Write ``tape`` to its file (temporary name, then rename), then enforce the bounds;
        ``False`` if it is bigger than the whole store."""
        path = self.path(graph_id)
        if path is None:
            raise ValueError(f"not a graph id: {graph_id!r}")
        if _touch(path):
            return True
        if entry_bytes(tape) > self.max_bytes or self.max_entries == 0:
            return False
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.writelines(encode_entry(graph_id, tape))
            os.replace(tmp, path)
        except OSError as exc:
            self.counts.errors += 1
            try:
                tmp.unlink()
            except OSError:
                pass
            raise StoreUnavailable(f"cannot write the graph store {self.location}: {exc}") from None
        self.counts.writes += 1
        self.evict()
        return True

    def evict(self) -> None:
        """Remove least recently used files until the directory is within both bounds."""
        entries: list[tuple[float, int, str]] = []
        now = time.time()
        with os.scandir(self.directory) as it:
            for entry in it:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.name.endswith(_SUFFIX) and not entry.name.startswith("."):
                    entries.append((info.st_mtime, info.st_size, entry.name))
                elif entry.name.endswith(".tmp") and now - info.st_mtime > 3600:
                    _unlink(self.directory / entry.name)  # left by a process that died mid-write
        total = sum(size for _, size, _ in entries)
        entries.sort()
        count = len(entries)
        for _, size, name in entries:
            if count <= self.max_entries and total <= self.max_bytes:
                break
            _unlink(self.directory / name)
            count -= 1
            total -= size

    def nodes_hint(self, graph_id: str) -> int | None:
        """The node count the file's size allows (0 when there is no file)."""
        seen = self._seen.get(graph_id)
        if seen is not None:
            return max(0, (seen[0] - _HEADER.size) // 17)
        path = self._file(graph_id)
        if path is None:
            return 0
        try:
            size = os.stat(path).st_size
        except OSError:
            return 0
        self._remember(graph_id, size, -math.inf)  # the read that follows needs no fstat
        return max(0, (size - _HEADER.size) // 17)

    def close(self) -> None:
        """Nothing to release: every read opens and closes its own file."""


def _touch(path: str | Path) -> bool:
    """Mark a file as just used; ``False`` if it does not exist."""
    try:
        os.utime(path)
        return True
    except OSError:
        return False


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- several replicas: Redis -----------------------------------------------

_KEY_PREFIX = "micrograd:graph:"


class RedisStore:
    """Graphs as Redis strings under ``micrograd:graph:<graph_id>``, each with a TTL.

    Reads refresh the TTL (``GETEX``), so a graph in use stays. Bound it in
    Redis itself: ``maxmemory`` with ``maxmemory-policy volatile-lru`` (or
    ``allkeys-lru``). Every command has ``timeout`` seconds; after a failure
    the store is not tried again for ``backoff`` seconds and calls answer at
    once as if the graph were missing.
    """

    def __init__(self, url: str, ttl: float, timeout: float, backoff: float) -> None:
        """A store on the Redis server at ``url`` (``redis://HOST:PORT/DB``); connects lazily."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.location = _redacted(url)
        self.remote = True
        self.ttl = max(1, round(ttl))
        self.backoff = backoff
        self.counts = StoreCounts()
        self._redis_errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._last_error = ""

    def _failed(self, exc: BaseException) -> StoreUnavailable:
        """Count a failure, stop trying for ``backoff`` seconds, and say what happened."""
        with self._lock:
            self.counts.errors += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._down_until = time.monotonic() + self.backoff
        return StoreUnavailable(
            f"the graph store {self.location} is unreachable ({self._last_error})"
        )

    def _check_up(self) -> None:
        """Raise at once while the store is in its backoff after a failure."""
        if time.monotonic() < self._down_until:
            with self._lock:
                self.counts.errors += 1
            raise StoreUnavailable(
                f"the graph store {self.location} is unreachable ({self._last_error}); "
                f"not retried for {self.backoff:g} s after a failure"
            )

    def get(self, graph_id: str) -> Tape | None:
        """The verified tape stored as ``graph_id`` (its TTL refreshed), or ``None``."""
        if not is_graph_id(graph_id):
            self.counts.misses += 1
            return None
        self._check_up()
        key = _KEY_PREFIX + graph_id
        try:
            data = self._client.getex(key, ex=self.ttl)
        except self._redis_errors as exc:
            raise self._failed(exc) from None
        if data is None:
            self.counts.misses += 1
            return None
        tape = decode_entry(graph_id, data, rehash=True)
        if tape is None:
            self.counts.corrupt += 1
            self.counts.misses += 1
            log.warning("graph store: entry %s in %s is corrupt; removed", graph_id, self.location)
            try:
                self._client.delete(key)
            except self._redis_errors:
                pass
            return None
        self.counts.hits += 1
        return tape

    def put(self, graph_id: str, tape: Tape) -> bool:
        """Store ``tape`` with the TTL, or only refresh the TTL if it is already there."""
        if not is_graph_id(graph_id):
            raise ValueError(f"not a graph id: {graph_id!r}")
        self._check_up()
        key = _KEY_PREFIX + graph_id
        try:
            if self._client.expire(key, self.ttl):
                return True
            self._client.set(key, b"".join(encode_entry(graph_id, tape)), ex=self.ttl)
        except self._redis_errors as exc:
            raise self._failed(exc) from None
        self.counts.writes += 1
        return True

    def nodes_hint(self, graph_id: str) -> int | None:
        """Unknown without a round trip: the caller treats the graph as possibly big."""
        return None

    def ping(self) -> None:
        """Check that Redis answers (``StoreUnavailable`` if not)."""
        try:
            self._client.ping()
        except self._redis_errors as exc:
            raise self._failed(exc) from None

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


def _redacted(url: str) -> str:
    """``url`` without a password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=f"{user}{host}{port}").geturl()


# -- choosing one ----------------------------------------------------------


def open_store(settings: Settings) -> GraphStore | None:
    """The store ``settings.graph_store`` names: ``host`` (files in ``graph_store_dir``),
    a ``redis://`` URL, or ``none`` (``None``: each process keeps only its own cache).

    Raises ``StoreUnavailable`` when the host store's directory cannot be used.
    """
    spec = settings.graph_store
    if spec == "none":
        return None
    if spec == "host":
        directory = (
            Path(settings.graph_store_dir) if settings.graph_store_dir else default_directory()
        )
        return HostStore(directory, settings.graph_store_bytes, settings.graph_store_entries)
    return RedisStore(
        spec,
        ttl=settings.graph_store_ttl,
        timeout=settings.graph_store_timeout,
        backoff=settings.graph_store_backoff,
    )
