"""Open-ended streams that shutdown ends instead of waiting for: health Watch, reflection.

A load balancer keeps a ``grpc.health.v1.Health/Watch`` stream open for as
long as the server lives, and a reflection client may keep its stream too.
Neither is a call in flight, so a graceful shutdown must not wait out its
grace period for them. ``OpenStreams`` wraps the response-streaming
handlers of every service but ``micrograd.v1.GradientService`` (once, at
registration); ``end()`` cancels the streams still open, which then finish
with UNAVAILABLE ("the server is shutting down"), and refuses new ones the
same way.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from .handlers import rebuilt
from .service import Code, ServiceError

T = TypeVar("T")

__all__ = ["OpenStreams", "idle_bounded"]

_GOODBYE = "the server is shutting down; reconnect to another replica"


class OpenStreams:
    """A handler wrapper that tracks open-ended streams, so that shutdown can end them."""

    def __init__(self, keep: str = "/micrograd.v1.GradientService/") -> None:
        """Track response streams of every method whose path does not start with ``keep``
        (those are calls, admitted and drained as such)."""
        self.keep = keep
        self.ending = False
        self._open: set[asyncio.Future[Any]] = set()

    @property
    def count(self) -> int:
        """Streams open now."""
        return len(self._open)

    def end(self) -> None:
        """End every open stream with UNAVAILABLE, and refuse those opened from now on."""
        self.ending = True
        for step in list(self._open):
            step.cancel()

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` tracked if it streams responses for another service, else unchanged."""
        if not handler.response_streaming or path.startswith(self.keep):
            return handler
        inner = handler.unary_stream or handler.stream_stream
        if inspect.isasyncgenfunction(inner):
            return rebuilt(handler, self._generator(inner))
        return rebuilt(handler, self._coroutine(inner))

    async def _run(self, step: Any, context: grpc.aio.ServicerContext) -> Any:
        """Await ``step`` (a coroutine) as a task that ``end()`` can cancel."""
        if self.ending:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _GOODBYE)
        task = asyncio.ensure_future(step)
        self._open.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            if self.ending and task.cancelled():
                await context.abort(grpc.StatusCode.UNAVAILABLE, _GOODBYE)
            raise
        finally:
            self._open.discard(task)

    def _coroutine(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        """A stream written with ``context.write`` (health Watch), tracked."""

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await self._run(inner(request, context), context)

        return behavior

    def _generator(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        """A stream written as an async generator (reflection), tracked message by message."""

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            responses = inner(request, context)
            while True:
                try:
                    response = await self._run(responses.__anext__(), context)
                except StopAsyncIteration:
                    return
                yield response

        return behavior


async def idle_bounded(requests: AsyncIterator[T], seconds: float) -> AsyncIterator[T]:
    """A client stream that ends the call with DEADLINE_EXCEEDED (``ServiceError``) when no
    message arrives for ``seconds`` (``upload_idle_timeout``), so an idle client cannot hold
    its call slot."""
    iterator = aiter(requests)
    while True:
        try:
            request = await asyncio.wait_for(anext(iterator), seconds)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ServiceError(
                Code.DEADLINE_EXCEEDED,
                f"no piece of the upload arrived for {seconds:g} s (upload_idle_timeout); "
                "the upload is abandoned: send the pieces without pauses",
            ) from None
        yield request
