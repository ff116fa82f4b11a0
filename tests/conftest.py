"""Real gRPC servers on 127.0.0.1 ephemeral ports, for any test that needs one.

* ``grpc_server``: the target (``"127.0.0.1:PORT"``) of one server with
  default settings, shared by the whole session (in-process).
* ``grpc_server_factory``: ``start(process=False, **settings) -> RunningServer``
  starts a server with any ``Settings`` overrides, either on a background
  event loop in this process (fast; ``.server`` is the live ``GrpcServer``)
  or as a ``python -m micrograd.server serve`` subprocess (``process=True``:
  real signals, exit codes and ``--workers``). Servers still running at the
  end of the test are stopped.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
from micrograd.server import security
from micrograd.server.config import ENV_PREFIX, Settings
from micrograd.server.grpc_server import GrpcServer
from micrograd.server.handlers import MetricsInterceptor
from micrograd.server.http import HttpServer
from micrograd.server.metrics import Metrics
from micrograd.server.service import GradientService

_START_TIMEOUT = 30.0
"""Seconds a server gets to start listening (a subprocess imports numpy and gRPC first)."""

_GRAPH_STORE_DIR = tempfile.mkdtemp(prefix="micrograd-rpc-test-graphs-")
"""This test session's host graph store (owner-only), so that runs never share one."""
atexit.register(shutil.rmtree, _GRAPH_STORE_DIR, True)

_TEST_DEFAULTS: dict[str, Any] = {
    "graph_store_dir": _GRAPH_STORE_DIR,
    "host": "127.0.0.1",
    "port": 0,
    "http_port": 0,
    "workers": 1,
    "grace_period": 5.0,
}


class _LoopThread:
    """One asyncio event loop on a daemon thread, hosting every in-process test server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="grpc-test-loop", daemon=True
        )
        self.thread.start()

    def run(self, coro: Any, timeout: float = _START_TIMEOUT) -> Any:
        """Run ``coro`` on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_loop: _LoopThread | None = None


def _server_loop() -> _LoopThread:
    global _loop
    if _loop is None:
        _loop = _LoopThread()
    return _loop


@dataclass
class RunningServer:
    """A started server: where it listens and how to stop it."""

    target: str
    port: int
    settings: Settings
    pid: int
    server: GrpcServer | None = None
    """The live server object (in-process servers only)."""
    process: subprocess.Popen[bytes] | None = None
    """The server process (``process=True`` only)."""
    log_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    http_port: int | None = None
    """The bound HTTP (JSON-RPC) port; ``None`` with ``http_port=-1``."""
    http: HttpServer | None = None
    """The live HTTP endpoint (in-process servers only)."""

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the HTTP endpoint (``https://`` with TLS)."""
        assert self.http_port is not None, "this server runs without HTTP (http_port=-1)"
        scheme = "https" if self.settings.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        """What a server process wrote to stderr so far."""
        return self.log_path.read_text() if self.log_path else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop gracefully (SIGTERM for a process); returns a process's exit code."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(timeout)
        if self.server is not None:
            server, http = self.server, self.http
            self.server = self.http = None

            async def shutdown() -> None:
                await server.stop()
                if http is not None:
                    await http.stop()

            _server_loop().run(shutdown(), timeout)
        return None


def _settings(overrides: dict[str, Any]) -> Settings:
    known = {f.name for f in fields(Settings)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    return Settings(**{**_TEST_DEFAULTS, **overrides})


def start_in_process(**overrides: Any) -> RunningServer:
    """A server on the shared background loop of this process."""
    settings = _settings(overrides)

    async def start() -> tuple[GrpcServer, HttpServer | None]:
        # The same composition as micrograd.server.app.serve: one core, metrics on both
        # transports, TLS and tokens at the edge of each.
        guard = security.load(settings)
        service = GradientService(settings)
        metrics = Metrics()
        metrics.watch_cache(service.cache)
        metrics.watch_store(service.store)
        server = GrpcServer(
            settings,
            service,
            interceptors=[MetricsInterceptor(metrics), *guard.handler_wrappers()],
            credentials=guard.grpc_credentials(),
        )
        await server.start()
        http = None
        if settings.http_port >= 0:
            http = HttpServer(
                settings,
                service,
                metrics,
                server.pool,
                guard.ssl_context(),
                guard.http_middlewares(),
            )
            await http.start()
        return server, http

    server, http = _server_loop().run(start())
    return RunningServer(
        target=f"127.0.0.1:{server.port}",
        port=server.port,
        settings=settings,
        pid=os.getpid(),
        server=server,
        http_port=http.port if http is not None else None,
        http=http,
    )


def start_process(directory: Path, **overrides: Any) -> RunningServer:
    """A ``python -m micrograd.server serve`` subprocess; waits for its port file."""
    settings = _settings(overrides)
    port_file = directory / f"port-{time.monotonic_ns()}"
    log_path = port_file.with_suffix(".log")
    http_port_file = port_file.with_suffix(".http")
    argv = [sys.executable, "-m", "micrograd.server", "serve", "--port-file", str(port_file)]
    if settings.http_port >= 0:
        argv += ["--http-port-file", str(http_port_file)]
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if f.name in ("port_file", "http_port_file"):
            continue
        if isinstance(value, bool):
            argv.append(f"--{'' if value else 'no-'}{f.name.replace('_', '-')}")
        else:
            argv += [f"--{f.name.replace('_', '-')}", str(value)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + _START_TIMEOUT
    while not port_file.exists() or (settings.http_port >= 0 and not http_port_file.exists()):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(
                f"server did not start in {_START_TIMEOUT} s:\n{log_path.read_text()}"
            )
        time.sleep(0.02)
    port = int(port_file.read_text())
    http_port = int(http_port_file.read_text()) if settings.http_port >= 0 else None
    return RunningServer(
        target=f"127.0.0.1:{port}",
        port=port,
        settings=settings,
        pid=proc.pid,
        process=proc,
        log_path=log_path,
        http_port=http_port,
    )


@pytest.fixture(scope="session")
def grpc_server() -> Iterator[str]:
    """Target of a session-wide in-process server with default settings."""
    running = start_in_process()
    yield running.target
    running.stop()


@pytest.fixture
def grpc_server_factory(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """``start(process=False, **settings)``: servers with custom settings, stopped afterwards."""
    started: list[RunningServer] = []

    def start(process: bool = False, **overrides: Any) -> RunningServer:
        running = start_process(tmp_path, **overrides) if process else start_in_process(**overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
