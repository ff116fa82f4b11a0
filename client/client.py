"""``Client``: the gradient service from Python, over one gRPC channel.

``client.backward(v)`` is the remote twin of ``v.backward()``;
``client.evaluate(...)`` returns values and gradients as numpy arrays for
any graph form, a batch of bindings or a registered ``graph_id``. Graphs
too large for one message are uploaded in pieces and their results
streamed back, without the caller noticing.

Every decision (routing, retries, uploads, resending) is made by the steps
in ``client/request.py``; this client only performs them, blocking.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc
from micrograd.engine import Value
from micrograd.v1 import gradient_service_pb2 as pb

from . import request as steps
from .channel import (
    MiB,
    Pem,
    Retry,
    Stub,
    Target,
    channel_credentials,
    describe_target,
    open_channel,
    token_metadata,
)
from .request import CallPolicy, Done, GraphLike, Pause, Rpc, SelectionLike, Steps
from .result import Result

__all__ = ["Client", "Connection"]

T = TypeVar("T")


class Connection:
    """What ``Client`` and ``AsyncClient`` share: the call policy, the channel and its stubs."""

    _aio = False
    """Whether the channel is a ``grpc.aio`` one."""

    def __init__(
        self,
        target: Target = "127.0.0.1:50051",
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
        """Open a channel to ``target`` (``host:port``; several, as a list or comma-separated, or
        ``dns:///name:port``, to balance calls over them), over TLS when asked to."""
        self.policy = CallPolicy(
            describe_target(target),
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
            target, self.policy.options, credentials, server_name, aio=self._aio
        )
        self._stub = Stub(self.channel, token_metadata(token))
        self._health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def target(self) -> str:
        """The server address this client calls."""
        return self.policy.target


class Client(Connection):
    """A connection to one gradient service; use it as a context manager to close the channel.

    ``timeout`` is the default deadline of a call in seconds (retries
    included; ``None`` waits forever); ``retries`` is how many more times a
    call is tried when the server is ``UNAVAILABLE`` or cut it off as it
    stopped or died (``CANCELLED``, or a stream reset under it; bounded
    exponential backoff; pass ``retry=Retry(...)`` to shape it). Graph messages over
    ``upload_threshold`` bytes are uploaded in ``piece_bytes`` pieces (and
    so registered) before they are evaluated by id; results over
    ``stream_threshold`` bytes are streamed back in chunks. The last
    ``remember`` graphs this client sent are kept, so that evaluating one by
    its ``graph_id`` where the server does not hold it (evicted, or only ever
    evaluated inline) sends it again transparently.

    Balancing: ``target`` may name several servers, as a list of
    ``host:port`` (or one comma-separated string) or a ``dns:///name:port``
    that resolves to several addresses (a Kubernetes headless Service); calls
    then go to them in turn (gRPC's ``round_robin``), and a call that fails
    with ``UNAVAILABLE`` because its server went away is retried on another.

    Security: ``tls=True`` (or PEM ``root_certificates``, which ``tls`` may
    also be: bytes, or a file path) connects over TLS, verifying the server
    against those roots (default: the system's); ``client_certificate`` and
    ``client_key`` (PEM) answer a server that requires mutual TLS;
    ``server_name`` checks the server's certificate for that name instead of
    the target's host. ``token`` (default ``$MICROGRAD_RPC_TOKEN``) is sent as
    ``authorization: Bearer <token>`` with every call. ``credentials`` (ready
    ``grpc.ChannelCredentials``) replaces the TLS arguments.
    """

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
        return self._run(steps.backward(self.policy, v, names, timeout))

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
        return self._run(
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

    def send(
        self,
        request: pb.EvaluateRequest,
        *,
        stream: bool | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Evaluate a ready-made ``EvaluateRequest`` (read from JSON, say) as ``evaluate`` would."""
        return self._run(steps.send(self.policy, request, stream, timeout))

    def register(
        self,
        graph: GraphLike,
        *,
        names: Mapping[str, Value] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Store ``graph`` in the server's cache; return its ``graph_id`` (uploads big graphs)."""
        return self._run(steps.register(self.policy, graph, names, timeout))

    def jacobian(
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
        return self._run(steps.jacobian(self.policy, outputs, inputs, cotangents, timeout))

    def hvp(
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
        return self._run(steps.hvp(self.policy, output, inputs, vector, batch, timeout))

    def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """The server's version, operations, limits, kernel and worker count."""
        return self._run(steps.server_info(self.policy, timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status of ``service`` (``""``: the server), e.g. ``"SERVING"``."""
        return self._run(steps.health(self.policy, service, timeout))

    # -- performing the steps ------------------------------------------------

    def _run(self, call: Steps[T]) -> T:
        """Perform ``call``'s steps, blocking, until it answers."""
        step = steps.resume(call)
        while not isinstance(step, Done):
            try:
                reply = self._perform(step)
            except grpc.RpcError as error:
                step = steps.resume(call, error=error)
            else:
                step = steps.resume(call, reply)
        return step.value  # type: ignore[no-any-return]

    def _perform(self, step: Rpc | Pause) -> Any:
        """One step: the rpc on the channel (its reply, or the filled stream assembly), or
        the pause asleep."""
        if isinstance(step, Pause):
            time.sleep(step.seconds)
            return None
        stub = self._health if step.health else self._stub
        answer = getattr(stub, step.method)(step.request, timeout=step.timeout)
        if step.into is None:
            return answer
        for message in answer:
            step.into.add(message)
        return step.into
