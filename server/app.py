"""Running the server: logging, signals, graceful shutdown and worker processes.

With ``workers == 1`` the server runs in this process. With more, this
process forks the workers before any gRPC object exists (gRPC does not
survive a fork), each worker builds its own server on the shared port
(``SO_REUSEPORT``: the kernel spreads connections across them), and the
parent only forwards SIGTERM/SIGINT and waits. Shutdown is graceful in
every worker: health turns NOT_SERVING, new work is refused, calls in
flight get ``grace_period`` seconds to finish, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from micrograd.kernels import Kernel

from . import logs
from .config import Settings, resolve_kernel
from .grpc_server import GrpcServer
from .http import HttpServer
from .metrics import Metrics, MetricsInterceptor
from .service import GradientService

__all__ = ["configure_logging", "run", "serve"]

log = logging.getLogger("micrograd.server")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def configure_logging(settings: Settings) -> None:
    """JSON lines on stderr, each with its process id, at ``settings.log_level``."""
    logs.configure(settings.log_level_number, sys.stderr)


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
    service = GradientService(settings, kernel)
    metrics = Metrics()
    metrics.watch_cache(service.cache)
    server = GrpcServer(settings, service, interceptors=[MetricsInterceptor(metrics)])
    port = await server.start()
    http = HttpServer(settings, service, metrics, server.pool) if settings.http_port >= 0 else None
    http_port = await http.start() if http is not None else None
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, server.stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    log.info(
        "listening on %s (pid %d, worker %d of %d, kernel %s, max %d concurrent calls)",
        server.address,
        os.getpid(),
        worker + 1,
        settings.workers,
        server.service.kernel.name,
        settings.max_concurrent_calls,
    )
    if http is not None:
        log.info("JSON-RPC over HTTP on http://%s/rpc", http.address)
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
    kernel = resolve_kernel(settings.kernel, settings.flush_denormals)
    if settings.workers == 1:
        if asyncio.run(serve(settings, kernel)):
            _exit_now(0)  # do not wait for abandoned sweeps past the grace period
        return 0
    return _run_workers(settings, kernel)


def _exit_now(code: int) -> None:
    """Leave the process at once (threads still sweeping are abandoned), logs flushed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_workers(settings: Settings, kernel: Kernel) -> int:
    """Fork ``settings.workers`` serving processes, forward signals to them, wait for all."""
    # Signals stay blocked across the forks: a worker unblocks them once its
    # handlers are in place, the parent once it knows every child's pid.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    children: dict[int, int] = {}
    for worker in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                asyncio.run(serve(settings, kernel, worker))
                code = 0
            except BaseException:
                log.exception("worker %d failed", worker + 1)
            finally:
                _exit_now(code)
        children[pid] = worker
    log.info("started %d workers: pids %s", len(children), ", ".join(map(str, children)))
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in _SIGNALS:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    status = 0
    while children:
        try:
            pid, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        worker = children.pop(pid, -1)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0:
            status = 1
            log.error("worker %d (pid %d) exited with status %d", worker + 1, pid, code)
        if not stopping:
            log.error(
                "worker %d (pid %d) stopped unexpectedly; stopping the others", worker + 1, pid
            )
            forward(signal.SIGTERM, None)
            status = 1
    return status
