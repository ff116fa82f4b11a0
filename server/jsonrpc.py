"""JSON-RPC 2.0 over the service core: parsing, dispatch, batches, notifications, errors.

Nothing here knows HTTP: ``JsonRpc.handle`` takes a request body and returns
the response body (or ``None`` when nothing is to be sent back), so tests run
it without a network and ``server/http.py`` only adds the transport.

Methods are the gRPC rpcs by name. ``params`` is the rpc's request message
and ``result`` its response message, both in the proto3 JSON mapping
(camelCase names, int64 as strings, non-finite doubles as ``"NaN"``,
``"Infinity"``, ``"-Infinity"``); ``EvaluateStream`` returns the stream's
messages as one array. A ``ServiceError`` becomes a JSON-RPC error through
the fixed table ``ERROR_CODES``; ``error.data`` carries the gRPC code name
and the field violations.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from micrograd.codec.malformed import clip, shown
from micrograd.v1 import gradient_service_pb2 as pb

from .calls import CallRunner
from .metrics import Metrics
from .proto_json import nesting_depth, type_problem
from .service import Deadline, GradientService, ServiceError, nodes_evaluated

__all__ = [
    "ERROR_CODES",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "JsonRpc",
    "RpcError",
    "error_code",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000
"""Server errors are ``SERVER_ERROR - <gRPC status number>`` (NOT_FOUND = 5 -> -32005)."""

_SPECIAL = {
    "INVALID_ARGUMENT": INVALID_PARAMS,
    "UNIMPLEMENTED": METHOD_NOT_FOUND,
    "INTERNAL": INTERNAL_ERROR,
}


def error_code(status: str) -> int:
    """The JSON-RPC ``error.code`` of a gRPC status code name.

    INVALID_ARGUMENT is -32602 (invalid params), UNIMPLEMENTED -32601 and
    INTERNAL -32603; every other status is ``-32000 - <its number>``, inside
    the range JSON-RPC reserves for server errors.
    """
    special = _SPECIAL.get(status)
    if special is not None:
        return special
    return SERVER_ERROR - int(grpc.StatusCode[status].value[0])


ERROR_CODES: dict[str, int] = {
    code.name: error_code(code.name) for code in grpc.StatusCode if code is not grpc.StatusCode.OK
}
"""gRPC status name -> JSON-RPC error code, for every status (the table in docs/API.md)."""

log = logging.getLogger("micrograd.server.jsonrpc")

T = TypeVar("T")

_BIG_BODY = 1 << 20
"""Bodies of at least this many bytes are parsed on the worker pool, not the event loop."""

_NO_ID = object()
"""Marks a request without an ``id`` member: a notification."""
_PARSE_PATH = re.compile(r" at (?:\"?[A-Za-z0-9_]+)\.?([A-Za-z0-9_.\[\]]*)")


class RpcError(Exception):
    """A JSON-RPC error object: ``code``, ``message`` and optional ``data``."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        """An error to send as ``{"code": code, "message": message, "data": data}``."""
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    @classmethod
    def from_status(
        cls, status: str, message: str, violations: Iterable[tuple[str, str]] = ()
    ) -> RpcError:
        """The error for a gRPC status, with ``data = {grpcCode, violations}``."""
        return cls(
            error_code(status),
            message,
            {
                "grpcCode": status,
                "violations": [
                    {"field": field, "description": text} for field, text in violations
                ],
            },
        )

    def as_json(self) -> dict[str, Any]:
        """The error object of a response."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    @classmethod
    def from_service_error(cls, error: ServiceError) -> RpcError:
        """The error for a ``ServiceError``: its status through ``ERROR_CODES``, its violations."""
        return cls.from_status(error.code.value, error.message, error.violations)

    @property
    def status(self) -> str:
        """The gRPC status name this error counts as in metrics and logs."""
        if self.data and "grpcCode" in self.data:
            return str(self.data["grpcCode"])
        return {METHOD_NOT_FOUND: "UNIMPLEMENTED", INTERNAL_ERROR: "INTERNAL"}.get(
            self.code, "INVALID_ARGUMENT"
        )


@dataclass(frozen=True)
class Method:
    """One JSON-RPC method: its request message type, the core call, and its size estimate."""

    request: type[Message]
    run: Callable[[Any, Deadline], Message | list[Message]]
    """Runs the call (on the event loop or a worker thread); may raise ``ServiceError``."""
    size: Callable[[Any], int]
    """Work estimate (node-bindings); above ``inline_cells`` the call runs on the pool."""


def _parse_params(method: Method, params: Any) -> Message:
    """The request message from ``params`` in the proto3 JSON mapping, its types held strictly
    (``proto_json.type_problem``); -32602 if it is not one."""
    message = method.request()
    if params is None:
        return message
    if not isinstance(params, dict):
        raise RpcError.from_status(
            "INVALID_ARGUMENT",
            "params must be an object: the request message in the proto3 JSON mapping",
            [("params", f"expected an object, got {type(params).__name__}")],
        )
    problem = type_problem(params, message.DESCRIPTOR)
    if problem is not None:
        field, reason = clip(problem[0]), clip(problem[1])
        raise RpcError.from_status(
            "INVALID_ARGUMENT",
            f"params is not a valid {message.DESCRIPTOR.name}: {field}: {reason}",
            [(field, reason)],
        )
    try:
        json_format.ParseDict(params, message, ignore_unknown_fields=False)
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
        text = clip(str(exc).strip().rstrip("."), 500)
        found = _PARSE_PATH.search(text)
        field = found.group(1) if found and found.group(1) else "params"
        raise RpcError.from_status(
            "INVALID_ARGUMENT",
            f"params is not a valid {message.DESCRIPTOR.name}: {text}",
            [(field, text)],
        ) from None
    return message


def _to_json(result: Message | list[Message]) -> Any:
    """A response message (or a list of them) in the proto3 JSON mapping, defaults included."""
    if isinstance(result, list):
        return [_to_json(m) for m in result]
    return json_format.MessageToDict(
        result, preserving_proto_field_name=False, always_print_fields_with_no_presence=True
    )


def _nodes(result: Message | list[Message]) -> int:
    """Node evaluations an answer reports (for the metrics)."""
    if isinstance(result, list):
        return sum(nodes_evaluated(m) for m in result)
    return nodes_evaluated(result)


def _answer(method: Method, message: Message, deadline: Deadline) -> tuple[bytes, int]:
    """Run the call and serialize its ``result``, in one step (so both can leave the loop)."""
    result = method.run(message, deadline)
    deadline.check()
    return _dumps(_to_json(result)), _nodes(result)


class TooDeep(ValueError):
    """A body whose arrays and objects nest deeper than the server parses."""


def _loads(body: bytes, max_depth: int = 64) -> Any:
    """The parsed body; ``TooDeep`` beyond ``max_depth`` levels, ``ValueError`` if not JSON."""
    depth = nesting_depth(body)
    if depth > max_depth:
        raise TooDeep(
            f"the body nests arrays and objects {depth} deep; this server parses at most "
            f"{max_depth} levels (jsonrpc_max_depth)"
        )
    return json.loads(body, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(
        f"{name} is not JSON; write non-finite numbers as the strings "
        '"NaN", "Infinity" and "-Infinity"'
    )


def _dumps(obj: Any) -> bytes:
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace")  # a lone surrogate stays a JSON escape


def _echoable(id_: Any) -> bool:
    """Whether ``id_`` (a string, a number or null) can be sent back exactly as it came."""
    if isinstance(id_, float):
        return math.isfinite(id_)
    if isinstance(id_, str):
        try:
            id_.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def _error(id_: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": error.as_json(), "id": id_}


class JsonRpc:
    """The JSON-RPC 2.0 endpoint of one ``GradientService``: bodies in, bodies out."""

    def __init__(
        self,
        service: GradientService,
        *,
        pool: concurrent.futures.Executor | None = None,
        metrics: Metrics | None = None,
        max_batch: int = 100,
        max_depth: int = 64,
    ) -> None:
        """Serve ``service``; big calls run on ``pool`` (inline when ``None``), batches of at
        most ``max_batch`` calls, bodies nested at most ``max_depth`` deep."""
        self.service = service
        self.max_depth = max_depth
        self.pool = pool
        self.calls = CallRunner(service, pool)
        self.metrics = metrics or Metrics()
        self.max_batch = max_batch
        s, size = service, self.calls.sizes
        self.methods: dict[str, Method] = {
            "Evaluate": Method(pb.EvaluateRequest, s.evaluate, size["Evaluate"]),
            "EvaluateStream": Method(
                pb.EvaluateStreamRequest,
                lambda r, d: list(s.evaluate_stream(r, d)),
                size["EvaluateStream"],
            ),
            "RegisterGraph": Method(
                pb.RegisterGraphRequest, lambda r, d: s.register_graph(r), size["RegisterGraph"]
            ),
            "GetServerInfo": Method(
                pb.GetServerInfoRequest, lambda r, d: s.server_info(r), size["GetServerInfo"]
            ),
            "Jacobian": Method(pb.JacobianRequest, s.jacobian, size["Jacobian"]),
            "HessianVectorProduct": Method(
                pb.HessianVectorProductRequest, s.hvp, size["HessianVectorProduct"]
            ),
        }

    # -- bodies ------------------------------------------------------------

    async def handle(
        self, body: bytes, request_id: str | None = None, timeout: float | None = None
    ) -> bytes | None:
        """Answer one HTTP body: a response, an array of responses, or ``None`` (send nothing).

        ``timeout`` (seconds) is the deadline of every call in the body.
        """
        big = len(body) >= _BIG_BODY
        try:
            document = await self._off(big, _loads, body, self.max_depth)
        except TooDeep as exc:
            return self._protocol_error(request_id, RpcError(PARSE_ERROR, f"parse error: {exc}"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return self._protocol_error(
                request_id,
                RpcError(PARSE_ERROR, f"parse error: the body is not JSON ({clip(str(exc))})"),
            )
        if isinstance(document, list):
            if not document:
                return self._protocol_error(
                    request_id, RpcError(INVALID_REQUEST, "invalid request: the batch is empty")
                )
            if len(document) > self.max_batch:
                return self._protocol_error(
                    request_id,
                    RpcError(
                        INVALID_REQUEST,
                        f"invalid request: the batch has {len(document)} requests; this server "
                        f"accepts at most {self.max_batch} per batch (jsonrpc_max_batch)",
                    ),
                )
            answers = []
            for item in document:
                answer = await self.request(item, request_id, timeout, big)
                if answer is not None:
                    answers.append(answer)
            return b"[" + b",".join(answers) + b"]" if answers else None
        return await self.request(document, request_id, timeout, big)

    async def _off(self, big: bool, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: on the pool when ``big`` (the loop keeps serving), else right here."""
        if not big or self.pool is None:
            return fn(*args)
        return await asyncio.wrap_future(self.pool.submit(fn, *args))

    def _protocol_error(self, request_id: str | None, error: RpcError) -> bytes:
        """A response for a body that holds no valid call, counted under method ``(invalid)``."""
        return _dumps(_error(None, self._record_protocol(request_id, error)))

    # -- one request object ------------------------------------------------

    async def request(
        self,
        item: Any,
        request_id: str | None = None,
        timeout: float | None = None,
        big: bool = False,
    ) -> bytes | None:
        """The serialized response to one request object; ``None`` for a notification.

        ``big`` says the body was large: its params are then parsed off the loop.
        """
        id_ = item.get("id", _NO_ID) if isinstance(item, dict) else None
        valid_id = id_ is _NO_ID or id_ is None or (
            isinstance(id_, str | int | float) and not isinstance(id_, bool)
        )
        echoable = valid_id and _echoable(id_)
        reply_id = id_ if echoable and id_ is not _NO_ID else None
        problem = self._shape_problem(item, valid_id, echoable)
        if problem is not None:
            return _dumps(_error(reply_id, self._record_protocol(request_id, problem)))
        name = item["method"]
        method = self.methods.get(name)
        label = name if method is not None else "(unknown)"
        with self.metrics.call("jsonrpc", label, request_id) as call:
            try:
                if method is None:
                    raise RpcError(
                        METHOD_NOT_FOUND,
                        f"method not found: {shown(name)}; the methods are "
                        f"{', '.join(self.methods)} (UploadGraph is gRPC-only)",
                    )
                message = await self._off(big, _parse_params, method, item.get("params"))
                result, nodes = await self._run(method, message, timeout)
            except RpcError as exc:
                call.finish(exc.status, jsonrpc_code=exc.code)
                return None if id_ is _NO_ID else _dumps(_error(reply_id, exc))
            call.finish("OK", nodes)
        if id_ is _NO_ID:
            return None
        return b'{"jsonrpc":"2.0","result":' + result + b',"id":' + _dumps(id_) + b"}"

    def _record_protocol(self, request_id: str | None, error: RpcError) -> RpcError:
        """Count and log an invalid request under method ``(invalid)``; returns ``error``."""
        with self.metrics.call("jsonrpc", "(invalid)", request_id) as call:
            call.finish(error.status, jsonrpc_code=error.code)
        return error

    @staticmethod
    def _shape_problem(item: Any, valid_id: bool, echoable: bool = True) -> RpcError | None:
        """Why ``item`` is not a valid request object (-32600), or ``None`` if it is."""
        if not isinstance(item, dict):
            return RpcError(
                INVALID_REQUEST,
                f"invalid request: expected a request object, got {type(item).__name__}",
            )
        if item.get("jsonrpc") != "2.0":
            return RpcError(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
        if not isinstance(item.get("method"), str):
            return RpcError(INVALID_REQUEST, 'invalid request: "method" must be a string')
        if not valid_id:
            return RpcError(
                INVALID_REQUEST, 'invalid request: "id" must be a string, a number or null'
            )
        if not echoable:
            return RpcError(
                INVALID_REQUEST,
                'invalid request: the "id" cannot be sent back exactly as it came (a number '
                "beyond the float64 range, or a string with an unpaired surrogate)",
            )
        if "params" in item and not isinstance(item["params"], dict | list):
            return RpcError(
                INVALID_REQUEST, 'invalid request: "params" must be an object or an array'
            )
        return None

    # -- running a call ----------------------------------------------------

    async def _run(
        self, method: Method, message: Message, timeout: float | None
    ) -> tuple[bytes, int]:
        """Run ``method`` as one admitted call (``server/calls.py``): the serialized result and
        the node evaluations; errors become ``RpcError``."""
        calls = self.calls
        try:
            return await calls.unary(
                calls.inline(method.size(message)), partial(_answer, method), message, timeout
            )
        except ServiceError as exc:
            raise RpcError.from_service_error(exc) from None
        except RpcError:
            raise
        except Exception as exc:
            log.exception("internal error in a JSON-RPC call")
            # The type only: a repr can carry server paths; the log above has the traceback.
            message = f"internal error ({type(exc).__name__}); the server's log has the details"
            raise RpcError.from_status("INTERNAL", message) from None
