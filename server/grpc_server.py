"""The gRPC transport: a thin ``grpc.aio`` servicer over the core, plus health and reflection.

The servicer only translates: messages go to the core unchanged and a
``ServiceError`` comes back as a gRPC status (INVALID_ARGUMENT with a
``google.rpc.BadRequest`` detail naming the offending fields). Small calls
run right on the event loop, where latency is lowest; big ones run on a
thread pool so the loop keeps serving, and a cancelled or timed-out call
stops at the next phase boundary (decode, forward, backward, encode).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_status import rpc_status
from micrograd.codec.wire import Wire
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc

from .config import Settings
from .handlers import rebuilt
from .service import Deadline, GradientService, ServiceError

__all__ = ["PID_METADATA", "SERVICE_NAME", "GradientServicer", "GrpcServer", "status_of"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientService"].full_name
"""``micrograd.v1.GradientService``: the name health checks and reflection use."""

PID_METADATA = "micrograd-pid"
"""Trailing metadata key of GetServerInfo: the id of the process that answered."""

log = logging.getLogger("micrograd.server")

T = TypeVar("T")


def status_of(error: ServiceError) -> grpc.Status:
    """The gRPC status for a ``ServiceError``, with a ``BadRequest`` detail for its violations."""
    code = grpc.StatusCode[error.code.value]
    detail = status_pb2.Status(code=code.value[0], message=error.message)
    if error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=text)
                for field, text in error.violations
            ]
        )
        detail.details.add().Pack(bad)
    return rpc_status.to_status(detail)


def _bracketed(host: str) -> str:
    """An IPv6 literal in brackets, as gRPC addresses want it; other hosts unchanged."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class _Call:
    """One admitted call: its concurrency slot, its deadline, and the work it has on a thread."""

    def __init__(
        self,
        service: GradientService,
        pool: concurrent.futures.Executor,
        context: grpc.aio.ServicerContext,
    ) -> None:
        service.acquire()
        self.service = service
        self.pool = pool
        self.deadline = Deadline(context.time_remaining())
        self.pending: concurrent.futures.Future[Any] | None = None

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the pool; if the call is cancelled, tell the work to stop."""
        self.pending = self.pool.submit(fn, *args)
        try:
            return await asyncio.wrap_future(self.pending)
        except asyncio.CancelledError:
            self.deadline.cancel()
            raise

    def close(self) -> None:
        """Free the slot, once any work still running on a thread has noticed and stopped."""
        pending = self.pending
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _: self.service.release())
        else:
            self.service.release()


class GradientServicer(pb_grpc.GradientServiceServicer):
    """``micrograd.v1.GradientService`` on ``grpc.aio``: translation only, logic in the core."""

    def __init__(self, service: GradientService, pool: concurrent.futures.Executor) -> None:
        """Serve ``service``, running big calls on ``pool``."""
        self.service = service
        self.pool = pool
        self.inline_cells = service.settings.inline_cells

    async def _fail(self, context: grpc.aio.ServicerContext, error: Exception) -> None:
        """End the call with the status for ``error`` (raises, as ``abort`` does)."""
        if isinstance(error, ServiceError):
            if error.violations:
                await context.abort_with_status(status_of(error))
            await context.abort(grpc.StatusCode[error.code.value], error.message)
        log.exception("internal error while serving a call")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error!r}")

    async def _answer(
        self,
        context: grpc.aio.ServicerContext,
        work: Callable[..., T],
        request: Any,
        inline: bool,
    ) -> T:
        """``work(request[, deadline])`` for a unary call: in line when ``inline`` (small),
        else on the pool where cancellation and the deadline can stop it; errors end the call
        with their status."""
        call = None
        try:
            if inline:
                with self.service.admit():
                    return work(request)
            call = _Call(self.service, self.pool, context)
            return await call.offload(work, request, call.deadline)
        except Exception as exc:
            await self._fail(context, exc)
            raise AssertionError("unreachable") from exc
        finally:
            if call is not None:
                call.close()

    async def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        """Evaluate rpc (answered with the serialized response, ``codec.Wire``)."""
        inline = self.service.cells(request) <= self.inline_cells
        wire = await self._answer(context, self.service.evaluate_wire, request, inline)
        return wire  # type: ignore[return-value]

    async def EvaluateStream(
        self, request: pb.EvaluateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EvaluateStreamResponse]:
        """EvaluateStream rpc: every step of the core's generator runs where its size says."""
        call = None
        try:
            call = _Call(self.service, self.pool, context)
            messages = self.service.evaluate_stream_wire(request, call.deadline)
            inline = self.service.cells(request.request) <= self.inline_cells
            done = object()
            while True:
                msg = next(messages, done) if inline else await call.offload(next, messages, done)
                if msg is done:
                    break
                yield msg  # type: ignore[misc]
        except Exception as exc:
            await self._fail(context, exc)
        finally:
            if call is not None:
                call.close()

    async def RegisterGraph(
        self, request: pb.RegisterGraphRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterGraphResponse:
        """RegisterGraph rpc."""
        inline = len(request.graph.nodes) + len(request.packed_graph.ops) <= self.inline_cells
        return await self._answer(context, self.service.register_graph, request, inline)

    async def UploadGraph(
        self,
        request_iterator: AsyncIterator[pb.UploadGraphRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadGraphResponse:
        """UploadGraph rpc: append pieces as they arrive, then decode and register off the loop."""
        call = None
        try:
            call = _Call(self.service, self.pool, context)
            upload = self.service.upload()
            async for piece in request_iterator:
                upload.add(piece)
                call.deadline.check()
            return await call.offload(upload.finish)
        except Exception as exc:
            await self._fail(context, exc)
            raise AssertionError("unreachable") from exc
        finally:
            if call is not None:
                call.close()

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        """GetServerInfo rpc; the answering process id is in trailing metadata ``micrograd-pid``."""
        context.set_trailing_metadata(((PID_METADATA, str(os.getpid())),))
        return self.service.server_info(request)


class HandlerWrapper(Protocol):
    """Something that wraps a method handler, once, when its service is registered."""

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler to serve ``path`` (``/pkg.Service/Method``) with instead of ``handler``."""
        ...


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped on first use, then reused."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrappers: Sequence[HandlerWrapper]) -> None:
        self.inner = inner
        self.wrappers = wrappers
        self.done: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path = details.method  # type: ignore[attr-defined]
        if path not in self.done:
            handler = self.inner.service(details)
            self.done[path] = None if handler is None else _wrapped(path, handler, self.wrappers)
        return self.done[path]


def _wrapped(
    path: str, handler: grpc.RpcMethodHandler, wrappers: Sequence[HandlerWrapper]
) -> grpc.RpcMethodHandler:
    """``handler`` wrapped by every wrapper (the first outermost), sending bytes as they are."""
    for wrapper in reversed(wrappers):
        handler = wrapper.wrap(path, handler)
    return rebuilt(
        handler, response_serializer=_serializer_passing_wire(handler.response_serializer)
    )


def _serializer_passing_wire(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """A response serializer that sends serialized responses (``codec.Wire``) as they are."""

    def serializer(response: Any) -> bytes:
        if isinstance(response, Wire):
            return response.data
        return serialize(response) if serialize is not None else response

    return serializer


class _Registrar:
    """Stands in for the server while generated ``add_*_to_server`` functions register
    services, so that every handler is wrapped once, at registration."""

    def __init__(self, server: grpc.aio.Server, wrappers: Sequence[HandlerWrapper]) -> None:
        self.server = server
        self.wrappers = wrappers

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Register generic handlers, wrapped."""
        self.server.add_generic_rpc_handlers(
            tuple(_WrappedGeneric(h, self.wrappers) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """Register a service's method handlers, wrapped."""
        self.server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service,
            {m: _wrapped(f"/{service}/{m}", h, self.wrappers) for m, h in handlers.items()},
        )


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
        self.interceptors = tuple(interceptors)
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

    async def start(self) -> int:
        """Bind, start serving and report SERVING; returns the bound port."""
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
        ]
        server = grpc.aio.server(options=options)
        registrar: Any = _Registrar(server, self.interceptors)
        pb_grpc.add_GradientServiceServicer_to_server(
            GradientServicer(self.service, self.pool), registrar
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registrar)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            ),
            registrar,
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
        if self.service.in_flight:
            log.warning("grace period over: cancelling %d call(s)", self.service.in_flight)
        await self._server.stop(max(0.0, end - time.monotonic()))
        self.pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    async def wait(self) -> None:
        """Return once the server has stopped."""
        assert self._server is not None
        await self._server.wait_for_termination()
        if self._stopping is not None:
            await self._stopping
