"""A request's life, without any I/O: what to send, and when to send it again.

Building requests: a graph may be given as a ``Graph`` or ``PackedGraph``
message, a ``Tape``, a ``Value`` (its whole expression graph) or the
``graph_id`` of a graph registered earlier. ``prepare`` brings each to one
shape, ``evaluate_request`` fills in inputs, batch, selection and output, and
``upload_pieces`` cuts a large ``PackedGraph`` into ``UploadGraph`` messages.

Deciding: every call of ``Client`` and ``AsyncClient`` is one of the step
generators at the end of this module (``backward``, ``evaluate``, ``send``,
``register``, ``server_info``, ``health``). A generator yields the I/O it
needs (``Rpc``: one attempt of an rpc; ``Pause``: a wait before retrying)
and is sent the reply, or has the ``grpc.RpcError`` thrown in; the clients
only perform those steps, blocking or awaited. So the retry loop
(``attempts``), the route of an evaluation (register or upload first? stream
the result?) and the resend of a graph the server no longer holds
(``_evaluate``) are written once, here, under a ``CallPolicy``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from micrograd import codec
from micrograd.codec.lru import LRU
from micrograd.engine import Value
from micrograd.tape import Tape
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import graph_pb2

from .channel import Retry, channel_options
from .errors import NotFound, RemoteError, remote_error
from .result import Result, StreamAssembly, apply_backward, result_from_response

__all__ = [
    "CallPolicy",
    "Done",
    "GraphLike",
    "Pause",
    "Prepared",
    "Rpc",
    "SelectionLike",
    "Steps",
    "attempts",
    "backward",
    "evaluate",
    "evaluate_request",
    "health",
    "packed",
    "prepare",
    "register",
    "register_request",
    "send",
    "server_info",
    "split_request",
    "stream_request",
    "upload_pieces",
    "with_source",
]

GraphLike: TypeAlias = graph_pb2.Graph | graph_pb2.PackedGraph | Tape | Value | str
"""Anything ``evaluate`` accepts as its graph."""

SelectionLike: TypeAlias = str | Sequence[int] | np.ndarray
"""``"all"``, ``"inputs"``, ``"named"``, ``"output"`` or a list of node indices."""

_SELECTIONS = {
    "all": pb.SELECTION_ALL,
    "inputs": pb.SELECTION_INPUTS,
    "named": pb.SELECTION_NAMED,
    "output": pb.SELECTION_OUTPUT,
}


@dataclass
class Prepared:
    """A graph ready to send: a message, or only an id; ``order`` maps a ``Value`` graph back."""

    message: graph_pb2.Graph | graph_pb2.PackedGraph | None
    graph_id: str | None = None
    order: list[Value] | None = None

    @property
    def node_count(self) -> int | None:
        """Number of nodes, when the graph itself is at hand."""
        if isinstance(self.message, graph_pb2.PackedGraph):
            return len(self.message.ops)
        if isinstance(self.message, graph_pb2.Graph):
            return len(self.message.nodes)
        return None

    def byte_size(self) -> int:
        """Encoded size of the graph message (0 for an id), within a few bytes per name."""
        message = self.message
        if isinstance(message, graph_pb2.PackedGraph):  # ByteSize() would walk 8 MB for 1M nodes
            columns = len(message.ops) + len(message.args) + len(message.values)
            return columns + 16 + sum(len(n.name) + 12 for n in message.names)
        return 0 if message is None else message.ByteSize()


def prepare(
    graph: GraphLike,
    names: Mapping[str, Value] | None = None,
    request: pb.EvaluateRequest | None = None,
) -> Prepared:
    """Bring any accepted graph form to a ``Prepared``; ``names`` label a ``Value`` graph.

    A ``Value`` graph has no names of its own: inputs that ``request`` binds
    by a name ``names`` does not give raise ``ValueError`` saying so.
    """
    if isinstance(graph, str):
        return Prepared(None, graph_id=graph)
    if isinstance(graph, Value):
        if request is not None:
            bound = [*request.inputs, *request.batch.columns]
            unnamed = sorted({name for name in bound if name not in (names or {})})
            if unnamed:
                first = unnamed[0]
                raise ValueError(
                    f"no input is named {', '.join(map(repr, unnamed))}: the nodes of a Value "
                    "graph have no names until you give them with names=, e.g. "
                    f"evaluate(g, inputs={{{first!r}: 2.0}}, names={{{first!r}: {first}}})"
                )
        message, order = codec.pack_value(graph, names)
        return Prepared(message, order=order)
    if names:
        raise TypeError("names= applies to a Value graph; name nodes inside the graph instead")
    if isinstance(graph, Tape):
        return Prepared(codec.pack(graph))
    if isinstance(graph, (graph_pb2.Graph, graph_pb2.PackedGraph)):
        return Prepared(graph)
    raise TypeError(
        "graph must be a micrograd.v1 Graph or PackedGraph, a Tape, a Value or a graph_id "
        f"string, not {type(graph).__name__}"
    )


def register_request(message: graph_pb2.Graph | graph_pb2.PackedGraph) -> pb.RegisterGraphRequest:
    """The ``RegisterGraphRequest`` carrying ``message``."""
    if isinstance(message, graph_pb2.PackedGraph):
        return pb.RegisterGraphRequest(packed_graph=message)
    return pb.RegisterGraphRequest(graph=message)


def packed(message: graph_pb2.Graph | graph_pb2.PackedGraph) -> graph_pb2.PackedGraph:
    """The graph as a ``PackedGraph`` (a ``Graph`` is decoded, validated and repacked)."""
    if isinstance(message, graph_pb2.PackedGraph):
        return message
    return codec.pack(codec.from_graph(message))


def _selection(request: pb.EvaluateRequest, selection: SelectionLike) -> None:
    """Set ``selection`` (and the listed ``nodes``) on the request."""
    if isinstance(selection, str):
        try:
            request.selection = _SELECTIONS[selection]
        except KeyError:
            raise ValueError(
                f"unknown selection {selection!r}; use one of {', '.join(_SELECTIONS)} "
                "or a list of node indices"
            ) from None
        return
    request.selection = pb.SELECTION_LISTED
    request.nodes.extend(np.asarray(selection, dtype=np.int64).tolist())


def _batch(request: pb.EvaluateRequest, batch: Mapping[str, Sequence[float]] | np.ndarray) -> None:
    """Fill ``request.batch``: named columns from a mapping, or a ``(rows, inputs)`` array."""
    if isinstance(batch, Mapping):
        columns = list(batch)
        if not columns:
            raise ValueError("batch has no columns")
        data = np.column_stack([np.asarray(batch[c], dtype=np.float64) for c in columns])
        request.batch.columns.extend(columns)
    else:
        data = np.asarray(batch, dtype=np.float64)
        if data.ndim != 2:
            raise ValueError(
                f"a batch array must be 2-D (rows, one column per input node), got {data.shape}"
            )
    request.batch.values_f64 = codec.f64_bytes(data)


def evaluate_request(
    *,
    inputs: Mapping[str, float] | None = None,
    output: int | None = None,
    selection: SelectionLike = "all",
    batch: Mapping[str, Sequence[float]] | np.ndarray | None = None,
    gradients: bool = True,
    binary_output: bool = True,
) -> pb.EvaluateRequest:
    """An ``EvaluateRequest`` without its graph source (set by ``with_source``)."""
    request = pb.EvaluateRequest(binary_output=binary_output, skip_gradients=not gradients)
    if inputs:
        for name, value in inputs.items():
            request.inputs[name] = float(value)
    if output is not None:
        request.output = int(output)
    _selection(request, selection)
    if batch is not None:
        _batch(request, batch)
    return request


def with_source(
    request: pb.EvaluateRequest,
    source: graph_pb2.Graph | graph_pb2.PackedGraph | str,
) -> pb.EvaluateRequest | codec.Wire:
    """``request`` evaluating ``source``: a graph_id is set on a copy; a graph message is
    appended already serialized (``codec.with_message``), the fast way to send a big one."""
    if isinstance(source, str):
        out = pb.EvaluateRequest()
        out.CopyFrom(request)
        out.graph_id = source
        return out
    field = "packed_graph" if isinstance(source, graph_pb2.PackedGraph) else "graph"
    return codec.with_message(request, field, source.SerializeToString())


def stream_request(
    request: pb.EvaluateRequest | codec.Wire,
) -> pb.EvaluateStreamRequest | codec.Wire:
    """The ``EvaluateStreamRequest`` around ``request`` (kept serialized if it is)."""
    if isinstance(request, codec.Wire):
        return codec.with_message(pb.EvaluateStreamRequest(), "request", request.data)
    return pb.EvaluateStreamRequest(request=request)


def split_request(request: pb.EvaluateRequest) -> tuple[Prepared, pb.EvaluateRequest]:
    """A complete ``EvaluateRequest`` as its graph source and the rest of the request."""
    source = request.WhichOneof("source")
    if source is None:
        raise ValueError("the EvaluateRequest has no graph: set graph, packed_graph or graph_id")
    prepared = prepare(getattr(request, source))
    rest = pb.EvaluateRequest()
    rest.CopyFrom(request)
    rest.ClearField(source)
    return prepared, rest


def upload_pieces(
    graph: graph_pb2.PackedGraph, piece_bytes: int
) -> Iterator[pb.UploadGraphRequest]:
    """``graph`` as ``UploadGraph`` messages of about ``piece_bytes`` each.

    The server appends each column to what earlier pieces sent, so the
    columns are cut independently: piece k carries the k-th of m equal runs
    of ``ops``, of ``args`` and of ``values`` (cut at whole elements), with
    no per-node work; names follow in pieces of their own.
    """
    columns = ((graph.ops, 1), (graph.args, 4), (graph.values, 8))
    total = sum(len(data) for data, _ in columns)
    m = max(-(-total // max(piece_bytes, 1)), 1)
    cuts = [
        [len(data) // size * k // m * size for k in range(m)] + [len(data)]
        for data, size in columns
    ]
    for k in range(m):
        ops, args, values = (data[cut[k] : cut[k + 1]] for (data, _), cut in zip(columns, cuts))
        yield pb.UploadGraphRequest(piece=graph_pb2.PackedGraph(ops=ops, args=args, values=values))
    names = graph.names
    per_piece = max(piece_bytes // 64, 1)
    for start in range(0, len(names), per_piece):
        yield pb.UploadGraphRequest(
            piece=graph_pb2.PackedGraph(names=names[start : start + per_piece])
        )


# -- the policy of a client's calls --------------------------------------------------------

GraphMessage: TypeAlias = graph_pb2.Graph | graph_pb2.PackedGraph


class CallPolicy:
    """How a client calls: target, deadline, retries, message and upload sizes, and the
    graphs it remembers in order to resend them."""

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
        self.known: LRU[str, GraphMessage] = LRU(remember)

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
        self.known.put(graph_id, message)

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
            message = self.known.peek(prepared.graph_id)
        if message is None:
            return upload, upload
        n = Prepared(message).node_count or 0
        rows = 1
        if request.HasField("batch"):
            rows = codec.batch_rows(request.batch, max(len(request.batch.columns), 1))
        return upload, upload or n * max(rows, 1) * 16 > self.stream_threshold

    def uploads(self, message: GraphMessage) -> bool:
        """Whether ``message`` is big enough to go through UploadGraph rather than RegisterGraph."""
        return Prepared(message).byte_size() > self.upload_threshold

    def resend(self, prepared: Prepared, graph_id: str, error: NotFound) -> GraphMessage:
        """The graph to register again when the server lacks ``graph_id``, or raise ``NotFound``."""
        message = prepared.message or self.known.peek(graph_id)
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


# -- the steps of a call -------------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Rpc:
    """One attempt of an rpc, for a client to perform and answer with the reply.

    ``method`` is a ``GradientService`` method (or ``Check`` of the health
    service when ``health``), ``request`` its request (an iterator for
    UploadGraph), ``timeout`` the seconds left. A streamed response is fed
    message by message into ``into``, which is then the reply.
    """

    method: str
    request: Any
    timeout: float | None
    into: StreamAssembly | None = None
    health: bool = False


@dataclass(frozen=True, slots=True)
class Pause:
    """Wait ``seconds`` before the next attempt."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Done:
    """The call has answered ``value``."""

    value: Any


Steps: TypeAlias = Generator[Rpc | Pause, Any, T]
"""What a call does, as steps: yields ``Rpc`` and ``Pause``, returns the call's answer."""


def resume(
    call: Steps[Any], reply: Any = None, error: grpc.RpcError | None = None
) -> Rpc | Pause | Done:
    """The next step of ``call`` after ``reply`` (or the failure ``error``) of the last one;
    the first step when neither is given; ``Done`` once the call has answered."""
    try:
        return call.send(reply) if error is None else call.throw(error)
    except StopIteration as done:
        return Done(done.value)


RETRIED = frozenset((grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED))
"""Statuses a call is tried again after: the server went away or is draining (``UNAVAILABLE``),
or a server or proxy cut the call off as it stopped (``CANCELLED``: this client never cancels
a call itself). Every rpc of the service is idempotent, and a stream restarts from scratch."""

_RESET = "RST_STREAM"
"""In the details of an ``INTERNAL`` status that gRPC's transport made itself: the stream was
reset under the call (a server or proxy died while answering), not an error of the service."""


def retried(error: grpc.RpcError) -> bool:
    """Whether a failed attempt is worth another: a ``RETRIED`` status, or a stream the
    transport reset (``INTERNAL`` naming ``RST_STREAM``)."""
    code = error.code()  # type: ignore[attr-defined]
    if code in RETRIED:
        return True
    details = error.details() or ""  # type: ignore[attr-defined]
    return bool(code is grpc.StatusCode.INTERNAL and _RESET in details)


def attempts(
    policy: CallPolicy, attempt: Callable[[float | None], Rpc], timeout: float | None
) -> Steps[Any]:
    """``attempt(seconds_left)`` until it answers, retrying what ``retried`` allows with backoff
    within one deadline; any other failure (or the last) raises ``RemoteError``."""
    deadline = policy.deadline(timeout)
    delays = policy.retry.delays()
    tries = 0
    while True:
        tries += 1
        try:
            return (yield attempt(policy.remaining(deadline)))
        except grpc.RpcError as error:
            if retried(error):
                delay = policy.next_delay(delays, deadline)
                if delay is not None:
                    yield Pause(delay)
                    continue
            raise remote_error(error, policy.target, tries) from error


def backward(
    policy: CallPolicy, v: Value, names: Mapping[str, Value] | None, timeout: float | None
) -> Steps[Result]:
    """Remote ``v.backward()``: evaluate ``v``'s graph and set every node's data and grad."""
    prepared = prepare(v, names)
    result = yield from _evaluate(policy, prepared, evaluate_request(), False, None, timeout)
    assert prepared.order is not None and result.grads is not None
    apply_backward(prepared.order, result.values, result.grads)
    return result


def evaluate(
    policy: CallPolicy,
    graph: GraphLike,
    *,
    inputs: Mapping[str, float] | None,
    output: int | None,
    selection: SelectionLike,
    batch: Mapping[str, Sequence[float]] | np.ndarray | None,
    gradients: bool,
    stream: bool | None,
    names: Mapping[str, Value] | None,
    timeout: float | None,
) -> Steps[Result]:
    """Evaluate and differentiate ``graph`` (see ``Client.evaluate`` for the arguments)."""
    request = evaluate_request(
        inputs=inputs, output=output, selection=selection, batch=batch, gradients=gradients
    )
    prepared = prepare(graph, names, request)
    return (yield from _evaluate(policy, prepared, request, batch is not None, stream, timeout))


def send(
    policy: CallPolicy, request: pb.EvaluateRequest, stream: bool | None, timeout: float | None
) -> Steps[Result]:
    """Evaluate a ready-made ``EvaluateRequest`` as ``evaluate`` would."""
    prepared, rest = split_request(request)
    batched = request.HasField("batch")
    return (yield from _evaluate(policy, prepared, rest, batched, stream, timeout))


def register(
    policy: CallPolicy, graph: GraphLike, names: Mapping[str, Value] | None, timeout: float | None
) -> Steps[str]:
    """Store ``graph`` in the server's cache and return its ``graph_id``."""
    prepared = prepare(graph, names)
    if prepared.message is None:
        raise TypeError("register() needs a graph, not a graph_id")
    return (yield from _register(policy, prepared.message, timeout))


def server_info(policy: CallPolicy, timeout: float | None) -> Steps[pb.GetServerInfoResponse]:
    """The server's version, operations, limits, kernel and worker count."""
    request = pb.GetServerInfoRequest()
    reply = yield from attempts(policy, lambda t: Rpc("GetServerInfo", request, t), timeout)
    return reply  # type: ignore[no-any-return]


def jacobian_request(
    outputs: Sequence[Value], inputs: Sequence[Value], cotangents: Sequence[float] | None = None
) -> tuple[pb.JacobianRequest, list[int | None]]:
    """The ``JacobianRequest`` of ``outputs`` w.r.t. ``inputs`` (one graph holding them all),
    and each input's column in the response (``None``: not in the graph, so its column is 0).

    A custom node (``Value(data, children, op)``) raises ``GraphError`` naming its op.
    """
    tape, order = Tape.from_values(list(outputs))
    index = {v: i for i, v in enumerate(order)}
    nodes: list[int] = []
    column: list[int | None] = []
    for x in inputs:
        if x in index:
            column.append(len(nodes))
            nodes.append(index[x])
        else:
            column.append(None)
    inner = pb.EvaluateRequest(
        packed_graph=codec.pack(tape), selection=pb.SELECTION_LISTED, nodes=nodes
    )
    request = pb.JacobianRequest(request=inner, outputs=[index[o] for o in outputs])
    if cotangents is not None:
        request.cotangents.extend(float(w) for w in cotangents)
    return request, column


def _f64(values: Any, raw: bytes) -> np.ndarray:
    """A response's numbers, whether sent as doubles or as float64 bytes."""
    return codec.f64_array(raw) if raw else np.array(values, dtype=np.float64)


def jacobian(
    policy: CallPolicy,
    outputs: Sequence[Value],
    inputs: Sequence[Value],
    cotangents: Sequence[float] | None,
    timeout: float | None,
) -> Steps[list[list[float]] | list[float]]:
    """The Jacobian rows (one per output) or, with ``cotangents``, their weighted sum."""
    request, column = jacobian_request(outputs, inputs, cotangents)
    reply = yield from attempts(policy, lambda t: Rpc("Jacobian", request, t), timeout)
    width = len(reply.nodes)
    jac = _f64(reply.jacobian, reply.jacobian_f64).reshape(-1, width)

    def row(r: np.ndarray) -> list[float]:
        return [0.0 if j is None else float(r[j]) for j in column]

    if cotangents is not None:
        return row(jac[0])
    return [row(r) for r in jac]


def hvp_request(
    output: Value,
    inputs: Sequence[Value],
    vector: Sequence[float] | np.ndarray,
    batch: np.ndarray | Sequence[Sequence[float]] | None = None,
) -> tuple[pb.HessianVectorProductRequest, list[int | None]]:
    """The ``HessianVectorProductRequest`` of ``output`` w.r.t. the leaves ``inputs`` along
    ``vector``, and each input's position among the graph's inputs (``None``: not in it).

    ``batch`` is ``(rows, len(inputs))``: values of ``inputs`` per binding (the other
    inputs keep their data); ``vector`` is then one vector for all rows or one per row.
    """
    tape, order = Tape.from_value(output)
    position = {int(node): j for j, node in enumerate(tape.inputs.tolist())}
    index = {v: i for i, v in enumerate(order)}
    where: list[int | None] = []
    for j, x in enumerate(inputs):
        if x._a is not None or x._code == 0:
            raise ValueError(f"inputs[{j}] is not a leaf: hvp differentiates w.r.t. inputs")
        i = index.get(x)
        if i is not None and i not in position:
            raise ValueError(f"inputs[{j}] is a constant of the graph, not one of its inputs")
        where.append(None if i is None else position[i])
    k = int(tape.inputs.shape[0])
    vec = np.asarray(vector, dtype=np.float64)
    rows = 1 if batch is None else len(batch)
    given = vec.reshape(-1, len(inputs))
    if given.shape[0] not in (1, rows):
        raise ValueError(f"vector must have {len(inputs)} entries, or one row per binding")
    full = np.zeros((given.shape[0], k))
    for j, p in enumerate(where):
        if p is not None:
            full[:, p] += given[:, j]
    inner = pb.EvaluateRequest(packed_graph=codec.pack(tape), binary_output=True)
    if batch is not None:
        values = np.asarray(batch, dtype=np.float64).reshape(rows, len(inputs))
        table = np.repeat(tape.const[tape.inputs][None, :], rows, axis=0)
        for j, p in enumerate(where):
            if p is not None:
                table[:, p] = values[:, j]
        inner.batch.values_f64 = codec.f64_bytes(np.ascontiguousarray(table))
    request = pb.HessianVectorProductRequest(request=inner, vector=full.ravel().tolist())
    return request, where


def hvp(
    policy: CallPolicy,
    output: Value,
    inputs: Sequence[Value],
    vector: Sequence[float] | np.ndarray,
    batch: np.ndarray | Sequence[Sequence[float]] | None,
    timeout: float | None,
) -> Steps[list[float] | list[list[float]]]:
    """``H v`` at the inputs: a list, or one list per binding of ``batch``."""
    request, where = hvp_request(output, inputs, vector, batch)
    reply = yield from attempts(
        policy, lambda t: Rpc("HessianVectorProduct", request, t), timeout
    )
    table = _f64(reply.hvp, reply.hvp_f64).reshape(reply.rows, -1)
    rows = [[0.0 if p is None else float(r[p]) for p in where] for r in table]
    return rows if batch is not None else rows[0]


def health(policy: CallPolicy, service: str, timeout: float | None) -> Steps[str]:
    """The grpc.health.v1 status name of ``service`` (``""``: the whole server)."""
    request = health_pb2.HealthCheckRequest(service=service)
    reply = yield from attempts(policy, lambda t: Rpc("Check", request, t, health=True), timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _register(policy: CallPolicy, message: GraphMessage, timeout: float | None) -> Steps[str]:
    """RegisterGraph, or UploadGraph in pieces for a large message; remembers the graph."""
    if policy.uploads(message):
        whole = packed(message)

        def attempt(t: float | None) -> Rpc:
            return Rpc("UploadGraph", upload_pieces(whole, policy.piece_bytes), t)
    else:
        request = register_request(message)

        def attempt(t: float | None) -> Rpc:
            return Rpc("RegisterGraph", request, t)

    reply = yield from attempts(policy, attempt, timeout)
    policy.remember_graph(reply.graph_id, message)
    return str(reply.graph_id)


def _evaluate(
    policy: CallPolicy,
    prepared: Prepared,
    request: pb.EvaluateRequest,
    batched: bool,
    stream: bool | None,
    timeout: float | None,
) -> Steps[Result]:
    """Route one evaluation (inline or by id, unary or streamed); resend an evicted graph."""
    upload, streamed = policy.route(prepared, request, stream)
    graph_id = prepared.graph_id
    if upload:
        assert prepared.message is not None
        graph_id = yield from _register(policy, prepared.message, timeout)
    source = graph_id if graph_id is not None else prepared.message
    assert source is not None
    full = with_source(request, source)
    gradients = not request.skip_gradients
    try:
        result = yield from _evaluate_once(policy, full, batched, gradients, streamed, timeout)
    except NotFound as error:
        if graph_id is None:
            raise
        yield from _register(policy, policy.resend(prepared, graph_id, error), timeout)
        return (yield from _evaluate_once(policy, full, batched, gradients, streamed, timeout))
    if graph_id is None and prepared.message is not None and result.graph_id:
        policy.remember_graph(result.graph_id, prepared.message)
    return result


def _evaluate_once(
    policy: CallPolicy,
    request: pb.EvaluateRequest | codec.Wire,
    batched: bool,
    gradients: bool,
    streamed: bool,
    timeout: float | None,
) -> Steps[Result]:
    """One Evaluate or EvaluateStream call (with retries) turned into a ``Result``."""
    if not streamed:
        response = yield from attempts(policy, lambda t: Rpc("Evaluate", request, t), timeout)
        return result_from_response(response, batched, gradients)

    def attempt(t: float | None) -> Rpc:
        assembly = StreamAssembly(batched, gradients)
        return Rpc("EvaluateStream", stream_request(request), t, into=assembly)

    assembly = yield from attempts(policy, attempt, timeout)
    return assembly.result()  # type: ignore[no-any-return]
