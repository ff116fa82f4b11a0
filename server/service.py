"""The gradient service without a transport: request messages in, response messages out.

Every rpc of ``micrograd.v1.GradientService`` is a plain method here, so the
gRPC servicer, the JSON-RPC endpoint and the tests share one implementation.
A call goes decode -> validate -> tape -> kernel -> encode, all on numpy
arrays (no Python object per node). Anything wrong with a request raises
``ServiceError`` carrying a status code, a message and field violations that
point into the request (``graph.nodes[17].args[1]``); a transport only maps
that onto its own error format.
"""

from __future__ import annotations

import concurrent.futures
import enum
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from micrograd import __version__, codec
from micrograd import ops as _ops
from micrograd.codec.wire import Wire, with_arrays
from micrograd.errors import GraphError
from micrograd.kernels import Kernel
from micrograd.tape import Tape
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import graph_pb2

from .cache import GraphCache, RecentGraphs
from .config import Settings, resolve_kernel

__all__ = ["Code", "Deadline", "GradientService", "Plan", "ServiceError", "Upload"]


class Code(enum.Enum):
    """Outcome of a failed call; the names are the gRPC status codes they map to."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"


class ServiceError(Exception):
    """A call that cannot be answered: a ``Code``, a message, and ``(field, description)`` pairs."""

    def __init__(
        self, code: Code, message: str, violations: Sequence[tuple[str, str]] = ()
    ) -> None:
        """``violations`` name request fields (``graph.nodes[3].op``) and what is wrong there."""
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = list(violations)


class Deadline:
    """When a call must stop: an optional time limit and a cancel flag, checked between phases.

    Thread-safe: a transport cancels from its own thread while the work runs
    on another, and the work calls ``check()`` between decode, the sweeps and
    encoding.
    """

    def __init__(self, seconds: float | None = None) -> None:
        """A deadline ``seconds`` from now (``None``: no time limit)."""
        self.expires = None if seconds is None else time.monotonic() + seconds
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Mark the call cancelled; the next ``check()`` raises."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether ``cancel()`` was called."""
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise ``ServiceError`` (CANCELLED or DEADLINE_EXCEEDED) if the call must stop."""
        if self._cancelled.is_set():
            raise ServiceError(Code.CANCELLED, "the call was cancelled")
        if self.expires is not None and time.monotonic() >= self.expires:
            raise ServiceError(
                Code.DEADLINE_EXCEEDED, "the deadline passed before the call finished"
            )


_NO_DEADLINE = Deadline()


_OVERLAP_CELLS = 50_000
"""From this size on (nodes for a graph's id, node-bindings for a stream), work overlaps on
background threads (hashlib and the native kernel release the GIL): a graph's id is hashed
while the sweeps run, and a stream's reverse sweep runs while its value chunks are sent.
Smaller calls do everything in line."""

GraphId = str | concurrent.futures.Future[str]
"""A graph id, or one still being hashed."""


def _resolved(gid: GraphId) -> str:
    """The id itself, waiting for the hash if it is still running."""
    return gid if isinstance(gid, str) else gid.result()


@dataclass(frozen=True)
class Plan:
    """A validated evaluation, ready for the kernel."""

    tape: Tape
    pending_graph_id: GraphId
    bindings: np.ndarray | None
    """``None`` (defaults), ``(k,)`` or ``(B, k)``: what ``Tape.leaf_values`` takes."""
    output: int
    selection: np.ndarray | None
    """Reported node indices, or ``None`` for every node in order."""
    rows: int
    """Number of bindings: 1 without a batch."""
    batched: bool
    gradients: bool
    binary: bool

    @property
    def graph_id(self) -> str:
        """The graph's content hash (waits for it if it is still being computed)."""
        return _resolved(self.pending_graph_id)

    @property
    def width(self) -> int:
        """Numbers reported per row."""
        return len(self.tape) if self.selection is None else int(self.selection.shape[0])


def _graph_violation(prefix: str, exc: GraphError) -> ServiceError:
    """Turn a codec/tape ``GraphError`` into INVALID_ARGUMENT (or RESOURCE_EXHAUSTED if too big).

    ``prefix`` locates the graph in the request (``"graph."``, ``"request.packed_graph."``,
    or ``""`` for request-level fields such as ``inputs[x]``).
    """
    field = prefix.rstrip(".") if exc.field == "graph" and prefix else prefix + exc.field
    if isinstance(exc, codec.GraphTooLarge):
        return ServiceError(Code.RESOURCE_EXHAUSTED, f"{field}: {exc}")
    return ServiceError(Code.INVALID_ARGUMENT, f"{field}: {exc}", [(field, str(exc))])


class GradientService:
    """The rpcs of ``GradientService`` as methods, with this process's kernel, cache and limits."""

    def __init__(self, settings: Settings, kernel: Kernel | None = None) -> None:
        """Serve with ``settings``; ``kernel`` overrides the one ``settings.kernel`` names."""
        self.settings = settings
        self.kernel = kernel or resolve_kernel(settings.kernel, settings.flush_denormals)
        self.cache = GraphCache(settings.graph_cache_entries, settings.graph_cache_bytes)
        self.recent = RecentGraphs()
        self._background = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="micrograd-overlap"
        )
        self._lock = threading.Lock()
        self._in_flight = 0
        self._draining = False

    # -- admission ---------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet finished."""
        return self._in_flight

    @property
    def draining(self) -> bool:
        """Whether ``drain`` was called: the server is shutting down and refuses new calls."""
        return self._draining

    def drain(self) -> None:
        """Refuse new calls (UNAVAILABLE) while those in flight finish: the start of shutdown."""
        with self._lock:
            self._draining = True

    def acquire(self) -> None:
        """Take one of ``max_concurrent_calls`` slots, or refuse the call at once (no queue)."""
        with self._lock:
            if self._draining:
                raise ServiceError(Code.UNAVAILABLE, "the server is shutting down; retry elsewhere")
            if self._in_flight >= self.settings.max_concurrent_calls:
                raise ServiceError(
                    Code.RESOURCE_EXHAUSTED,
                    f"this server process is already working on {self._in_flight} calls "
                    f"(max_concurrent_calls); retry later",
                )
            self._in_flight += 1

    def release(self) -> None:
        """Give back a slot taken by ``acquire``."""
        with self._lock:
            self._in_flight -= 1

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a call slot for the duration of a ``with`` block (see ``acquire``)."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    # -- sizing ------------------------------------------------------------

    def cells(self, request: pb.EvaluateRequest) -> int:
        """Cheap upper estimate of the node-bindings a request evaluates, before decoding it."""
        source = request.WhichOneof("source")
        if source == "graph":
            n = len(request.graph.nodes)
        elif source == "packed_graph":
            n = len(request.packed_graph.ops)
        elif source == "graph_id":
            tape = self.cache.peek(request.graph_id)
            n = 0 if tape is None else len(tape)
        else:
            n = 0
        if not request.HasField("batch"):
            return n
        batch = request.batch
        count = len(batch.values) + len(batch.values_f64) // 8
        return n * max(1, count // max(1, len(batch.columns)))

    # -- decoding ----------------------------------------------------------

    def _check_nodes(self, n: int, field: str) -> None:
        if n > self.settings.max_nodes:
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"{field}: the graph has {n} nodes; this server accepts at most "
                f"{self.settings.max_nodes} (max_nodes)",
            )

    def decode_graph(
        self, msg: pb.EvaluateRequest | pb.RegisterGraphRequest, prefix: str = ""
    ) -> tuple[Tape, GraphId]:
        """The tape a request's ``source`` gives, validated, and its graph id (maybe pending)."""
        source = msg.WhichOneof("source")
        if source == "graph_id" and isinstance(msg, pb.EvaluateRequest):
            tape = self.cache.get(msg.graph_id)
            if tape is None:
                raise ServiceError(
                    Code.NOT_FOUND,
                    f"no graph {msg.graph_id!r} is registered here (the cache may have dropped "
                    "it); send the graph again or register it",
                )
            return tape, msg.graph_id
        if source == "graph":
            n = len(msg.graph.nodes)
            self._check_nodes(n, prefix + "graph.nodes")
        elif source == "packed_graph":
            n = len(msg.packed_graph.ops)
            self._check_nodes(n, prefix + "packed_graph.ops")
        else:
            field = prefix + "source"
            raise ServiceError(
                Code.INVALID_ARGUMENT,
                "the request has no graph: set graph, packed_graph or graph_id",
                [(field, "one of graph, packed_graph or graph_id is required")],
            )
        key = None
        if n <= self.recent.max_nodes:
            key = source.encode() + getattr(msg, source).SerializeToString()
            known = self.recent.get(key)
            if known is not None:
                return known
        max_nodes = self.settings.max_nodes
        try:
            if source == "graph":
                tape = codec.from_graph(msg.graph, max_nodes)
            else:
                tape = codec.unpack(msg.packed_graph, max_nodes)
        except GraphError as exc:
            raise _graph_violation(f"{prefix}{source}.", exc) from None
        if n >= _OVERLAP_CELLS:
            return tape, self._background.submit(codec.graph_id, tape)
        gid = codec.graph_id(tape)
        if key is not None:
            self.recent.put(key, tape, gid)
        return tape, gid

    def plan(self, request: pb.EvaluateRequest, prefix: str = "") -> Plan:
        """Decode and validate an ``EvaluateRequest`` against the graph and the limits."""
        tape, gid = self.decode_graph(request, prefix)
        n = len(tape)
        rows, batched = 1, request.HasField("batch")
        if batched:
            batch = request.batch
            width = len(batch.columns) or int(tape.inputs.shape[0])
            count = len(batch.values) + len(batch.values_f64) // 8
            rows = count // width if width else 0
            if rows > self.settings.max_batch_rows:
                raise ServiceError(
                    Code.RESOURCE_EXHAUSTED,
                    f"{prefix}batch: {rows} rows; this server evaluates at most "
                    f"{self.settings.max_batch_rows} per call (max_batch_rows)",
                )
        if n * rows > self.settings.max_batch_cells:
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"{prefix}batch: {rows} rows x {n} nodes = {n * rows} node-bindings; this server "
                f"evaluates at most {self.settings.max_batch_cells} per call (max_batch_cells)",
            )
        try:
            output = codec.output_index(tape, request)
            selection = codec.selection_indices(tape, request, output)
            bound = codec.bindings(tape, request)
        except GraphError as exc:
            raise _graph_violation(prefix, exc) from None
        return Plan(
            tape=tape,
            pending_graph_id=gid,
            bindings=bound,
            output=output,
            selection=selection,
            rows=rows,
            batched=batched,
            gradients=not request.skip_gradients,
            binary=request.binary_output,
        )

    # -- evaluation --------------------------------------------------------

    def forward(self, plan: Plan) -> np.ndarray:
        """Every node's value: ``(n,)``, or ``(n, B)`` for a batch (the kernel's layout)."""
        values = plan.tape.leaf_values(plan.bindings)
        self.kernel.forward(plan.tape, values)
        return values

    def backward(self, plan: Plan, values: np.ndarray) -> np.ndarray:
        """d(output)/d(node) for every node, laid out like ``values``."""
        grads = np.zeros_like(values)
        self.kernel.backward(plan.tape, values, grads, plan.output)
        return grads

    @staticmethod
    def reported(plan: Plan, columns: np.ndarray) -> np.ndarray:
        """The selected nodes of kernel-layout ``columns``, row-major ``(rows, width)``."""
        table = columns if columns.ndim == 2 else columns[:, None]
        picked = table if plan.selection is None else table[plan.selection]
        return np.ascontiguousarray(picked.T)

    def header(self, plan: Plan) -> pb.EvaluateResponse:
        """An ``EvaluateResponse`` with everything but the numbers."""
        resp = pb.EvaluateResponse(
            output=plan.output, rows=plan.rows, node_count=len(plan.tape), graph_id=plan.graph_id
        )
        names = plan.tape.names
        if plan.selection is None:
            if names:
                resp.names.update(names)
            return resp
        selection = plan.selection
        resp.nodes.extend(selection.tolist())
        if names:
            position = np.full(len(plan.tape), -1, dtype=np.int64)
            order = np.arange(selection.shape[0] - 1, -1, -1)
            position[selection[::-1]] = order  # first occurrence wins
            labels = list(names)
            where = position[np.fromiter(names.values(), dtype=np.int64, count=len(labels))]
            resp.names.update(
                (labels[j], int(where[j])) for j in np.flatnonzero(where >= 0).tolist()
            )
        return resp

    def evaluate(
        self, request: pb.EvaluateRequest, deadline: Deadline = _NO_DEADLINE
    ) -> pb.EvaluateResponse:
        """The Evaluate rpc as a message (parsed from ``evaluate_wire``, which is cheap)."""
        return pb.EvaluateResponse.FromString(self.evaluate_wire(request, deadline).data)

    def evaluate_wire(
        self, request: pb.EvaluateRequest, deadline: Deadline = _NO_DEADLINE
    ) -> Wire:
        """The Evaluate rpc, serialized: values and gradients of the selected nodes."""
        plan = self.plan(request)
        numbers = plan.rows * plan.width * (2 if plan.gradients else 1)
        if 8 * numbers + 4 * plan.width > self.settings.max_message_bytes:
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"the response would hold {numbers} numbers, more than one message of "
                f"{self.settings.max_message_bytes} bytes (max_message_bytes) can carry; "
                "use EvaluateStream, or report fewer nodes with a selection",
            )
        deadline.check()
        values = self.forward(plan)
        deadline.check()
        arrays = [("values_f64" if plan.binary else "values", self.reported(plan, values))]
        if plan.gradients:
            grads = self.backward(plan, values)
            arrays.append(("grads_f64" if plan.binary else "grads", self.reported(plan, grads)))
        deadline.check()
        return with_arrays(self.header(plan), arrays, nodes=len(plan.tape) * plan.rows)

    def chunk_size(self, requested: int) -> int:
        """Numbers per stream chunk: the request's or the server default, capped so that a
        chunk stays within ``max_chunk_size`` and one message of ``max_message_bytes``."""
        s = self.settings
        size = s.default_chunk_size if requested <= 0 else min(requested, s.max_chunk_size)
        return max(1, min(size, (s.max_message_bytes - 64) // 8))

    def evaluate_stream(
        self, request: pb.EvaluateStreamRequest, deadline: Deadline = _NO_DEADLINE
    ) -> Iterator[pb.EvaluateStreamResponse]:
        """The EvaluateStream rpc as messages (parsed from ``evaluate_stream_wire``)."""
        for wire in self.evaluate_stream_wire(request, deadline):
            yield pb.EvaluateStreamResponse.FromString(wire.data)

    def evaluate_stream_wire(
        self, request: pb.EvaluateStreamRequest, deadline: Deadline = _NO_DEADLINE
    ) -> Iterator[Wire]:
        """The EvaluateStream rpc, serialized: the header and value chunks after the forward
        sweep, then the gradient chunks after the reverse sweep.

        The first ``next()`` validates and runs the forward sweep; each later
        ``next()`` yields one chunk, so a transport can check for cancellation
        between them. For big graphs the reverse sweep runs on a background
        thread while the value chunks go out.
        """
        plan = self.plan(request.request, "request.")
        size = self.chunk_size(request.chunk_size)
        deadline.check()
        values = self.forward(plan)  # while a big graph's id is hashed on another thread
        deadline.check()
        header = pb.EvaluateStreamResponse(part=pb.PART_HEADER, header=self.header(plan))
        yield with_arrays(header, (), nodes=len(plan.tape) * plan.rows)
        deadline.check()
        overlap = plan.gradients and len(plan.tape) * plan.rows >= _OVERLAP_CELLS
        reverse = self._background.submit(self.backward, plan, values) if overlap else None
        yield from self._chunks(plan, pb.PART_VALUES, self.reported(plan, values), size, deadline)
        if not plan.gradients:
            return
        grads = reverse.result() if reverse is not None else self.backward(plan, values)
        deadline.check()
        yield from self._chunks(plan, pb.PART_GRADIENTS, self.reported(plan, grads), size, deadline)

    @staticmethod
    def _chunks(
        plan: Plan, part: int, table: np.ndarray, size: int, deadline: Deadline
    ) -> Iterator[Wire]:
        """Cut a row-major array into stream messages of at most ``size`` numbers."""
        flat = table.reshape(-1)
        field = "data_f64" if plan.binary else "data"
        for offset in range(0, flat.shape[0], size):
            head = pb.EvaluateStreamResponse(part=part, offset=offset)
            yield with_arrays(head, [(field, flat[offset : offset + size])])
            deadline.check()

    # -- registration ------------------------------------------------------

    def register(self, tape: Tape, gid: GraphId | None = None) -> str:
        """Put ``tape`` in the cache and return its id; RESOURCE_EXHAUSTED if it cannot fit."""
        gid = codec.graph_id(tape) if gid is None else _resolved(gid)
        if not self.cache.put(gid, tape):
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"a graph of {len(tape)} nodes does not fit in this server's graph cache "
                f"(graph_cache_bytes {self.settings.graph_cache_bytes}, "
                f"graph_cache_entries {self.settings.graph_cache_entries}); send it with each call",
            )
        return gid

    def register_graph(
        self, request: pb.RegisterGraphRequest, deadline: Deadline = _NO_DEADLINE
    ) -> pb.RegisterGraphResponse:
        """The RegisterGraph rpc: decode, validate, cache; the same graph gives the same id."""
        tape, gid = self.decode_graph(request)
        deadline.check()
        return pb.RegisterGraphResponse(graph_id=self.register(tape, gid), node_count=len(tape))

    def upload(self) -> Upload:
        """Start an UploadGraph call: feed pieces to ``Upload.add``, then ``Upload.finish``."""
        return Upload(self)

    # -- description -------------------------------------------------------

    def server_info(
        self, request: pb.GetServerInfoRequest | None = None
    ) -> pb.GetServerInfoResponse:
        """The GetServerInfo rpc: version, the op table, limits, kernel and workers."""
        s = self.settings
        return pb.GetServerInfoResponse(
            version=__version__,
            ops=[
                pb.OpInfo(
                    op=op.code, name=op.name, arity=op.arity, uses_value=op.uses_value, doc=op.doc
                )
                for op in _ops.OPS
            ],
            limits=pb.Limits(
                max_nodes=s.max_nodes,
                max_message_bytes=s.max_message_bytes,
                max_batch_rows=s.max_batch_rows,
                max_batch_cells=s.max_batch_cells,
                max_concurrent_calls=s.max_concurrent_calls,
                graph_cache_entries=s.graph_cache_entries,
                graph_cache_bytes=s.graph_cache_bytes,
                max_chunk_size=s.max_chunk_size,
            ),
            kernel=self.kernel.name,
            workers=s.workers,
        )


class Upload:
    """One UploadGraph call: columns appended piece by piece within the limits, then registered."""

    def __init__(self, service: GradientService) -> None:
        """An empty upload into ``service``'s cache."""
        self.service = service
        self.ops = bytearray()
        self.args = bytearray()
        self.values = bytearray()
        self.names: list[graph_pb2.NodeName] = []

    def add(self, request: pb.UploadGraphRequest) -> None:
        """Append one piece; RESOURCE_EXHAUSTED as soon as the graph outgrows ``max_nodes``."""
        piece = request.piece
        self.ops += piece.ops
        self.args += piece.args
        self.values += piece.values
        self.names.extend(piece.names)
        limit = self.service.settings.max_nodes
        if (
            len(self.ops) > limit
            or len(self.args) > 8 * limit
            or len(self.values) > 8 * limit
            or len(self.names) > limit
        ):
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"the uploaded graph exceeds {limit} nodes (max_nodes)",
            )

    def finish(self) -> pb.UploadGraphResponse:
        """Decode, validate and register the concatenated graph."""
        packed = graph_pb2.PackedGraph(
            ops=bytes(self.ops), args=bytes(self.args), values=bytes(self.values), names=self.names
        )
        self.ops = self.args = self.values = bytearray()
        try:
            tape = codec.unpack(packed, self.service.settings.max_nodes)
        except GraphError as exc:
            raise _graph_violation("piece.", exc) from None
        return pb.UploadGraphResponse(graph_id=self.service.register(tape), node_count=len(tape))
