"""``AsyncClient``: ``Client`` for asyncio programs (grpc.aio), with the same methods awaited.

Routing, retries, uploads, streaming and re-registration behave exactly as
in ``Client``; they share ``Settings`` and the request/result code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from micrograd import codec
from micrograd.engine import Value
from micrograd.v1 import gradient_service_pb2 as pb

from .channel import MiB, Pem, Retry, Stub, channel_credentials, open_channel, token_metadata
from .client import GraphMessage, Settings
from .errors import NotFound, remote_error
from .request import (
    GraphLike,
    Prepared,
    SelectionLike,
    evaluate_request,
    packed,
    prepare,
    register_request,
    split_request,
    stream_request,
    upload_pieces,
    with_source,
)
from .result import Result, StreamAssembly, apply_backward, result_from_response

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient:
    """The asyncio twin of ``Client`` (same arguments); use ``async with`` to close the channel."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = 60.0,
        retries: int = 4,
        retry: Retry | None = None,
        max_message_bytes: int = 256 * MiB,
        upload_threshold: int = 64 * MiB,
        stream_threshold: int = 4 * MiB,
        piece_bytes: int = 2 * MiB,
        remember: int = 16,
        credentials: grpc.ChannelCredentials | None = None,
        tls: bool | Pem = False,
        root_certificates: Pem | None = None,
        client_certificate: Pem | tuple[Pem, Pem] | None = None,
        client_key: Pem | None = None,
        server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        """Open an asyncio channel to ``target``; see ``Client`` for the arguments."""
        self.settings = Settings(
            target,
            timeout,
            retries,
            retry,
            max_message_bytes,
            upload_threshold,
            stream_threshold,
            piece_bytes,
            remember,
        )
        if credentials is None:
            credentials = channel_credentials(
                tls, root_certificates, client_certificate, client_key
            )
        self.channel = open_channel(
            target, self.settings.options, credentials, server_name, aio=True
        )
        self._stub = Stub(self.channel, token_metadata(token))
        self._health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def target(self) -> str:
        """The server address this client calls."""
        return self.settings.target

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
        prepared = prepare(v, names)
        result = await self._evaluate(prepared, evaluate_request(), False, None, timeout)
        assert prepared.order is not None and result.grads is not None
        apply_backward(prepared.order, result.values, result.grads)
        return result

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
        request = evaluate_request(
            inputs=inputs, output=output, selection=selection, batch=batch, gradients=gradients
        )
        return await self._evaluate(
            prepare(graph, names), request, batch is not None, stream, timeout
        )

    async def send(
        self,
        request: pb.EvaluateRequest,
        *,
        stream: bool | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Evaluate a ready-made ``EvaluateRequest``, as ``Client.send``."""
        prepared, rest = split_request(request)
        return await self._evaluate(prepared, rest, request.HasField("batch"), stream, timeout)

    async def register(
        self,
        graph: GraphLike,
        *,
        names: Mapping[str, Value] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Store ``graph`` on the server and return its ``graph_id``, as ``Client.register``."""
        prepared = prepare(graph, names)
        if prepared.message is None:
            raise TypeError("register() needs a graph, not a graph_id")
        return await self._register(prepared.message, timeout)

    async def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """The server's version, operations, limits, kernel and worker count."""

        async def attempt(t: float | None) -> pb.GetServerInfoResponse:
            return await self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=t)

        return await self._call(attempt, timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status of ``service`` (``""``: the whole server)."""

        async def attempt(t: float | None) -> health_pb2.HealthCheckResponse:
            request = health_pb2.HealthCheckRequest(service=service)
            return await self._health.Check(request, timeout=t)

        reply = await self._call(attempt, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def _call(
        self, attempt: Callable[[float | None], Awaitable[T]], timeout: float | None
    ) -> T:
        """Await ``attempt(seconds_left)``, retrying ``UNAVAILABLE``; raise ``RemoteError``."""
        s = self.settings
        deadline = s.deadline(timeout)
        delays = s.retry.delays()
        tries = 0
        while True:
            tries += 1
            try:
                return await attempt(s.remaining(deadline))
            except grpc.RpcError as error:
                if error.code() is grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    delay = s.next_delay(delays, deadline)
                    if delay is not None:
                        await asyncio.sleep(delay)
                        continue
                raise remote_error(error, s.target, tries) from error

    async def _register(self, message: GraphMessage, timeout: float | None) -> str:
        """RegisterGraph, or UploadGraph in pieces for a large message; remembers the graph."""
        s = self.settings

        async def attempt(t: float | None) -> str:
            if s.uploads(message):
                pieces = upload_pieces(packed(message), s.piece_bytes)
                reply = await self._stub.UploadGraph(pieces, timeout=t)
            else:
                reply = await self._stub.RegisterGraph(register_request(message), timeout=t)
            return str(reply.graph_id)

        graph_id = await self._call(attempt, timeout)
        s.remember_graph(graph_id, message)
        return graph_id

    async def _evaluate(
        self,
        prepared: Prepared,
        request: pb.EvaluateRequest,
        batched: bool,
        stream: bool | None,
        timeout: float | None,
    ) -> Result:
        """Route one evaluation as ``Client._evaluate`` does."""
        s = self.settings
        upload, streamed = s.route(prepared, request, stream)
        graph_id = prepared.graph_id
        if upload:
            assert prepared.message is not None
            graph_id = await self._register(prepared.message, timeout)
        source = graph_id if graph_id is not None else prepared.message
        assert source is not None
        full = with_source(request, source)
        gradients = not request.skip_gradients
        try:
            result = await self._evaluate_once(full, batched, gradients, streamed, timeout)
        except NotFound as error:
            if graph_id is None:
                raise
            await self._register(s.resend(prepared, graph_id, error), timeout)
            return await self._evaluate_once(full, batched, gradients, streamed, timeout)
        if graph_id is None and prepared.message is not None and result.graph_id:
            s.remember_graph(result.graph_id, prepared.message)
        return result

    async def _evaluate_once(
        self,
        request: pb.EvaluateRequest | codec.Wire,
        batched: bool,
        gradients: bool,
        streamed: bool,
        timeout: float | None,
    ) -> Result:
        """One Evaluate or EvaluateStream call (with retries) turned into a ``Result``."""

        async def attempt(t: float | None) -> Result:
            if not streamed:
                response = await self._stub.Evaluate(request, timeout=t)
                return result_from_response(response, batched, gradients)
            assembly = StreamAssembly(batched, gradients)
            call = self._stub.EvaluateStream(stream_request(request), timeout=t)
            async for message in call:
                assembly.add(message)
            return assembly.result()

        return await self._call(attempt, timeout)
