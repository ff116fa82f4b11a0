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
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import Message
from micrograd import __version__, codec
from micrograd import ops as _ops
from micrograd.codec.malformed import clip, shown
from micrograd.codec.wire import Wire, after_header, with_arrays, with_fields
from micrograd.errors import GraphError
from micrograd.kernels import Kernel
from micrograd.tape import Tape
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import graph_pb2

from .cache import GraphCache, RecentGraphs
from .config import Settings, resolve_kernel
from .store import GraphStore, StoreUnavailable, open_store

try:
    from micrograd.native import SweepStopped
except ImportError:  # pragma: no cover - without the native kernel, sweeps run to the end

    class SweepStopped(Exception):  # type: ignore[no-redef]
        """Never raised: no kernel here can stop part-way."""


__all__ = [
    "Answer",
    "Code",
    "Deadline",
    "GradientService",
    "Plan",
    "ServiceError",
    "Upload",
    "nodes_evaluated",
]

log = logging.getLogger("micrograd.server")

_STORE_WARNING_INTERVAL = 10.0
"""Seconds between two log lines about a failing graph store (each failure is still counted)."""


class Code(enum.Enum):
    """Outcome of a failed call; the names are the gRPC status codes they map to."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"


_MESSAGE_LIMIT = 1000
"""Characters an error message may have (beyond: cut with an ellipsis); echoed client input
within it is already cut to ``codec.malformed.ECHO_LIMIT``."""


class ServiceError(Exception):
    """A call that cannot be answered: a ``Code``, a message, and ``(field, description)`` pairs."""

    def __init__(
        self, code: Code, message: str, violations: Sequence[tuple[str, str]] = ()
    ) -> None:
        """``violations`` name request fields (``graph.nodes[3].op``) and what is wrong there."""
        message = clip(message, _MESSAGE_LIMIT)
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = [(clip(f), clip(text, _MESSAGE_LIMIT)) for f, text in violations]


class Deadline:
    """When a call must stop: an optional time limit and a cancel flag, checked between phases
    and, by a kernel that can (the native one), every few thousand cells within a sweep.

    Thread-safe: a transport cancels from its own thread while the work runs
    on another, and the work calls ``check()`` between decode, the sweeps and
    encoding; ``flag`` is the byte the native sweeps watch.
    """

    __slots__ = ("_cancelled", "expires", "flag")

    def __init__(self, seconds: float | None = None) -> None:
        """A deadline ``seconds`` from now (``None``: no time limit)."""
        self.expires = None if seconds is None else time.monotonic() + seconds
        self._cancelled = False  # one store of a bool: safe to set from any thread
        self.flag = bytearray(1)
        """Set to 1 by ``cancel()``; a sweep given it stops at its next look (a one-byte
        buffer: cheaper to make per call than an array)."""

    def cancel(self) -> None:
        """Mark the call cancelled; the next ``check()`` raises and running sweeps stop."""
        self._cancelled = True
        self.flag[0] = 1

    @property
    def cancelled(self) -> bool:
        """Whether ``cancel()`` was called."""
        return self._cancelled

    def check(self) -> None:
        """Raise ``ServiceError`` (CANCELLED or DEADLINE_EXCEEDED) if the call must stop."""
        if self._cancelled:
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

_HEADER_CACHE_ENTRIES = 512
"""Serialized response headers kept for repeated small calls (the cache empties when full)."""
_HEADER_CACHE_WIDTH = 1024
"""Selections wider than this are not worth a header cache entry."""
_RESPONSE = pb.EvaluateResponse.DESCRIPTOR

_STOP_CELLS = 16_384
"""Cells between two looks of the native sweeps at their stop flag and clock: a smaller sweep
is never stopped part-way, so it is not given them (the phase checks still apply)."""

_THREAD_CELLS = 1_000_000
"""From this many node-bindings on, a tiled batch spreads over ``kernel_threads`` threads
(below it, starting threads costs more than it saves)."""

@dataclass(frozen=True, slots=True)
class Answer(Wire):
    """A serialized response and the node evaluations it reports (what the metrics count)."""

    nodes: int = 0


Arrays = Sequence[tuple[str, np.ndarray]]
"""A response's number arrays by field name, row-major."""

Part = tuple[Message, Arrays, int]
"""One response message in the making: its header, its arrays by field, its node evaluations."""

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


def _name_pair(name: graph_pb2.NodeName) -> tuple[int, str]:
    return name.node, name.name


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

    def __init__(
        self,
        settings: Settings,
        kernel: Kernel | None = None,
        store: GraphStore | None = None,
    ) -> None:
        """Serve with ``settings``; ``kernel`` overrides the one ``settings.kernel`` names and
        ``store`` the graph store ``settings.graph_store`` names."""
        self.settings = settings
        self.kernel = kernel or resolve_kernel(settings.kernel, settings.flush_denormals)
        self.cache = GraphCache(settings.graph_cache_entries, settings.graph_cache_bytes)
        self.store = store or open_store(settings)
        self._store_warned = -_STORE_WARNING_INTERVAL
        self.recent = RecentGraphs()
        self._background = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="micrograd-overlap"
        )
        self._stoppable = bool(getattr(self.kernel, "stoppable", False))
        self._lock = threading.Lock()
        self._headers: dict[tuple[object, ...], bytes] = {}
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

    def register_cells(self, request: pb.RegisterGraphRequest) -> int:
        """Work estimate of a RegisterGraph call: the nodes it carries, or more than
        ``inline_cells`` when the graph store is across the network (so that a slow store
        never holds up the event loop)."""
        n = len(request.graph.nodes) + len(request.packed_graph.ops)
        if self.store is not None and self.store.remote:
            return max(n, self.settings.inline_cells + 1)
        return n

    def cells(self, request: pb.EvaluateRequest) -> int:
        """Cheap upper estimate of the node-bindings a request evaluates, before decoding it."""
        source = request.WhichOneof("source")
        if source == "graph":
            n = len(request.graph.nodes)
        elif source == "packed_graph":
            n = len(request.packed_graph.ops)
        elif source == "graph_id":
            tape = self.cache.peek(request.graph_id)
            if tape is not None:
                n = len(tape)
            elif self.store is None:
                n = 0
            else:  # a size the store cannot tell cheaply counts as big: looked up off the loop
                hint = self.store.nodes_hint(request.graph_id)
                n = self.settings.inline_cells + 1 if hint is None else hint
        else:
            n = 0
        if not request.HasField("batch"):
            return n
        batch = request.batch
        return n * max(1, codec.batch_rows(batch, max(1, len(batch.columns))))

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
            return self.lookup(msg.graph_id), msg.graph_id
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
        # The node count is checked once, above; the decoders get no second limit.
        data = msg.graph.SerializeToString() if source == "graph" else b""  # the decoder's input
        key: Hashable | None = None
        if n <= self.recent.max_nodes:
            packed = msg.packed_graph  # keyed by what is at hand: nothing serialized for it
            key = data or (packed.ops, packed.args, packed.values, *map(_name_pair, packed.names))
            known = self.recent.get(key)
            if known is not None:
                return known
        max_name = self.settings.max_name_bytes
        try:
            if source == "graph":
                tape = codec.from_graph_bytes(data, None, max_name)
            else:
                tape = codec.unpack(msg.packed_graph, None, max_name)
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
            rows = codec.batch_rows(batch, len(batch.columns) or int(tape.inputs.shape[0]))
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

    def forward(self, plan: Plan, deadline: Deadline = _NO_DEADLINE) -> np.ndarray:
        """Every node's value: ``(n,)``, or ``(n, B)`` for a batch (the kernel's layout)."""
        values = plan.tape.leaf_values(plan.bindings)
        self._sweep(deadline, self.kernel.forward, plan.tape, values)
        return values

    def backward(
        self, plan: Plan, values: np.ndarray, deadline: Deadline = _NO_DEADLINE
    ) -> np.ndarray:
        """d(output)/d(node) for every node, laid out like ``values``."""
        grads = np.zeros_like(values)
        self._sweep(deadline, self.kernel.backward, plan.tape, values, grads, plan.output)
        return grads

    def _sweep(
        self,
        deadline: Deadline,
        sweep: Callable[..., None],
        tape: Tape,
        values: np.ndarray,
        *args: object,
    ) -> None:
        """Run a kernel sweep that, if the kernel can, stops within a few thousand cells of the
        deadline passing or the call being cancelled (``ServiceError`` then)."""
        if deadline is _NO_DEADLINE or not self._stoppable or values.size < _STOP_CELLS:
            sweep(tape, values, *args)
            return
        try:
            sweep(tape, values, *args, stop=deadline.flag, expires=deadline.expires)
        except SweepStopped:
            deadline.check()
            raise ServiceError(Code.CANCELLED, "the call was cancelled") from None

    def selected(
        self, plan: Plan, deadline: Deadline = _NO_DEADLINE
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """For a batch with a selection: the reported ``(rows, width)`` values and gradients,
        swept tile by tile without the full ``(n, B)`` arrays; ``None`` for any other call.

        Calls of at least ``_THREAD_CELLS`` node-bindings spread their tiles over
        ``kernel_threads`` threads.
        """
        if not plan.batched or plan.selection is None or plan.bindings is None:
            return None
        if plan.bindings.ndim != 2 or not hasattr(self.kernel, "evaluate_selected"):
            return None
        cells = len(plan.tape) * plan.rows
        threads = self.settings.kernel_threads if cells >= _THREAD_CELLS else 1
        if deadline is _NO_DEADLINE or not self._stoppable:
            return plan.tape.evaluate_selected(
                plan.bindings, plan.selection, plan.output, plan.gradients, self.kernel, threads
            )
        try:  # the plan is validated: straight to the kernel, which stops when told
            picked: tuple[np.ndarray, np.ndarray | None] = self.kernel.evaluate_selected(  # type: ignore[attr-defined]
                plan.tape,
                plan.tape.inputs,
                plan.bindings,
                plan.output,
                plan.selection,
                plan.gradients,
                threads,
                stop=deadline.flag,
                expires=deadline.expires,
            )
        except SweepStopped:
            deadline.check()
            raise ServiceError(Code.CANCELLED, "the call was cancelled") from None
        return picked

    @staticmethod
    def reported(plan: Plan, columns: np.ndarray) -> np.ndarray:
        """The selected nodes of kernel-layout ``columns``, row-major ``(rows, width)`` (one
        binding of every node: ``columns`` itself, as its one row)."""
        if columns.ndim == 1 and plan.selection is None:
            return columns
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

    def header_bytes(self, plan: Plan) -> bytes:
        """``header(plan)`` serialized; for small graphs kept per graph id, output, rows and
        selection, so that repeated small calls skip building it (the numbers come after)."""
        n = len(plan.tape)
        width = 0 if plan.selection is None else int(plan.selection.shape[0])
        if n >= _OVERLAP_CELLS or width > _HEADER_CACHE_WIDTH:
            return self.header(plan).SerializeToString()
        picked = b"" if plan.selection is None else plan.selection.tobytes()
        key = (plan.graph_id, plan.output, plan.rows, plan.selection is None, picked)
        cached = self._headers.get(key)
        if cached is None:
            cached = self.header(plan).SerializeToString()
            if len(self._headers) >= _HEADER_CACHE_ENTRIES:
                self._headers.clear()
            self._headers[key] = cached
        return cached

    def evaluate(
        self, request: pb.EvaluateRequest, deadline: Deadline = _NO_DEADLINE
    ) -> pb.EvaluateResponse:
        """The Evaluate rpc as a message (for JSON): the same numbers as ``evaluate_wire``."""
        plan, arrays, _ = self._evaluated(request, deadline)
        return with_fields(self.header(plan), arrays)

    def evaluate_wire(
        self, request: pb.EvaluateRequest, deadline: Deadline = _NO_DEADLINE
    ) -> Answer:
        """The Evaluate rpc, serialized: values and gradients of the selected nodes."""
        plan, arrays, nodes = self._evaluated(request, deadline)
        return Answer(after_header(self.header_bytes(plan), _RESPONSE, arrays).data, nodes)

    def _evaluated(
        self, request: pb.EvaluateRequest, deadline: Deadline
    ) -> tuple[Plan, Arrays, int]:
        """The Evaluate rpc as its plan (the header), its arrays by field, and the node
        evaluations."""
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
        picked = self.selected(plan, deadline)
        if picked is not None:
            arrays = [("values_f64" if plan.binary else "values", picked[0])]
            if picked[1] is not None:
                arrays.append(("grads_f64" if plan.binary else "grads", picked[1]))
            deadline.check()
            return plan, arrays, len(plan.tape) * plan.rows
        values = self.forward(plan, deadline)
        deadline.check()
        arrays = [("values_f64" if plan.binary else "values", self.reported(plan, values))]
        if plan.gradients:
            grads = self.backward(plan, values, deadline)
            arrays.append(("grads_f64" if plan.binary else "grads", self.reported(plan, grads)))
        deadline.check()
        return plan, arrays, len(plan.tape) * plan.rows

    # -- several outputs, second order ---------------------------------------

    def _check_cells(self, cells: int, what: str) -> None:
        """RESOURCE_EXHAUSTED when a call would sweep more than ``max_batch_cells`` cells."""
        if cells > self.settings.max_batch_cells:
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"{what}: {cells} node-bindings; this server evaluates at most "
                f"{self.settings.max_batch_cells} per call (max_batch_cells)",
            )

    def jacobian(
        self, request: pb.JacobianRequest, deadline: Deadline = _NO_DEADLINE
    ) -> pb.JacobianResponse:
        """The Jacobian rpc: rows ``outputs``, columns the selected nodes (default the inputs),
        from one reverse sweep over ``len(outputs)`` seed columns per binding (batched), or
        one sweep seeded with every cotangent weight."""
        inner = request.request
        plan = self.plan(inner, "request.")
        tape, n = plan.tape, len(plan.tape)
        outs = np.array(request.outputs, dtype=np.int64)
        if outs.shape[0] == 0:
            raise ServiceError(
                Code.INVALID_ARGUMENT,
                "outputs: name at least one node to differentiate",
                [("outputs", "at least one output is required")],
            )
        bad = np.flatnonzero(outs >= n)
        if bad.size:
            j = int(bad[0])
            reason = f"node {int(outs[j])} is out of range: the graph has {n} nodes"
            raise ServiceError(Code.INVALID_ARGUMENT, f"outputs[{j}]: {reason}",
                               [(f"outputs[{j}]", reason)])  # fmt: skip
        weighted = len(request.cotangents) > 0
        if weighted and len(request.cotangents) != outs.shape[0]:
            reason = (
                f"{len(request.cotangents)} cotangents for {outs.shape[0]} outputs; give one "
                "weight per output"
            )
            raise ServiceError(Code.INVALID_ARGUMENT, f"cotangents: {reason}",
                               [("cotangents", reason)])  # fmt: skip
        if inner.selection == pb.SELECTION_UNSPECIFIED:
            columns = tape.inputs
        else:
            columns = np.arange(n) if plan.selection is None else plan.selection
        m, rows = int(outs.shape[0]), plan.rows
        sweeps = 1 if weighted else m
        self._check_cells(n * rows * sweeps, "outputs")
        numbers = rows * (m + sweeps * int(columns.shape[0]))
        if 8 * numbers > self.settings.max_message_bytes:
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"the response would hold {numbers} numbers, more than one message of "
                f"{self.settings.max_message_bytes} bytes (max_message_bytes) can carry",
            )
        values = self.forward(plan, deadline)
        table = values if values.ndim == 2 else values[:, None]  # (n, rows)
        top = int(outs.max())
        deadline.check()
        if weighted:
            seeds = np.zeros((n, rows))
            np.add.at(seeds, outs, np.array(request.cotangents, dtype=np.float64)[:, None])
            self._sweep(deadline, self.kernel.vjp, tape, np.ascontiguousarray(table), seeds, top)
            jac = seeds[columns].T  # (rows, s)
        else:
            wide = np.repeat(table, m, axis=1)  # column b*m + j: binding b, output j
            seeds = np.zeros((n, rows * m))
            for j, o in enumerate(outs.tolist()):
                seeds[o, j::m] = 1.0
            self._sweep(deadline, self.kernel.vjp, tape, wide, seeds, top)
            jac = seeds[columns].reshape(-1, rows, m).transpose(1, 2, 0)  # (rows, m, s)
        deadline.check()
        resp = pb.JacobianResponse(
            outputs=outs.tolist(),
            nodes=columns.tolist(),
            rows=rows,
            node_count=n,
            graph_id=plan.graph_id,
            weighted=weighted,
        )
        out_values = np.ascontiguousarray(table[outs].T)
        jac = np.ascontiguousarray(jac)
        if plan.binary:
            resp.values_f64 = codec.f64_bytes(out_values)
            resp.jacobian_f64 = codec.f64_bytes(jac)
        else:
            resp.values.extend(out_values.ravel().tolist())
            resp.jacobian.extend(jac.ravel().tolist())
        return resp

    def hvp(
        self, request: pb.HessianVectorProductRequest, deadline: Deadline = _NO_DEADLINE
    ) -> pb.HessianVectorProductResponse:
        """The HessianVectorProduct rpc: forward-over-reverse in one kernel call, at one binding
        or a batch, with respect to the OP_INPUT nodes."""
        plan = self.plan(request.request, "request.")
        tape, n, rows = plan.tape, len(plan.tape), plan.rows
        k = int(tape.inputs.shape[0])
        vector = np.array(request.vector, dtype=np.float64)
        if vector.shape[0] == k:
            per_row = np.broadcast_to(vector, (rows, k))
        elif vector.shape[0] == rows * k and rows > 1:
            per_row = vector.reshape(rows, k)
        else:
            reason = (
                f"vector has {vector.shape[0]} entries; give one per input ({k}) or "
                f"rows x inputs ({rows} x {k})"
            )
            raise ServiceError(Code.INVALID_ARGUMENT, f"vector: {reason}", [("vector", reason)])
        self._check_cells(4 * n * rows, "request")
        values = tape.leaf_values(plan.bindings)
        tangents = np.zeros_like(values)
        if values.ndim == 1:
            tangents[tape.inputs] = per_row[0]
        else:
            tangents[tape.inputs] = per_row.T
        grads, grad_tangents = np.zeros_like(values), np.zeros_like(values)
        deadline.check()
        hvp = getattr(self.kernel, "hvp", None)
        if hvp is None:
            raise ServiceError(
                Code.INVALID_ARGUMENT, f"the {self.kernel.name} kernel has no HVP sweep"
            )
        hvp(tape, values, tangents, grads, grad_tangents, plan.output)
        deadline.check()

        def by_row(a: np.ndarray, picked: np.ndarray | int) -> np.ndarray:
            table = a if a.ndim == 2 else a[:, None]
            return np.ascontiguousarray(table[picked].T)

        resp = pb.HessianVectorProductResponse(
            nodes=tape.inputs.tolist(),
            output=plan.output,
            rows=rows,
            node_count=n,
            graph_id=plan.graph_id,
        )
        arrays = {
            "values": by_row(values, plan.output),
            "grads": by_row(grads, tape.inputs),
            "hvp": by_row(grad_tangents, tape.inputs),
        }
        for name, array in arrays.items():
            if plan.binary:
                setattr(resp, f"{name}_f64", codec.f64_bytes(array))
            else:
                getattr(resp, name).extend(array.ravel().tolist())
        return resp

    def chunk_size(self, requested: int) -> int:
        """Numbers per stream chunk: the request's or the server default, capped so that a
        chunk stays within ``max_chunk_size`` and one message of ``max_message_bytes``."""
        s = self.settings
        size = s.default_chunk_size if requested <= 0 else min(requested, s.max_chunk_size)
        return max(1, min(size, (s.max_message_bytes - 64) // 8))

    def evaluate_stream(
        self, request: pb.EvaluateStreamRequest, deadline: Deadline = _NO_DEADLINE
    ) -> Iterator[pb.EvaluateStreamResponse]:
        """The EvaluateStream rpc as messages (for JSON): the parts of ``evaluate_stream_wire``."""
        for head, arrays, _ in self._stream_parts(request, deadline):
            yield with_fields(head, arrays)

    def evaluate_stream_wire(
        self, request: pb.EvaluateStreamRequest, deadline: Deadline = _NO_DEADLINE
    ) -> Iterator[Answer]:
        """The EvaluateStream rpc, serialized: the header and value chunks after the forward
        sweep, then the gradient chunks after the reverse sweep (see ``_stream_parts``)."""
        for head, arrays, nodes in self._stream_parts(request, deadline):
            yield Answer(with_arrays(head, arrays).data, nodes)

    def _stream_parts(
        self, request: pb.EvaluateStreamRequest, deadline: Deadline
    ) -> Iterator[Part]:
        """The EvaluateStream rpc's messages, each as its head, arrays and node evaluations.

        The first ``next()`` validates and runs the forward sweep; each later
        ``next()`` yields one chunk, so a transport can check for cancellation
        between them. For big graphs the reverse sweep runs on a background
        thread while the value chunks go out.
        """
        plan = self.plan(request.request, "request.")
        size = self.chunk_size(request.chunk_size)
        deadline.check()
        picked = self.selected(plan, deadline)
        if picked is not None:
            header = pb.EvaluateStreamResponse(part=pb.PART_HEADER, header=self.header(plan))
            yield header, (), len(plan.tape) * plan.rows
            deadline.check()
            yield from self._chunks(plan, pb.PART_VALUES, picked[0], size, deadline)
            if picked[1] is not None:
                yield from self._chunks(plan, pb.PART_GRADIENTS, picked[1], size, deadline)
            return
        values = self.forward(plan, deadline)  # while a big graph's id is hashed elsewhere
        deadline.check()
        overlap = plan.gradients and len(plan.tape) * plan.rows >= _OVERLAP_CELLS
        reverse = None
        if overlap:  # started before the header, which may still wait for the graph's id
            reverse = self._background.submit(self.backward, plan, values, deadline)
        header = pb.EvaluateStreamResponse(part=pb.PART_HEADER, header=self.header(plan))
        yield header, (), len(plan.tape) * plan.rows
        deadline.check()
        yield from self._chunks(plan, pb.PART_VALUES, self.reported(plan, values), size, deadline)
        if not plan.gradients:
            return
        grads = reverse.result() if reverse is not None else self.backward(plan, values, deadline)
        deadline.check()
        yield from self._chunks(plan, pb.PART_GRADIENTS, self.reported(plan, grads), size, deadline)

    @staticmethod
    def _chunks(
        plan: Plan, part: int, table: np.ndarray, size: int, deadline: Deadline
    ) -> Iterator[Part]:
        """Cut a row-major array into stream messages of at most ``size`` numbers."""
        flat = table.reshape(-1)
        field = "data_f64" if plan.binary else "data"
        for offset in range(0, flat.shape[0], size):
            head = pb.EvaluateStreamResponse(part=part, offset=offset)
            yield head, [(field, flat[offset : offset + size])], 0
            deadline.check()

    # -- registration ------------------------------------------------------

    def lookup(self, graph_id: str) -> Tape:
        """The registered graph ``graph_id``: from this process's cache, else from the graph
        store (then cached); NOT_FOUND if neither has it or the store cannot be reached."""
        tape = self.cache.get(graph_id)
        if tape is not None:
            return tape
        why = "the cache may have dropped it"
        if self.store is not None:
            try:
                tape = self.store.get(graph_id)
            except StoreUnavailable as exc:
                self._store_failed(exc)
                why = f"{exc}, so only this process's cache was searched"
            else:
                if tape is not None:
                    self.cache.put(graph_id, tape)
                    return tape
                why = "neither this process's cache nor the graph store has it"
        raise ServiceError(
            Code.NOT_FOUND,
            f"no graph {shown(graph_id)} is registered here ({why}); send the graph again or "
            "register it",
        )

    def _store_failed(self, exc: StoreUnavailable) -> None:
        """Log a store failure, at most once per ``_STORE_WARNING_INTERVAL`` (counted always)."""
        now = time.monotonic()
        if now - self._store_warned >= _STORE_WARNING_INTERVAL:
            self._store_warned = now
            log.warning("%s; graphs are served from this process's cache only meanwhile", exc)

    def register(self, tape: Tape, gid: GraphId | None = None) -> str:
        """Put ``tape`` in the cache and the graph store and return its id; RESOURCE_EXHAUSTED
        if it fits in neither."""
        gid = codec.graph_id(tape) if gid is None else _resolved(gid)
        cached = self.cache.put(gid, tape)
        shared = False
        if self.store is not None:
            try:
                shared = self.store.put(gid, tape)
            except StoreUnavailable as exc:
                self._store_failed(exc)
        if not (cached or shared):
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
            settings = self.service.settings
            tape = codec.unpack(packed, None, settings.max_name_bytes)  # add() held max_nodes
        except GraphError as exc:
            raise _graph_violation("piece.", exc) from None
        return pb.UploadGraphResponse(graph_id=self.service.register(tape), node_count=len(tape))


def nodes_evaluated(response: Any) -> int:
    """Node evaluations (nodes x rows) reported by an Evaluate response or stream header,
    given as a message or as a serialized ``Answer`` (which carries the count)."""
    if isinstance(response, Answer):
        return response.nodes
    if isinstance(response, pb.EvaluateStreamResponse):
        if response.part != pb.PART_HEADER:
            return 0
        response = response.header
    if isinstance(response, pb.EvaluateResponse):
        return int(response.node_count) * max(int(response.rows), 1)
    return 0
