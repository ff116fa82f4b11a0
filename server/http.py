"""The HTTP transport: JSON-RPC 2.0 at ``POST /rpc`` plus health, readiness and metrics.

An aiohttp application that runs on the same event loop as the gRPC server
and calls the same ``GradientService`` (same call slots, same thread pool,
same limits). Its routes:

* ``POST /rpc``: a JSON-RPC 2.0 request or batch (``application/json``);
  200 with the response, 204 when every call was a notification, 413 for a
  body over ``http_max_body_bytes``, 415 for another content type, 405 for
  other methods. ``X-Request-Id`` is logged and echoed; ``X-Timeout-Seconds``
  sets the deadline of each call.
* ``GET /healthz``: 200 while the process runs.
* ``GET /readyz``: 200 while the server takes calls, 503 once it drains.
* ``GET /metrics``: this process's metrics in the Prometheus text format.

With TLS settings the port serves HTTPS only (``ssl_context``); with tokens
every route but ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer``
(the ``guards`` middlewares of ``server/security.py``).
* ``GET /``: the playground page (``micrograd.server.playground``), unless
  ``--no-playground``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from micrograd.codec.malformed import shown

from . import playground
from .config import Settings
from .jsonrpc import JsonRpc
from .logs import request_id
from .metrics import CONTENT_TYPE, Metrics
from .service import GradientService

__all__ = ["HttpServer", "build_app"]

log = logging.getLogger("micrograd.server")

TIMEOUT_HEADER = "X-Timeout-Seconds"
"""Request header: the deadline of every call in the body, in seconds."""
REQUEST_ID_HEADER = "X-Request-Id"
"""Request and response header: the id that the request's log lines carry."""

_PATHS = ("/rpc", "/healthz", "/readyz", "/metrics")
_JSON = "application/json"
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _plain(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers=headers)


def build_app(
    rpc: JsonRpc,
    metrics: Metrics,
    ready: Callable[[], bool],
    max_body_bytes: int,
    guards: Sequence[Any] = (),
    idle_timeout: float = 30.0,
) -> web.Application:
    """The aiohttp application of the four routes; ``ready()`` decides ``/readyz``;
    ``guards`` are middlewares run after counting, before the routes (the token check); a body
    that goes ``idle_timeout`` seconds without a byte gets 408."""

    @web.middleware
    async def count(request: web.Request, handler: _Handler) -> web.StreamResponse:
        path = request.path if request.path in _PATHS else "(other)"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            metrics.http_responses.labels(path, str(exc.status)).inc()
            raise
        metrics.http_responses.labels(path, str(response.status)).inc()
        return response

    async def rpc_endpoint(request: web.Request) -> web.StreamResponse:
        if request.content_type != _JSON:
            return _plain(
                415,
                f"POST /rpc takes {_JSON} (a JSON-RPC 2.0 request), "
                f"not {request.content_type or 'a body without Content-Type'}",
            )
        size = request.content_length
        if size is not None and size > max_body_bytes:
            return _plain(413, _too_large(size, max_body_bytes), Connection="close")
        try:
            body = await _read_body(request, max_body_bytes, idle_timeout)
        except web.HTTPRequestEntityTooLarge:
            return _plain(413, _too_large(None, max_body_bytes), Connection="close")
        except TimeoutError:
            return _plain(
                408,
                f"no byte of the request body arrived for {idle_timeout:g} s "
                "(http_idle_timeout); send the body without pauses",
                Connection="close",
            )
        timeout: float | None = None
        given = request.headers.get(TIMEOUT_HEADER)
        if given is not None:
            try:
                timeout = float(given)
            except ValueError:
                timeout = math.nan
            if not timeout > 0 or math.isinf(timeout):
                return _plain(400, f"{TIMEOUT_HEADER} must be a positive number of seconds, "
                                   f"got {shown(given)}")
        rid = request_id(request.headers.get(REQUEST_ID_HEADER))
        answer = await rpc.handle(body, rid, timeout)
        headers = {REQUEST_ID_HEADER: rid}
        if answer is None:
            return web.Response(status=204, headers=headers)
        return web.Response(body=answer, content_type=_JSON, headers=headers)

    async def healthz(request: web.Request) -> web.Response:
        return _plain(200, "ok")

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return _plain(200, "ready")
        return _plain(503, "draining: not taking new calls")

    async def metrics_endpoint(request: web.Request) -> web.Response:
        response = web.Response(body=metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    # aiohttp's own limit backs up the Content-Length check for chunked bodies.
    app = web.Application(middlewares=[count, *guards], client_max_size=max_body_bytes)
    app.router.add_post("/rpc", rpc_endpoint)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


async def _read_body(request: web.Request, limit: int, idle: float) -> bytes:
    """The whole body; ``TimeoutError`` when ``idle`` seconds pass without a byte, and
    ``HTTPRequestEntityTooLarge`` beyond ``limit`` bytes."""
    body = bytearray()
    while True:
        chunk = await asyncio.wait_for(request.content.readany(), idle)
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))


def _too_large(size: int | None, limit: int) -> str:
    what = f"{size} bytes" if size is not None else "the body"
    return (f"{what} is over this server's limit of {limit} bytes (http_max_body_bytes); "
            "send large graphs over gRPC (UploadGraph, EvaluateStream)")


class HttpServer:
    """The HTTP endpoint of one server process, sharing its service, pool and metrics."""

    def __init__(
        self,
        settings: Settings,
        service: GradientService,
        metrics: Metrics,
        pool: concurrent.futures.Executor | None = None,
        ssl_context: ssl.SSLContext | None = None,
        guards: Sequence[Any] = (),
    ) -> None:
        """An endpoint for ``settings.http_port`` (HTTPS with ``ssl_context``; ``guards`` as
        in ``build_app``); nothing listens until ``start``."""
        self.settings = settings
        self.ssl_context = ssl_context
        self.guards = tuple(guards)
        self.service = service
        self.metrics = metrics
        self.rpc = JsonRpc(
            service,
            pool=pool,
            metrics=metrics,
            max_batch=settings.jsonrpc_max_batch,
            max_depth=settings.jsonrpc_max_depth,
        )
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._draining = False
        metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)

    @property
    def ready(self) -> bool:
        """Whether the server takes new calls: started, and neither it nor the core draining."""
        return self._runner is not None and not self._draining and not self.service.draining

    @property
    def address(self) -> str:
        """``host:port`` as bound (IPv6 hosts in brackets)."""
        host = self.settings.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> int:
        """Bind and serve; returns the bound port (useful with ``http_port`` 0)."""
        s = self.settings
        app = build_app(
            self.rpc,
            self.metrics,
            lambda: self.ready,
            s.http_max_body_bytes,
            self.guards,
            s.http_idle_timeout,
        )
        if s.playground:
            playground.add_routes(app)  # the same app: its middlewares guard the page too
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if s.workers > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((s.host, s.http_port))
        except OSError as exc:
            sock.close()
            await runner.cleanup()
            raise OSError(f"cannot listen for HTTP on {s.host}:{s.http_port}: {exc}") from None
        site = web.SockSite(runner, sock, ssl_context=self.ssl_context)
        await site.start()
        self.port = int(sock.getsockname()[1])
        self._runner = runner
        return self.port

    def drain(self) -> None:
        """Turn ``/readyz`` to 503 (the start of shutdown); calls keep being answered."""
        self._draining = True

    async def stop(self) -> None:
        """Stop listening and close the connections (after the gRPC side has drained)."""
        self._draining = True
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
