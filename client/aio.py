"""``AsyncClient``: ``Client`` for asyncio programs (grpc.aio), with the same methods awaited.

Routing, retries, uploads, streaming and re-registration behave exactly as
in ``Client``: both perform the same steps (``client/request.py``); only the
awaits differ.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np
from micrograd.engine import Value
from micrograd.v1 import gradient_service_pb2 as pb

from . import request as steps
from .client import Connection
from .request import Done, GraphLike, Pause, Rpc, SelectionLike, Steps
from .result import Result

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient(Connection):
    """The asyncio twin of ``Client`` (same arguments); use ``async with`` to close the channel."""

    _aio = True

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def backward(
        self, v: Value, names: Mapping[str, Value] | None = None, *, timeout: float | None = None
    ) -> Result:
        """Remote ``v.backward()``, as ``Client.backward``."""
        return await self._run(steps.backward(self.policy, v, names, timeout))

    async def evaluate(
        self,
        graph: GraphLike,
        *,
        inputs: Mapping[str, float] | None = None,
        output: int | None = None,
        selection: SelectionLike = "all",
        batch: Mapping[str, Sequence[float]] | np.ndarray | None = None,
        gradients: bool = True,
        stream: bool | None = None,
        names: Mapping[str, Value] | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Evaluate and differentiate ``graph``, as ``Client.evaluate``."""
        return await self._run(
            steps.evaluate(
                self.policy,
                graph,
                inputs=inputs,
                output=output,
                selection=selection,
                batch=batch,
                gradients=gradients,
                stream=stream,
                names=names,
                timeout=timeout,
            )
        )

    async def send(
        self,
        request: pb.EvaluateRequest,
        *,
        stream: bool | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Evaluate a ready-made ``EvaluateRequest``, as ``Client.send``."""
        return await self._run(steps.send(self.policy, request, stream, timeout))

    async def register(
        self,
        graph: GraphLike,
        *,
        names: Mapping[str, Value] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Store ``graph`` on the server and return its ``graph_id``, as ``Client.register``."""
        return await self._run(steps.register(self.policy, graph, names, timeout))

    async def jacobian(
        self,
        outputs: Sequence[Value],
        inputs: Sequence[Value],
        *,
        cotangents: Sequence[float] | None = None,
        timeout: float | None = None,
    ) -> list[list[float]] | list[float]:
        """``micrograd.engine.jacobian(outputs, inputs)`` computed by the server in one call.

        With ``cotangents`` (one weight per output), the vector-Jacobian product
        ``sum_k w_k d(outputs[k])/d(inputs)`` from one reverse sweep, as one row.
        """
        return await self._run(steps.jacobian(self.policy, outputs, inputs, cotangents, timeout))

    async def hvp(
        self,
        output: Value,
        inputs: Sequence[Value],
        vector: Sequence[float] | np.ndarray,
        *,
        batch: np.ndarray | Sequence[Sequence[float]] | None = None,
        timeout: float | None = None,
    ) -> list[float] | list[list[float]]:
        """``micrograd.engine.hvp(output, inputs, vector)`` computed by the server.

        ``batch`` (``(rows, len(inputs))``) evaluates at many bindings of ``inputs`` in one
        call and returns one ``H v`` per row; ``vector`` is then shared or one row per binding.
        """
        return await self._run(steps.hvp(self.policy, output, inputs, vector, batch, timeout))

    async def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """The server's version, operations, limits, kernel and worker count."""
        return await self._run(steps.server_info(self.policy, timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status of ``service`` (``""``: the whole server)."""
        return await self._run(steps.health(self.policy, service, timeout))

    async def _run(self, call: Steps[T]) -> T:
        """Perform ``call``'s steps, awaited, until it answers."""
        step = steps.resume(call)
        while not isinstance(step, Done):
            try:
                reply = await self._perform(step)
            except grpc.RpcError as error:
                step = steps.resume(call, error=error)
            else:
                step = steps.resume(call, reply)
        return step.value  # type: ignore[no-any-return]

    async def _perform(self, step: Rpc | Pause) -> Any:
        """One step: the rpc on the channel (its reply, or the filled stream assembly), or
        the pause as a sleep."""
        if isinstance(step, Pause):
            await asyncio.sleep(step.seconds)
            return None
        stub = self._health if step.health else self._stub
        answer = getattr(stub, step.method)(step.request, timeout=step.timeout)
        if step.into is None:
            return await answer
        async for message in answer:
            step.into.add(message)
        return step.into
