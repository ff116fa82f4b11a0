"""What a failed call raises: ``RemoteError`` and one subclass per status worth catching.

Every gRPC failure the client sees is turned into one of these at the
boundary, with the server's message, the status code and, for a rejected
graph, the ``google.rpc.BadRequest`` field violations (``graph.nodes[17].args[1]``
and what is wrong there), so callers never have to dig in ``grpc.RpcError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "DeadlineExceeded",
    "InvalidGraph",
    "NotFound",
    "RemoteError",
    "ResourceExhausted",
    "Unavailable",
    "Violation",
    "remote_error",
]


@dataclass(frozen=True)
class Violation:
    """One field the server rejected: where (``graph.nodes[17].args[1]``) and why."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class RemoteError(Exception):
    """A call to the gradient service failed; ``code`` is the gRPC status code."""

    hint = ""
    """What to do about it, appended to the message."""

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        violations: tuple[Violation, ...] = (),
        target: str = "",
    ) -> None:
        """``message`` is the server's (or transport's) text; ``target`` the address called."""
        self.message = message
        self.code = code
        self.violations = violations
        self.target = target
        text = f"{code.name}: {message}" if code is not grpc.StatusCode.UNKNOWN else message
        if violations:
            text += "".join(f"\n  {v}" for v in violations)
        if self.hint:
            text += f"\n({self.hint})"
        super().__init__(text)


class InvalidGraph(RemoteError):
    """The server rejected the request (``INVALID_ARGUMENT``); ``violations`` say where."""

    hint = "fix the listed fields of the graph or request and send it again"


class ResourceExhausted(RemoteError):
    """The request exceeds one of the server's limits (``RESOURCE_EXHAUSTED``)."""

    hint = (
        "see Client.server_info().limits for the server's limits; large graphs go through "
        "upload and streaming automatically, so lower the batch size or raise the limit"
    )


class NotFound(RemoteError):
    """A ``graph_id`` the server does not hold and this client cannot resend (``NOT_FOUND``)."""

    hint = (
        "the server may have evicted it from its cache; send the graph itself, or "
        "Client.register() it again"
    )


class Unavailable(RemoteError):
    """The server could not be reached (``UNAVAILABLE``), even after the retries."""

    hint = "is the server running and listening there? (micrograd-rpc serve --port ...)"

    def __init__(self, message: str, attempts: int, target: str = "") -> None:
        """``attempts`` is how many times the call was tried before giving up."""
        self.attempts = attempts
        super().__init__(
            f"{target or 'the server'} unavailable after {attempts} attempt(s): {message}",
            grpc.StatusCode.UNAVAILABLE,
            target=target,
        )


class DeadlineExceeded(RemoteError):
    """The call did not finish within its deadline (``DEADLINE_EXCEEDED``)."""

    hint = "pass a larger timeout= to the client or the call"


_BY_CODE: dict[grpc.StatusCode, type[RemoteError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidGraph,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def violations(error: grpc.RpcError) -> tuple[Violation, ...]:
    """The ``BadRequest`` field violations attached to a failed call (empty if none)."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        return ()
    if status is None:
        return ()
    found: list[Violation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.extend(Violation(v.field, v.description) for v in bad.field_violations)
    return tuple(found)


def remote_error(error: grpc.RpcError, target: str = "", attempts: int = 1) -> RemoteError:
    """The ``RemoteError`` (subclass chosen by status code) for a failed sync or asyncio call."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message: str = error.details() or code.name  # type: ignore[attr-defined]
    if code is grpc.StatusCode.UNAVAILABLE:
        return Unavailable(message, attempts, target)
    cls = _BY_CODE.get(code, RemoteError)
    return cls(message, code, violations(error), target)
