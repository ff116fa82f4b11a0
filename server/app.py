"""Running the server: logging, signals, graceful shutdown and worker processes.

With ``workers == 1`` the server runs in this process. With more, this
process forks the workers before any gRPC object exists (gRPC does not
survive a fork), each worker builds its own server on the shared port
(``SO_REUSEPORT``: the kernel spreads connections across them), and the
parent supervises: it restarts a worker that dies (after a backoff), gives
up with exit 1 when ``max_worker_deaths`` die within
``worker_death_window`` seconds, and forwards SIGTERM/SIGINT. Ports held
by another process are refused before anything starts. Shutdown is
graceful in every worker: health turns NOT_SERVING, new work is refused,
calls in flight get ``grace_period`` seconds to finish, then open health
Watch and reflection streams are ended and the process exits at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from micrograd.kernels import Kernel

from . import logs, security
from .config import Settings, resolve_kernel
from .grpc_server import GrpcServer
from .handlers import MetricsInterceptor
from .heap import retain_freed_memory
from .http import HttpServer
from .metrics import Metrics
from .service import GradientService
from .store import open_store

__all__ = ["Supervisor", "configure_logging", "run", "serve"]

log = logging.getLogger("micrograd.server")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_RELOAD = signal.SIGHUP
"""Re-read the token file (forwarded to every worker)."""


def configure_logging(settings: Settings) -> None:
    """JSON lines on stderr, each with its process id, at ``settings.log_level``."""
    logs.configure(settings.log_level_number)


def _write_port_file(path: str, port: int) -> None:
    """Write ``port`` to ``path`` atomically, so a reader never sees half a number."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(f"{port}\n")
    tmp.replace(target)


async def serve(
    settings: Settings,
    kernel: Kernel | None = None,
    worker: int = 0,
    handle_signals: bool = True,
    on_ready: Callable[[GrpcServer], None] | None = None,
) -> int:
    """Serve until stopped (SIGTERM/SIGINT when ``handle_signals``, or ``GrpcServer.stop``).

    Returns how many calls were still working on a thread when the grace period ran out.
    """
    guard = security.load(settings)  # each process (worker) loads its own credentials
    retain_freed_memory(settings.retained_heap_bytes)
    service = GradientService(settings, kernel)
    metrics = Metrics()
    metrics.watch_cache(service.cache)
    metrics.watch_store(service.store)
    server = GrpcServer(
        settings,
        service,
        interceptors=[MetricsInterceptor(metrics), *guard.handler_wrappers()],
        credentials=guard.grpc_credentials(),
    )
    port = await server.start()
    http = None
    if settings.http_port >= 0:
        http = HttpServer(
            settings, service, metrics, server.pool, guard.ssl_context(), guard.http_middlewares()
        )
    http_port = await http.start() if http is not None else None
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, server.stop)
        loop.add_signal_handler(_RELOAD, guard.reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (*_SIGNALS, _RELOAD))
    log.info(
        "listening on %s%s (pid %d, worker %d of %d, kernel %s, max %d concurrent calls)",
        server.address,
        guard.summary(),
        os.getpid(),
        worker + 1,
        settings.workers,
        server.service.kernel.name,
        settings.max_concurrent_calls,
    )
    if http is not None:
        log.info("JSON-RPC over HTTP on %s://%s/rpc", guard.scheme, http.address)
    if settings.port_file and worker == 0:
        _write_port_file(settings.port_file, port)
    if settings.http_port_file and worker == 0 and http_port is not None:
        _write_port_file(settings.http_port_file, http_port)
    if on_ready is not None:
        on_ready(server)
    try:
        await server.wait()
    finally:
        if http is not None:
            await http.stop()
    return server.service.in_flight


def run(settings: Settings) -> int:
    """Run the server with ``settings`` until it is told to stop; returns the exit code."""
    configure_logging(settings)
    security.load(settings)  # bad TLS or token files stop the start here, before any fork
    kernel = resolve_kernel(settings.kernel, settings.flush_denormals)
    store = open_store(settings)  # before any fork: a host store that cannot be used stops here
    if store is not None:
        log.info("graph store: %s (shared beyond this process)", store.location)
        store.close()
    if settings.workers == 1:
        _claim_ports(settings)
        asyncio.run(serve(settings, kernel))
        # Every call has finished (or was cut off at the grace period): leave at once, without
        # the interpreter's teardown (gRPC's and the thread pools'), which can take a second.
        _exit_now(0)
    return _run_workers(settings, kernel)


def _exit_now(code: int) -> NoReturn:
    """Leave the process at once (threads still sweeping are abandoned), logs flushed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _claim_ports(settings: Settings) -> list[socket.socket]:
    """Refuse ports that another process holds; return sockets that keep them ours.

    Each port is first bound without ``SO_REUSEPORT`` (only ``SO_REUSEADDR``,
    which tolerates closing connections but not another listener or bound
    socket), so another server on it is found even though it shares its own
    ports; ``OSError`` names the port. Then, with several workers, a guard
    socket bound with ``SO_REUSEPORT`` (never listening, so it takes no
    connections) holds the port for this server's workers, even while every
    worker is being restarted.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    guards: list[socket.socket] = []
    ports = [("gRPC", "--port", settings.port), ("HTTP", "--http-port", settings.http_port)]
    for what, flag, port in ports:
        if port <= 0:
            continue
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, port))
        except OSError as exc:
            for guard in guards:
                guard.close()
            raise OSError(
                f"the {what} port {port} on {settings.host} is already in use by another process "
                f"({exc.strerror or exc}); stop that server or choose another port ({flag})"
            ) from None
        finally:
            probe.close()
        if settings.workers > 1:
            guard = socket.socket(family, socket.SOCK_STREAM)
            try:
                guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                guard.bind((settings.host, port))
                guards.append(guard)
            except OSError:  # closing connections of an earlier server: the probe suffices
                guard.close()
    return guards


_CHILD_SIGNALS = (*_SIGNALS, _RELOAD, signal.SIGCHLD)
_BACKOFF_FIRST, _BACKOFF_MOST = 0.1, 5.0
"""Seconds before a dead worker is restarted: 0.1 after the first recent death, doubling with
each further death in the window, at most 5."""


class Supervisor:
    """The parent of ``--workers N``: forks the workers, restarts any that dies (with backoff),
    forwards SIGTERM/SIGINT (stop) and SIGHUP (reload), and gives up (exit 1) when workers keep
    dying."""

    def __init__(self, settings: Settings, kernel: Kernel, guards: list[socket.socket]) -> None:
        """Workers for ``settings`` with ``kernel``; ``guards`` are closed in each child."""
        self.settings = settings
        self.kernel = kernel
        self.guards = guards
        self.children: dict[int, int] = {}
        """pid -> worker index."""
        self.deaths: collections.deque[float] = collections.deque()
        self.restarts: dict[int, float] = {}
        """worker index -> when (monotonic) to start it again."""
        self.stopping = False
        self.status = 0

    def _spawn(self, worker: int) -> None:
        """Fork worker ``worker``; the child serves until stopped and never returns."""
        pid = os.fork()
        if pid == 0:
            for guard in self.guards:
                guard.close()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGCHLD,))
            code = 1
            try:
                asyncio.run(serve(self.settings, self.kernel, worker))
                code = 0
            except BaseException:
                log.exception("worker %d failed", worker + 1)
            finally:
                _exit_now(code)
        self.children[pid] = worker

    def _forward(self, signum: int) -> None:
        """Send ``signum`` to every worker (SIGTERM/SIGINT: the start of shutdown)."""
        if signum != _RELOAD:
            self.stopping = True
            self.restarts.clear()
        for pid in self.children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _died(self, pid: int, worker: int, code: int) -> None:
        """Note a worker's exit: restart it later, or give up if workers keep dying."""
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if self.stopping:
            if code != 0:
                self.status = 1
                log.error("worker %d (pid %d) %s while stopping", worker + 1, pid, how)
            return
        now = time.monotonic()
        window, most = self.settings.worker_death_window, self.settings.max_worker_deaths
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - window:
            self.deaths.popleft()
        if len(self.deaths) >= most:
            log.error(
                "worker %d (pid %d) %s: %d worker deaths within %g s (max_worker_deaths); "
                "giving up, stopping the other workers",
                worker + 1, pid, how, len(self.deaths), window,
            )
            self.status = 1
            self._forward(signal.SIGTERM)
            return
        delay = min(_BACKOFF_MOST, _BACKOFF_FIRST * 2 ** (len(self.deaths) - 1))
        log.warning(
            "worker %d (pid %d) %s; restarting it in %.1f s (%d death(s) within %g s)",
            worker + 1, pid, how, delay, len(self.deaths), window,
        )
        self.restarts[worker] = now + delay

    def run(self) -> int:
        """Start the workers and supervise them until they have all stopped; the exit code."""
        for worker in range(self.settings.workers):
            self._spawn(worker)
        log.info(
            "started %d workers: pids %s", len(self.children), ", ".join(map(str, self.children))
        )
        while self.children or self.restarts:
            timeout = None
            if self.restarts:
                timeout = max(0.0, min(self.restarts.values()) - time.monotonic())
            got = (
                signal.sigwaitinfo(_CHILD_SIGNALS)
                if timeout is None
                else signal.sigtimedwait(_CHILD_SIGNALS, timeout)
            )
            if got is not None and got.si_signo in (*_SIGNALS, _RELOAD):
                self._forward(got.si_signo)
            while self.children:
                try:
                    pid, wait_status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                worker = self.children.pop(pid, -1)
                self._died(pid, worker, os.waitstatus_to_exitcode(wait_status))
            now = time.monotonic()
            for worker, when in list(self.restarts.items()):
                if when <= now and not self.stopping:
                    del self.restarts[worker]
                    self._spawn(worker)
                    log.info("worker %d restarted", worker + 1)
        for guard in self.guards:
            guard.close()
        return self.status


def _run_workers(settings: Settings, kernel: Kernel) -> int:
    """Fork ``settings.workers`` serving processes and supervise them (``Supervisor``)."""
    guards = _claim_ports(settings)
    # Signals stay blocked across the forks: a worker unblocks them once its handlers are in
    # place; the parent takes them one at a time with sigwaitinfo.
    signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_SIGNALS)
    return Supervisor(settings, kernel, guards).run()
