"""The gRPC transport: a thin ``grpc.aio`` servicer over the core, plus health and reflection.

The servicer only translates: messages go to the core unchanged, through
the call runner (``server/calls.py``: slot, deadline, inline or pool,
cancellation), and a ``ServiceError`` comes back as a gRPC status, mapped
once for every method where the handlers are registered
(``server/handlers.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc

from .calls import CallRunner
from .config import Settings
from .decoding import tolerant
from .handlers import HandlerWrapper, Registrar, ServiceErrors, status_of
from .reflection import add_reflection
from .service import GradientService
from .streams import OpenStreams, idle_bounded

__all__ = ["PID_METADATA", "SERVICE_NAME", "GradientServicer", "GrpcServer"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientService"].full_name
"""``micrograd.v1.GradientService``: the name health checks and reflection use."""

PID_METADATA = "micrograd-pid"
"""Trailing metadata key of GetServerInfo: the id of the process that answered."""

log = logging.getLogger("micrograd.server")

_SETTLE = 0.1
"""Seconds between the last call in flight finishing and the server stopping."""


def _bracketed(host: str) -> str:
    """An IPv6 literal in brackets, as gRPC addresses want it; other hosts unchanged."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class GradientServicer(pb_grpc.GradientServiceServicer):
    """``micrograd.v1.GradientService`` on ``grpc.aio``: translation only, logic in the core.

    Each rpc hands its request to the call runner (``server/calls.py``); what
    it raises becomes a status where the handlers are registered
    (``handlers.ServiceErrors``).
    """

    def __init__(self, service: GradientService, pool: concurrent.futures.Executor) -> None:
        """Serve ``service``, running big calls on ``pool``."""
        self.service = service
        self.calls = CallRunner(service, pool)
        self._sizes = self.calls.sizes

    async def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        """Evaluate rpc (answered with the serialized response, ``codec.Wire``)."""
        calls = self.calls
        wire = await calls.unary(
            calls.inline(self._sizes["Evaluate"](request)),
            self.service.evaluate_wire,
            request,
            context.time_remaining(),
        )
        return wire  # type: ignore[return-value]

    async def EvaluateStream(
        self, request: pb.EvaluateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EvaluateStreamResponse]:
        """EvaluateStream rpc: every step of the core's generator runs where its size says."""
        call = self.calls.admit(context.time_remaining())
        try:
            messages = self.service.evaluate_stream_wire(request, call.deadline)
            inline = self.calls.inline(self._sizes["EvaluateStream"](request))
            done = object()
            while True:
                msg = await call.run(inline, next, messages, done)
                if msg is done:
                    break
                yield msg  # type: ignore[misc]
        finally:
            call.close()

    async def RegisterGraph(
        self, request: pb.RegisterGraphRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterGraphResponse:
        """RegisterGraph rpc."""
        calls = self.calls
        return await calls.unary(
            calls.inline(self._sizes["RegisterGraph"](request)),
            self.service.register_graph,
            request,
            context.time_remaining(),
        )

    async def UploadGraph(
        self,
        request_iterator: AsyncIterator[pb.UploadGraphRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadGraphResponse:
        """UploadGraph rpc: append pieces as they arrive, then decode and register off the loop."""
        call = self.calls.admit(context.time_remaining())
        try:
            upload = self.service.upload()
            idle = self.service.settings.upload_idle_timeout
            async for piece in idle_bounded(request_iterator, idle):
                upload.add(piece)
                call.deadline.check()
            return await call.run(False, upload.finish)
        finally:
            call.close()

    async def Jacobian(
        self, request: pb.JacobianRequest, context: grpc.aio.ServicerContext
    ) -> pb.JacobianResponse:
        """Jacobian rpc."""
        calls = self.calls
        return await calls.unary(
            calls.inline(self._sizes["Jacobian"](request)),
            self.service.jacobian,
            request,
            context.time_remaining(),
        )

    async def HessianVectorProduct(
        self, request: pb.HessianVectorProductRequest, context: grpc.aio.ServicerContext
    ) -> pb.HessianVectorProductResponse:
        """HessianVectorProduct rpc."""
        calls = self.calls
        return await calls.unary(
            calls.inline(self._sizes["HessianVectorProduct"](request)),
            self.service.hvp,
            request,
            context.time_remaining(),
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        """GetServerInfo rpc; the answering process id is in trailing metadata ``micrograd-pid``."""
        context.set_trailing_metadata(((PID_METADATA, str(os.getpid())),))
        return self.service.server_info(request)


class _Tolerant:
    """Answers requests that do not parse with INVALID_ARGUMENT (``decoding.tolerant``)."""

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler``, its request deserializer made tolerant."""
        return tolerant(handler, status_of)


class GrpcServer:
    """One process's gRPC server: gradient service, health, reflection, graceful shutdown."""

    def __init__(
        self,
        settings: Settings,
        service: GradientService | None = None,
        interceptors: Sequence[HandlerWrapper] = (),
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        """A server for ``settings``; ``interceptors`` wrap every method (once, at
        registration, which costs nothing per call); TLS with ``credentials``; idle until
        ``start``."""
        self.settings = settings
        self.streams = OpenStreams()
        self.interceptors = (*interceptors, self.streams)
        self.credentials = credentials
        self.service = service or GradientService(settings)
        self.health = health.aio.HealthServicer()
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.max_concurrent_calls, thread_name_prefix="micrograd-call"
        )
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        """``host:port`` as bound (IPv6 hosts in brackets)."""
        return f"{_bracketed(self.settings.host)}:{self.port}"

    def wrappers(self) -> tuple[HandlerWrapper, ...]:
        """What wraps every method handler, outermost first: the interceptors, then errors to
        statuses, then the tolerant request parser."""
        return (*self.interceptors, ServiceErrors(f"/{SERVICE_NAME}/"), _Tolerant())

    def register(self, registrar: Any) -> None:
        """Register the gradient service's handlers with ``registrar`` (a ``Registrar``, or
        anything with ``add_generic_rpc_handlers``/``add_registered_method_handlers``)."""
        pb_grpc.add_GradientServiceServicer_to_server(
            GradientServicer(self.service, self.pool), registrar
        )

    async def start(self) -> int:
        """Bind, start serving and report SERVING; returns the bound port."""
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
        ]
        server = grpc.aio.server(options=options)
        registrar: Any = Registrar(server, self.wrappers())
        self.register(registrar)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registrar)
        add_reflection(
            registrar, (SERVICE_NAME, health.SERVICE_NAME), (pb.DESCRIPTOR, health_pb2.DESCRIPTOR)
        )
        host = _bracketed(s.host)
        try:
            if self.credentials is not None:
                port = server.add_secure_port(f"{host}:{s.port}", self.credentials)
            else:
                port = server.add_insecure_port(f"{host}:{s.port}")
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {host}:{s.port}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {host}:{s.port} (address in use?)")
        await server.start()
        self.port = port
        self._server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return port

    def stop(self) -> asyncio.Task[None]:
        """Begin graceful shutdown (idempotent); the task ends once the server has stopped."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._shutdown())
        return self._stopping

    async def _shutdown(self) -> None:
        """NOT_SERVING, refuse new work, let calls in flight finish within the grace period."""
        assert self._server is not None
        grace = self.settings.grace_period
        end = time.monotonic() + grace
        log.info("shutting down: health NOT_SERVING, %d call(s) in flight", self.service.in_flight)
        await self.health.enter_graceful_shutdown()
        self.service.drain()
        while self.service.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.02)
        # Calls already on their way in are still answered (UNAVAILABLE, before any work)
        # instead of being cut off by the server's own stop.
        await asyncio.sleep(min(_SETTLE, max(0.0, end - time.monotonic())))
        if self.service.in_flight:
            log.warning("grace period over: cancelling %d call(s)", self.service.in_flight)
        if self.streams.count:
            log.info("ending %d open health/reflection stream(s)", self.streams.count)
        self.streams.end()
        await self._server.stop(max(0.0, end - time.monotonic()))
        self.pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    async def wait(self) -> None:
        """Return once the server has stopped."""
        assert self._server is not None
        await self._server.wait_for_termination()
        if self._stopping is not None:
            await self._stopping
