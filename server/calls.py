"""The one place a call is admitted and run, whichever transport it came in by.

gRPC and JSON-RPC both hand their calls to a ``CallRunner``. A call takes a
concurrency slot from the service (or is refused at once: UNAVAILABLE while
draining, RESOURCE_EXHAUSTED when every slot is taken), gets a ``Deadline``
from the caller's time limit, and runs each step of its work either right
on the event loop (small calls: lowest latency) or on the thread pool (big
ones: the loop keeps serving and the native kernel releases the GIL). When
the transport cancels a call that is running on the pool, the deadline is
cancelled so the work stops at its next phase boundary; the slot is given
back only once that work has stopped. The size of a call, which decides
inline or pool, is estimated once per rpc in ``CallRunner.sizes``.

Errors are not translated here: a ``ServiceError`` leaves the runner as it
is, and each transport maps it in one place (``handlers.status_of`` for
gRPC, ``jsonrpc.ERROR_CODES`` for JSON-RPC).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from .service import Deadline, GradientService

__all__ = ["Call", "CallRunner"]

T = TypeVar("T")


def _nothing(request: Any) -> int:
    return 0


class Call:
    """One admitted call: its slot, its deadline, and the step it may have on the pool."""

    __slots__ = ("deadline", "pending", "runner")

    def __init__(self, runner: CallRunner, timeout: float | None) -> None:
        """Take a slot (raises ``ServiceError`` if refused); ``timeout`` in seconds or ``None``."""
        runner.service.acquire()
        self.runner = runner
        self.deadline = Deadline(timeout)
        self.pending: concurrent.futures.Future[Any] | None = None

    async def run(self, inline: bool, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: here when ``inline`` (or without a pool), else on the pool; if the
        call is cancelled meanwhile, the deadline is cancelled so that the work stops."""
        pool = self.runner.pool
        if inline or pool is None:
            return fn(*args)
        self.pending = pool.submit(fn, *args)
        try:
            return await asyncio.wrap_future(self.pending)
        except asyncio.CancelledError:
            self.deadline.cancel()
            raise

    def close(self) -> None:
        """Give the slot back, once any step still running on the pool has stopped."""
        pending = self.pending
        service = self.runner.service
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _: service.release())
        else:
            service.release()


class CallRunner:
    """Admits and runs the calls of one ``GradientService`` for a transport."""

    def __init__(self, service: GradientService, pool: concurrent.futures.Executor | None) -> None:
        """Run calls of ``service``; big steps on ``pool`` (everything inline when ``None``)."""
        self.service = service
        self.pool = pool
        self.inline_cells = service.settings.inline_cells
        self.sizes: dict[str, Callable[[Any], int]] = {
            "Evaluate": service.cells,
            "EvaluateStream": lambda r: service.cells(r.request),
            "RegisterGraph": service.register_cells,
            "GetServerInfo": _nothing,
            "Jacobian": lambda r: service.cells(r.request) * max(1, len(r.outputs)),
            "HessianVectorProduct": lambda r: 4 * service.cells(r.request),
        }
        """Each rpc's work estimate (node-bindings) from its undecoded request: calls larger
        than ``inline_cells`` run on the pool."""

    def admit(self, timeout: float | None) -> Call:
        """A new call holding a slot; ``close()`` it when done. Raises ``ServiceError``."""
        return Call(self, timeout)

    def inline(self, size: int) -> bool:
        """Whether a call of ``size`` (from ``sizes``) is small enough for the event loop."""
        return size <= self.inline_cells

    async def unary(
        self, inline: bool, work: Callable[[Any, Deadline], T], request: Any, timeout: float | None
    ) -> T:
        """``work(request, deadline)`` as one admitted call: here when ``inline``, else on the
        pool; the slot is released when the work is done (or has stopped after a cancel)."""
        call = Call(self, timeout)
        try:
            if inline or self.pool is None:  # as ``Call.run`` would, without its coroutine
                return work(request, call.deadline)
            return await call.run(False, work, request, call.deadline)
        finally:
            call.close()
