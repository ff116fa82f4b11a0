"""Server settings: every knob in one frozen dataclass, with safe defaults.

Each field documents itself (its ``help`` metadata is the ``--help`` text and
what the docs cite). Values come from the command line first, then from the
environment variable ``MICROGRAD_RPC_<FIELD>`` (``MICROGRAD_RPC_MAX_NODES``),
then the default. A bad value is reported with the flag or variable it came
from, so the operator can fix it without reading code.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from micrograd.kernels import Kernel, NativeKernel, get_kernel

__all__ = [
    "ENV_PREFIX",
    "KERNELS",
    "Settings",
    "SettingsError",
    "add_arguments",
    "from_sources",
    "resolve_kernel",
]

ENV_PREFIX = "MICROGRAD_RPC_"
"""Environment variables ``MICROGRAD_RPC_<FIELD NAME IN UPPER CASE>`` set any setting."""

KERNELS = ("auto", "native", "python", "value")
"""Kernel choices: the fastest available, the C kernel, the numpy/Python kernel, or ``Value``."""

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
"""URL schemes ``--graph-store`` accepts for a Redis server (TCP, TLS, a Unix socket)."""
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_MiB = 1 << 20
_GiB = 1 << 30


class SettingsError(ValueError):
    """A setting with a value the server cannot run with; the message names its source."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Settings:
    """Everything that configures one server: address, processes, kernel, limits, shutdown."""

    host: str = field(
        default="127.0.0.1",
        metadata=_help(
            "Address to listen on (127.0.0.1: this machine only; 0.0.0.0 or [::]: every interface)."
        ),
    )
    port: int = field(
        default=50051,
        metadata=_help(
            "gRPC port; 0 picks a free port (only with --workers 1), reported on the startup line "
            "and in --port-file."
        ),
    )
    http_port: int = field(
        default=8080,
        metadata=_help(
            "HTTP port: JSON-RPC 2.0 at POST /rpc, /healthz, /readyz, /metrics; 0 picks a free "
            "port (reported on the startup line and in --http-port-file), -1 turns HTTP off."
        ),
    )
    http_max_body_bytes: int = field(
        default=64 * _MiB,
        metadata=_help(
            "Largest HTTP request body, in bytes (suffixes allowed); bigger bodies get 413."
        ),
    )
    playground: bool = field(
        default=True,
        metadata=_help(
            "Serve the playground page at GET / on the HTTP port (--no-playground: leave it out)."
        ),
    )
    jsonrpc_max_batch: int = field(
        default=100,
        metadata=_help("Most calls in one JSON-RPC batch; longer batches get error -32600."),
    )
    jsonrpc_max_depth: int = field(
        default=64,
        metadata=_help(
            "Deepest nesting of arrays and objects in a JSON-RPC body; deeper bodies get "
            "error -32700 before they are parsed."
        ),
    )
    http_idle_timeout: float = field(
        default=30.0,
        metadata=_help(
            "Seconds an HTTP request body may go without a byte arriving; a slower body gets "
            "408 and the connection is closed."
        ),
    )
    workers: int = field(
        default_factory=lambda: os.cpu_count() or 1,
        metadata=_help(
            "Server processes sharing the port (SO_REUSEPORT); default: the number of CPUs. "
            "1 serves in this process."
        ),
    )
    kernel_threads: int = field(
        default_factory=lambda: os.cpu_count() or 1,
        metadata=_help(
            "Threads one big batch call may spread its tiles over (the native kernel; calls of "
            "at least 1,000,000 node-bindings); default: the number of CPUs."
        ),
    )
    kernel: str = field(
        default="auto",
        metadata=_help(
            "Tape kernel: auto (fastest available), native (C), python (numpy/Python reference) "
            "or value (the Value engine itself; slow, for checking)."
        ),
    )
    max_nodes: int = field(
        default=5_000_000,
        metadata=_help("Most nodes in one graph; larger graphs get RESOURCE_EXHAUSTED."),
    )
    max_name_bytes: int = field(
        default=1024,
        metadata=_help(
            "Longest node name, in UTF-8 bytes (suffixes allowed), in either graph form; "
            "longer names get INVALID_ARGUMENT."
        ),
    )
    max_message_bytes: int = field(
        default=256 * _MiB,
        metadata=_help(
            "Largest gRPC message received or sent, in bytes (suffixes KiB, MiB, GiB allowed); "
            "bigger graphs go through UploadGraph and EvaluateStream."
        ),
    )
    max_batch_rows: int = field(
        default=10_000, metadata=_help("Most rows (input bindings) in one batch.")
    )
    max_batch_cells: int = field(
        default=50_000_000,
        metadata=_help(
            "Most node-bindings (nodes x rows) one call evaluates; bounds the memory of a call "
            "at about 16 bytes per cell."
        ),
    )
    max_concurrent_calls: int = field(
        default=64,
        metadata=_help(
            "Calls one process works on at once; further calls get RESOURCE_EXHAUSTED at once "
            "instead of queueing."
        ),
    )
    graph_cache_entries: int = field(
        default=128,
        metadata=_help(
            "Graphs kept by each process's cache of registered graphs (least recently used "
            "are dropped first)."
        ),
    )
    graph_cache_bytes: int = field(
        default=1 * _GiB,
        metadata=_help(
            "Largest total size of the cached graphs' arrays, in bytes (suffixes allowed)."
        ),
    )
    graph_store: str = field(
        default="host",
        metadata=_help(
            "Where registered graphs are shared beyond one process: host (files under "
            "--graph-store-dir, shared by every worker of this machine), redis://HOST:PORT/DB "
            "(a Redis server shared by every replica) or none (each process keeps only its "
            "own cache). The in-process cache stays in front of either."
        ),
    )
    graph_store_dir: str = field(
        default="",
        metadata=_help(
            "Directory of the host graph store; empty: micrograd-rpc-<uid>/graphs in /dev/shm "
            "(memory) where it is writable, else in the temporary directory."
        ),
    )
    graph_store_bytes: int = field(
        default=1 * _GiB,
        metadata=_help(
            "Largest total size of the host graph store's files, in bytes (suffixes allowed); "
            "the least recently used are removed first."
        ),
    )
    graph_store_entries: int = field(
        default=1024,
        metadata=_help("Most graphs in the host graph store (least recently used removed first)."),
    )
    graph_store_ttl: float = field(
        default=3600.0,
        metadata=_help(
            "Seconds a graph lives in the Redis graph store after it was last registered or "
            "used; bound its memory with Redis's own maxmemory and an LRU maxmemory-policy."
        ),
    )
    graph_store_timeout: float = field(
        default=0.25,
        metadata=_help(
            "Seconds one Redis graph store command (and connecting) may take; past it the call "
            "answers as if the graph were missing (NOT_FOUND) instead of waiting."
        ),
    )
    graph_store_backoff: float = field(
        default=1.0,
        metadata=_help(
            "Seconds the Redis graph store is not tried again after a failure (calls answer at "
            "once meanwhile)."
        ),
    )
    max_chunk_size: int = field(
        default=1_000_000,
        metadata=_help(
            "Largest EvaluateStream chunk, in numbers; bigger requested chunk sizes are capped."
        ),
    )
    default_chunk_size: int = field(
        default=262_144,
        metadata=_help("EvaluateStream chunk size, in numbers, when the request leaves it 0."),
    )
    inline_cells: int = field(
        default=20_000,
        metadata=_help(
            "Calls of at most this many node-bindings are evaluated on the event loop "
            "(lowest latency); bigger ones run on a worker thread so that other calls proceed "
            "and cancellation is noticed between phases."
        ),
    )
    retained_heap_bytes: int = field(
        default=256 * _MiB,
        metadata=_help(
            "Freed memory a server process keeps for its next calls instead of handing it back "
            "to the system, in bytes (suffixes allowed; glibc's allocator only, 0 leaves its "
            "defaults): big calls then reuse pages already mapped instead of faulting in fresh "
            "ones for every array."
        ),
    )
    upload_idle_timeout: float = field(
        default=30.0,
        metadata=_help(
            "Seconds an UploadGraph stream may go without a piece arriving; an idle upload is "
            "ended with DEADLINE_EXCEEDED and its call slot freed."
        ),
    )
    grace_period: float = field(
        default=10.0,
        metadata=_help(
            "Seconds that calls in flight get to finish after SIGTERM or SIGINT; the process "
            "exits as soon as they have."
        ),
    )
    max_worker_deaths: int = field(
        default=5,
        metadata=_help(
            "With --workers > 1, a worker that dies is restarted (after a backoff of 0.1 s "
            "doubling up to 5 s); this many deaths within --worker-death-window seconds make "
            "the server give up and exit 1."
        ),
    )
    worker_death_window: float = field(
        default=60.0,
        metadata=_help("Seconds over which worker deaths are counted (see --max-worker-deaths)."),
    )
    log_level: str = field(
        default="INFO",
        metadata=_help(
            "Logging threshold of the stderr log: DEBUG, INFO, WARNING, ERROR or CRITICAL."
        ),
    )
    flush_denormals: bool = field(
        default=False,
        metadata=_help(
            "Treat subnormal floats as zero in the native kernel (faster on some CPUs, "
            "slightly different numbers); needs a kernel that supports it."
        ),
    )
    tls_cert: str = field(
        default="",
        metadata=_help(
            "PEM certificate chain of the server; with --tls-key, the gRPC port serves only TLS "
            "and the HTTP port only HTTPS."
        ),
    )
    tls_key: str = field(
        default="", metadata=_help("PEM private key of --tls-cert (unencrypted).")
    )
    tls_client_ca: str = field(
        default="",
        metadata=_help(
            "PEM CA certificate(s): require client certificates signed by them on both ports "
            "(mutual TLS); needs --tls-cert."
        ),
    )
    auth_token_file: str = field(
        default="",
        metadata=_help(
            "File of accepted bearer tokens, one a line (# comments), re-read on SIGHUP; calls "
            "must then send 'authorization: Bearer <token>' (health and readiness stay open)."
        ),
    )
    insecure: bool = field(
        default=False,
        metadata=_help(
            "Allow listening on a non-loopback address with neither TLS nor tokens "
            "(otherwise the server refuses to start)."
        ),
    )
    port_file: str = field(
        default="",
        metadata=_help(
            "If set, write the bound gRPC port to this file once the server accepts calls."
        ),
    )
    http_port_file: str = field(
        default="",
        metadata=_help(
            "If set, write the bound HTTP port to this file once the server accepts calls."
        ),
    )

    def __post_init__(self) -> None:
        problems = []
        label = _label
        for name in ("port", "http_port"):
            low = -1 if name == "http_port" else 0
            if not low <= getattr(self, name) <= 65535:
                problems.append(
                    f"{label(name)} must be between {low} and 65535, got {getattr(self, name)}"
                )
        for name in (
            "workers",
            "kernel_threads",
            "max_nodes",
            "max_message_bytes",
            "max_batch_rows",
            "max_batch_cells",
            "max_concurrent_calls",
            "max_chunk_size",
            "default_chunk_size",
            "http_max_body_bytes",
            "jsonrpc_max_batch",
            "jsonrpc_max_depth",
            "max_name_bytes",
            "max_worker_deaths",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{label(name)} must be at least 1, got {getattr(self, name)}")
        for name in (
            "graph_cache_entries",
            "graph_cache_bytes",
            "graph_store_entries",
            "graph_store_bytes",
            "inline_cells",
            "retained_heap_bytes",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{label(name)} must not be negative, got {getattr(self, name)}")
        if self.max_message_bytes >= 1 << 31:
            problems.append(
                f"{label('max_message_bytes')} must be below 2 GiB, got {self.max_message_bytes}"
            )
        if self.default_chunk_size > self.max_chunk_size:
            problems.append(
                f"{label('default_chunk_size')} ({self.default_chunk_size}) exceeds "
                f"{label('max_chunk_size')} ({self.max_chunk_size})"
            )
        if self.graph_store not in ("host", "none") and not self.graph_store.startswith(
            _REDIS_SCHEMES
        ):
            problems.append(
                f"{label('graph_store')} must be host, none or redis://HOST:PORT/DB, "
                f"got {self.graph_store!r}"
            )
        if not self.graph_store_ttl >= 1:
            problems.append(
                f"{label('graph_store_ttl')} must be at least 1 second, got {self.graph_store_ttl}"
            )
        if not self.graph_store_timeout > 0:
            problems.append(
                f"{label('graph_store_timeout')} must be above 0 seconds, "
                f"got {self.graph_store_timeout}"
            )
        if not self.graph_store_backoff >= 0:
            problems.append(
                f"{label('graph_store_backoff')} must be at least 0 seconds, "
                f"got {self.graph_store_backoff}"
            )
        if self.kernel not in KERNELS:
            problems.append(
                f"{label('kernel')} must be one of {', '.join(KERNELS)}, got {self.kernel!r}"
            )
        if self.log_level.upper() not in _LOG_LEVELS:
            problems.append(
                f"{label('log_level')} must be one of {', '.join(_LOG_LEVELS)}, "
                f"got {self.log_level!r}"
            )
        if not self.grace_period >= 0:
            problems.append(
                f"{label('grace_period')} must be at least 0 seconds, got {self.grace_period}"
            )
        for name in ("http_idle_timeout", "upload_idle_timeout", "worker_death_window"):
            if not 0 < getattr(self, name) < float("inf"):
                problems.append(
                    f"{label(name)} must be a positive number of seconds, got {getattr(self, name)}"
                )
        if self.port == 0 and self.workers > 1:
            problems.append(
                f"{label('port')} 0 (a free port) needs {label('workers')} 1: "
                "separate processes would each pick a different port"
            )
        if self.http_port == 0 and self.workers > 1:
            problems.append(
                f"{label('http_port')} 0 (a free port) needs {label('workers')} 1: "
                "separate processes would each pick a different port"
            )
        if problems:
            raise SettingsError("; ".join(problems))

    @property
    def log_level_number(self) -> int:
        """The ``logging`` level number of ``log_level``."""
        return int(logging.getLevelName(self.log_level.upper()))


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_SIZE = re.compile(r"^\s*(-?\d[\d_]*)\s*(b|kib|mib|gib|k|m|g)?\s*$", re.IGNORECASE)
_UNITS = {
    None: 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": _MiB,
    "mib": _MiB,
    "g": _GiB,
    "gib": _GiB,
}


def _kind(name: str) -> type:
    """The Python type of a setting, from its default."""
    f = _FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
    return type(default)


def _parse(name: str, text: str) -> Any:
    """Convert one setting from text; raises ``ValueError`` with what was expected."""
    kind = _kind(name)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if kind is int:
        m = _SIZE.match(text)
        if not m or (m.group(2) and not name.endswith("_bytes")):
            raise ValueError(
                f"expected a whole number, got {text!r}"
                + (" (byte sizes may end in KiB, MiB or GiB)" if name.endswith("_bytes") else "")
            )
        return int(m.group(1).replace("_", "")) * _UNITS[(m.group(2) or "").lower() or None]
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number of seconds, got {text!r}") from None
    return text


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _label(name: str) -> str:
    """How an operator sets ``name``: its flag and its environment variable."""
    return f"{_flag(name)} ({ENV_PREFIX}{name.upper()})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (``--max-nodes``) to ``parser``; unset flags stay ``None``."""
    for name, f in _FIELDS.items():
        env = ENV_PREFIX + name.upper()
        help_text = f"{f.metadata['help']} [env {env}; default: %(default)s]"
        default = f.default if f.default is not dataclasses.MISSING else "number of CPUs"
        if _kind(name) is bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text.replace("%(default)s", str(default)),
            )
        else:
            parser.add_argument(
                _flag(name),
                dest=name,
                metavar=name.upper(),
                default=None,
                help=help_text.replace("%(default)s", str(default) or '""'),
            )


_NEGATABLE = ("playground",)
"""On/off settings that the environment may also turn off as ``MICROGRAD_RPC_NO_<NAME>``."""


def from_sources(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from parsed flags (winning), then ``MICROGRAD_RPC_*`` variables, then defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems = []
    for name in _FIELDS:
        var = ENV_PREFIX + name.upper()
        given = getattr(args, name, None) if args is not None else None
        source, text = (_flag(name), given) if given is not None else (var, env.get(var))
        negated = ENV_PREFIX + "NO_" + name.upper()
        if text is None and name in _NEGATABLE and env.get(negated) is not None:
            try:  # MICROGRAD_RPC_NO_PLAYGROUND=1, the spelling of --no-playground
                values[name] = not _parse(name, env[negated])
            except ValueError as exc:
                problems.append(f"{negated}: {exc}")
            continue
        if text is None:
            continue
        if isinstance(text, bool):
            values[name] = text
            continue
        try:
            values[name] = _parse(name, str(text))
        except ValueError as exc:
            problems.append(f"{source}: {exc}")
    if problems:
        raise SettingsError("; ".join(problems))
    return Settings(**values)


def resolve_kernel(name: str, flush_denormals: bool = False) -> Kernel:
    """The kernel a ``--kernel`` setting names; ``SettingsError`` if it cannot run here."""
    try:
        kernel = get_kernel(None if name == "auto" else name)
    except ValueError as exc:
        raise SettingsError(f"--kernel {name}: {exc}") from None
    if flush_denormals:
        if kernel.name != "native":
            raise SettingsError(
                f"--flush-denormals needs the native kernel; the {kernel.name} kernel is exact IEEE"
            )
        assert NativeKernel is not None  # the native kernel is registered only when built
        kernel = NativeKernel(flush_denormals=True)
    return kernel
