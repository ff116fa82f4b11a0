"""Prometheus metrics of one server process, shared by the gRPC and JSON-RPC transports.

Each server owns a ``Metrics`` with its own registry (several servers in one
process, as in the tests, never mix their counts). ``Call`` times one call
and records it in both the metrics and the request log; the gRPC side gets
it from ``handlers.MetricsInterceptor`` (wrapped around every method handler),
the JSON-RPC side calls it per method call. Nothing here knows gRPC.
With ``--workers N`` every process keeps its own registry, so a scrape of
``/metrics`` reports the process that answered it (see docs/API.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import logs
from .logs import log_request, request_id

__all__ = [
    "CONTENT_TYPE",
    "CacheCounts",
    "Call",
    "Metrics",
    "StoreCounters",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Media type of the Prometheus text exposition format."""

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Upper bounds (seconds) of the latency histogram: 100 µs to 30 s."""


class CacheCounts(Protocol):
    """What the metrics read from a graph cache: its size and its hit and miss counts."""

    hits: int
    misses: int

    def __len__(self) -> int: ...

    @property
    def nbytes(self) -> int:
        """Bytes the cached graphs take."""
        ...


class _CacheCollector(Collector):
    """Reads a graph cache's counters at scrape time (the cache knows nothing of Prometheus)."""

    def __init__(self, cache: CacheCounts) -> None:
        self.cache = cache

    def collect(self) -> Iterable[Metric]:
        """Hits, misses, entries and bytes of the cache, as of now."""
        yield CounterMetricFamily(
            "micrograd_graph_cache_hits",
            "graph_id lookups that found the graph",
            value=self.cache.hits,
        )
        yield CounterMetricFamily(
            "micrograd_graph_cache_misses",
            "graph_id lookups that did not (NOT_FOUND)",
            value=self.cache.misses,
        )
        yield GaugeMetricFamily(
            "micrograd_graph_cache_entries", "graphs held by the cache", value=len(self.cache)
        )
        yield GaugeMetricFamily(
            "micrograd_graph_cache_bytes",
            "bytes of the cached graphs' arrays",
            value=self.cache.nbytes,
        )


class StoreCounters(Protocol):
    """What the metrics read from a graph store: where it is and what it counted."""

    location: str

    @property
    def counts(self) -> Any:
        """An object with ``hits``, ``misses``, ``errors``, ``corrupt`` and ``writes``."""
        ...


class _StoreCollector(Collector):
    """Reads a graph store's counters at scrape time."""

    _COUNTERS = (
        ("hits", "graph store lookups that found a verified graph"),
        ("misses", "graph store lookups that found nothing (or a corrupt entry)"),
        ("errors", "graph store reads and writes that failed: unreachable or unwritable store"),
        ("corrupt", "graph store entries that failed verification and were dropped"),
        ("writes", "graphs written to the graph store"),
    )

    def __init__(self, store: StoreCounters) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        """The store's counters, labelled with its kind (host or redis), as of now."""
        kind = "host" if "://" not in self.store.location else "redis"
        counts = self.store.counts
        for name, text in self._COUNTERS:
            family = CounterMetricFamily(f"micrograd_graph_store_{name}", text, labels=["store"])
            family.add_metric([kind], getattr(counts, name))
            yield family


class Metrics:
    """The metrics of one server: calls by transport, method and status; latency; work done."""

    def __init__(self) -> None:
        """Fresh counters in a registry of their own."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "micrograd_requests",
            "calls finished, by transport, method and gRPC status code",
            ["transport", "method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "micrograd_request_duration_seconds",
            "time from receiving a call to its answer",
            ["transport", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.nodes = Counter(
            "micrograd_nodes_evaluated",
            "node evaluations (nodes x rows) of successful Evaluate and EvaluateStream calls",
            ["transport"],
            registry=r,
        )
        self.in_flight = Gauge(
            "micrograd_in_flight_requests",
            "calls being served right now",
            ["transport"],
            registry=r,
        )
        self.http_responses = Counter(
            "micrograd_http_responses",
            "HTTP responses, by path and status",
            ["path", "status"],
            registry=r,
        )
        self._series: dict[tuple[str, str], _Series] = {}
        self.ready = Gauge(
            "micrograd_ready", "1 while the server accepts calls, 0 while it drains", registry=r
        )

    def watch_cache(self, cache: CacheCounts) -> None:
        """Export ``cache``'s hit and miss counters, entries and bytes at every scrape."""
        self.registry.register(_CacheCollector(cache))

    def watch_store(self, store: StoreCounters | None) -> None:
        """Export a graph store's counters at every scrape (nothing when there is no store)."""
        if store is not None:
            self.registry.register(_StoreCollector(store))

    def exposition(self) -> bytes:
        """Everything in the Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    def call(self, transport: str, method: str, request: str | None = None) -> Call:
        """Start timing one call of ``method``; ``request`` is the caller's request id, if any."""
        series = self._series.get((transport, method))
        if series is None:
            series = self._series[(transport, method)] = _Series(self, transport, method)
        return Call(series, request)


class _Series:
    """The metric children of one (transport, method), resolved once: labels() costs a lock."""

    __slots__ = (
        "_requests_family",
        "in_flight",
        "latency",
        "method",
        "nodes",
        "requests",
        "transport",
    )

    def __init__(self, metrics: Metrics, transport: str, method: str) -> None:
        self.transport = transport
        self.method = method
        self.in_flight = metrics.in_flight.labels(transport)
        self.latency = metrics.latency.labels(transport, method)
        self.nodes = metrics.nodes.labels(transport)
        self.requests = {
            code: metrics.requests.labels(transport, method, code) for code in _COMMON_CODES
        }
        self._requests_family = metrics.requests

    def count(self, status: str) -> None:
        """One more finished call with ``status``."""
        child = self.requests.get(status)
        if child is None:
            child = self.requests[status] = self._requests_family.labels(
                self.transport, self.method, status
            )
        child.inc()


_COMMON_CODES = ("OK", "INVALID_ARGUMENT", "NOT_FOUND")
"""Status labels created with a series, so that they appear (at 0) before the first failure."""


class Call:
    """One call being served: counted in flight while open, recorded once by ``finish``."""

    __slots__ = ("_done", "_request_id", "series", "start")

    def __init__(self, series: _Series, request_id: str | None) -> None:
        """A call counted in ``series``, timed from now; ``request_id`` as the caller gave it."""
        self.series = series
        self._request_id = request_id
        self.start = time.perf_counter()
        self._done = False

    @property
    def transport(self) -> str:
        """``grpc`` or ``jsonrpc``."""
        return self.series.transport

    @property
    def method(self) -> str:
        """The method's name as counted."""
        return self.series.method

    @property
    def request_id(self) -> str:
        """The caller's request id when it is usable, else a fresh one (made on first use)."""
        rid = request_id(self._request_id)
        self._request_id = rid
        return rid

    def __enter__(self) -> Call:
        self.series.in_flight.inc()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.series.in_flight.dec()
        if not self._done:
            self.finish(
                "CANCELLED" if kind is not None and kind.__name__ == "CancelledError" else "UNKNOWN"
            )

    def finish(self, status: str, nodes: int = 0, **log_fields: Any) -> None:
        """Record the call's outcome (a gRPC status code name) in the metrics and the log."""
        if self._done:
            return
        self._done = True
        seconds = time.perf_counter() - self.start
        series = self.series
        series.count(status)
        series.latency.observe(seconds)
        if nodes:
            series.nodes.inc(nodes)
        if logs.requests_logged():
            log_request(
                series.transport,
                series.method,
                self.request_id,
                status,
                nodes,
                seconds,
                **log_fields,
            )
