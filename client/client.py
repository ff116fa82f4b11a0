"""``Client``: the gradient service from Python, over one gRPC channel.

``client.backward(v)`` is the remote twin of ``v.backward()``;
``client.evaluate(...)`` returns values and gradients as numpy arrays for
any graph form, a batch of bindings or a registered ``graph_id``. Graphs
too large for one message are uploaded in pieces and their results
streamed back, without the caller noticing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeAlias, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from micrograd import codec
from micrograd.engine import Value
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import graph_pb2

from .channel import (
    MiB,
    Pem,
    Retry,
    Stub,
    channel_credentials,
    channel_options,
    open_channel,
    token_metadata,
)
from .errors import NotFound, RemoteError, remote_error
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

__all__ = ["Client", "Settings"]

T = TypeVar("T")

GraphMessage: TypeAlias = graph_pb2.Graph | graph_pb2.PackedGraph


class Settings:
    """What both clients share: target, deadline, retry, message and upload sizes."""

    def __init__(
        self,
        target: str,
        timeout: float | None,
        retries: int,
        retry: Retry | None,
        max_message_bytes: int,
        upload_threshold: int,
        stream_threshold: int,
        piece_bytes: int,
        remember: int,
    ) -> None:
        """See ``Client`` for the meaning of each argument."""
        self.target = target
        self.timeout = timeout
        self.retry = retry or Retry(attempts=retries + 1)
        self.max_message_bytes = max_message_bytes
        self.upload_threshold = min(upload_threshold, max_message_bytes)
        self.stream_threshold = min(stream_threshold, max_message_bytes)
        self.piece_bytes = min(piece_bytes, max_message_bytes // 2)
        self.remember = remember
        self.options = channel_options(max_message_bytes, self.retry)
        self.known: OrderedDict[str, GraphMessage] = OrderedDict()

    def deadline(self, timeout: float | None) -> float | None:
        """Monotonic time by which a call (all its attempts) must end, or ``None``."""
        t = self.timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    def remaining(self, deadline: float | None) -> float | None:
        """Seconds left until ``deadline`` for the next attempt (never negative)."""
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    def next_delay(self, delays: Iterator[float], deadline: float | None) -> float | None:
        """The wait before the next try, or ``None`` if the tries or the deadline are used up."""
        delay = next(delays, None)
        if delay is None or (deadline is not None and time.monotonic() + delay >= deadline):
            return None
        return delay

    def remember_graph(self, graph_id: str, message: GraphMessage) -> None:
        """Keep the last few graphs this client registered, to resend one the server dropped."""
        self.known[graph_id] = message
        self.known.move_to_end(graph_id)
        while len(self.known) > self.remember:
            self.known.popitem(last=False)

    def route(
        self, prepared: Prepared, request: pb.EvaluateRequest, stream: bool | None
    ) -> tuple[bool, bool]:
        """``(upload, stream)``: whether to register the graph first, and to stream the result.

        A graph whose message exceeds ``upload_threshold`` is uploaded and
        evaluated by id; a result that may exceed ``stream_threshold`` (nodes
        x rows x 16 bytes) is streamed.
        """
        upload = prepared.message is not None and prepared.byte_size() > self.upload_threshold
        if stream is not None:
            return upload, stream
        message = prepared.message
        if message is None and prepared.graph_id is not None:
            message = self.known.get(prepared.graph_id)
        if message is None:
            return upload, upload
        n = Prepared(message).node_count or 0
        rows = 1
        if request.HasField("batch"):
            width = max(len(request.batch.columns), 1)
            rows = max(len(request.batch.values_f64) // 8, len(request.batch.values)) // width
        return upload, upload or n * max(rows, 1) * 16 > self.stream_threshold

    def uploads(self, message: GraphMessage) -> bool:
        """Whether ``message`` is big enough to go through UploadGraph rather than RegisterGraph."""
        return Prepared(message).byte_size() > self.upload_threshold

    def resend(self, prepared: Prepared, graph_id: str, error: NotFound) -> GraphMessage:
        """The graph to register again when the server lacks ``graph_id``, or raise ``NotFound``."""
        message = prepared.message or self.known.get(graph_id)
        if message is None:
            raise self.not_found(graph_id, error) from error
        return message

    def not_found(self, graph_id: str, error: RemoteError) -> NotFound:
        """The ``NotFound`` for a graph_id the server lacks and this client cannot resend."""
        return NotFound(
            f"graph {graph_id} is not registered on {self.target} and this client does not "
            f"hold it (server said: {error.message})",
            grpc.StatusCode.NOT_FOUND,
            target=self.target,
        )


class Client:
    """A connection to one gradient service; use it as a context manager to close the channel.

    ``timeout`` is the default deadline of a call in seconds (retries
    included; ``None`` waits forever); ``retries`` is how many more times a
    call is tried when the server is ``UNAVAILABLE`` (bounded exponential
    backoff; pass ``retry=Retry(...)`` to shape it). Graph messages over
    ``upload_threshold`` bytes are uploaded in ``piece_bytes`` pieces (and
    so registered) before they are evaluated by id; results over
    ``stream_threshold`` bytes are streamed back in chunks. The last
    ``remember`` graphs this client sent are kept, so that evaluating one by
    its ``graph_id`` where the server does not hold it (evicted, or only ever
    evaluated inline) sends it again transparently.

    Security: ``tls=True`` (or PEM ``root_certificates``, which ``tls`` may
    also be: bytes, or a file path) connects over TLS, verifying the server
    against those roots (default: the system's); ``client_certificate`` and
    ``client_key`` (PEM) answer a server that requires mutual TLS;
    ``server_name`` checks the server's certificate for that name instead of
    the target's host. ``token`` (default ``$MICROGRAD_RPC_TOKEN``) is sent as
    ``authorization: Bearer <token>`` with every call. ``credentials`` (ready
    ``grpc.ChannelCredentials``) replaces the TLS arguments.
    """

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
        """Open a channel to ``target`` (``host:port``), over TLS when asked to."""
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
            target, self.settings.options, credentials, server_name, aio=False
        )
        self._stub = Stub(self.channel, token_metadata(token))
        self._health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def target(self) -> str:
        """The server address this client calls."""
        return self.settings.target

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        self.channel.close()

    # -- the calls -----------------------------------------------------------

    def backward(
        self, v: Value, names: Mapping[str, Value] | None = None, *, timeout: float | None = None
    ) -> Result:
        """Remote ``v.backward()``: every node of ``v``'s graph gets the ``data`` and ``grad``
        a local backward would give (interior nodes this pass's gradient, leaves accumulate).

        ``names`` name nodes of the graph so that the returned ``Result``
        reports them in ``by_name``.
        """
        prepared = prepare(v, names)
        result = self._evaluate(prepared, evaluate_request(), False, None, timeout)
        assert prepared.order is not None and result.grads is not None
        apply_backward(prepared.order, result.values, result.grads)
        return result

    def evaluate(
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
        """Evaluate ``graph`` (a message, ``Tape``, ``Value`` or graph_id) and differentiate it.

        ``inputs`` bind named inputs; ``batch`` gives many bindings (a mapping
        of input name to column, or a ``(rows, inputs)`` array over every
        input in graph order); ``output`` is the node differentiated (default
        the last); ``selection`` picks the reported nodes. ``stream`` forces
        (``True``) or forbids (``False``) the streamed response; by default
        it is used for large results. ``names`` name nodes of a ``Value``.
        """
        request = evaluate_request(
            inputs=inputs, output=output, selection=selection, batch=batch, gradients=gradients
        )
        return self._evaluate(prepare(graph, names), request, batch is not None, stream, timeout)

    def send(
        self,
        request: pb.EvaluateRequest,
        *,
        stream: bool | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Evaluate a ready-made ``EvaluateRequest`` (read from JSON, say) as ``evaluate`` would."""
        prepared, rest = split_request(request)
        return self._evaluate(prepared, rest, request.HasField("batch"), stream, timeout)

    def register(
        self,
        graph: GraphLike,
        *,
        names: Mapping[str, Value] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Store ``graph`` in the server's cache; return its ``graph_id`` (uploads big graphs)."""
        prepared = prepare(graph, names)
        if prepared.message is None:
            raise TypeError("register() needs a graph, not a graph_id")
        return self._register(prepared.message, timeout)

    def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """The server's version, operations, limits, kernel and worker count."""
        return self._call(
            lambda t: self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=t), timeout
        )

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status of ``service`` (``""``: the server), e.g. ``"SERVING"``."""
        reply = self._call(
            lambda t: self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=t),
            timeout,
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    # -- plumbing --------------------------------------------------------------

    def _call(self, attempt: Callable[[float | None], T], timeout: float | None) -> T:
        """Run ``attempt(seconds_left)``, retrying ``UNAVAILABLE``; raise ``RemoteError``."""
        s = self.settings
        deadline = s.deadline(timeout)
        delays = s.retry.delays()
        tries = 0
        while True:
            tries += 1
            try:
                return attempt(s.remaining(deadline))
            except grpc.RpcError as error:
                if error.code() is grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    delay = s.next_delay(delays, deadline)
                    if delay is not None:
                        time.sleep(delay)
                        continue
                raise remote_error(error, s.target, tries) from error

    def _register(self, message: GraphMessage, timeout: float | None) -> str:
        """RegisterGraph, or UploadGraph in pieces for a large message; remembers the graph."""
        s = self.settings
        if s.uploads(message):
            whole = packed(message)
            reply = self._call(
                lambda t: self._stub.UploadGraph(upload_pieces(whole, s.piece_bytes), timeout=t),
                timeout,
            )
        else:
            request = register_request(message)
            reply = self._call(lambda t: self._stub.RegisterGraph(request, timeout=t), timeout)
        s.remember_graph(reply.graph_id, message)
        return str(reply.graph_id)

    def _evaluate(
        self,
        prepared: Prepared,
        request: pb.EvaluateRequest,
        batched: bool,
        stream: bool | None,
        timeout: float | None,
    ) -> Result:
        """Route one evaluation (inline or by id, unary or streamed); resend an evicted graph."""
        s = self.settings
        upload, streamed = s.route(prepared, request, stream)
        graph_id = prepared.graph_id
        if upload:
            assert prepared.message is not None
            graph_id = self._register(prepared.message, timeout)
        source = graph_id if graph_id is not None else prepared.message
        assert source is not None
        full = with_source(request, source)
        gradients = not request.skip_gradients
        try:
            result = self._evaluate_once(full, batched, gradients, streamed, timeout)
        except NotFound as error:
            if graph_id is None:
                raise
            self._register(s.resend(prepared, graph_id, error), timeout)
            return self._evaluate_once(full, batched, gradients, streamed, timeout)
        if graph_id is None and prepared.message is not None and result.graph_id:
            s.remember_graph(result.graph_id, prepared.message)
        return result

    def _evaluate_once(
        self,
        request: pb.EvaluateRequest | codec.Wire,
        batched: bool,
        gradients: bool,
        streamed: bool,
        timeout: float | None,
    ) -> Result:
        """One Evaluate or EvaluateStream call (with retries) turned into a ``Result``."""
        if not streamed:
            response = self._call(lambda t: self._stub.Evaluate(request, timeout=t), timeout)
            return result_from_response(response, batched, gradients)

        def attempt(t: float | None) -> Result:
            assembly = StreamAssembly(batched, gradients)
            streamed_request = stream_request(request)
            for message in self._stub.EvaluateStream(streamed_request, timeout=t):
                assembly.add(message)
            return assembly.result()

        return self._call(attempt, timeout)
