"""How the clients talk to a server: channel options and the retry schedule.

Calls that fail with ``UNAVAILABLE`` (server not up yet, restarting, a
connection dropped) are tried again after a bounded, jittered exponential
backoff. The loop lives in the client rather than in a gRPC service-config
retry policy so that it covers streaming uploads too (they are restarted
from the first piece), shares one deadline across all attempts and reports
how many attempts were made. Every call of the service is idempotent (pure
evaluation, content-addressed registration), so retrying is always safe.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from micrograd.codec import Wire
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc

__all__ = ["MiB", "Retry", "Stub", "channel_options"]

MiB = 1 << 20


@dataclass(frozen=True)
class Retry:
    """Bounded exponential backoff: ``attempts`` tries, waits from ``initial`` up to ``maximum``."""

    attempts: int = 5
    """Most tries of one call (1 means no retry)."""
    initial: float = 0.1
    """Wait before the second try, in seconds (before jitter)."""
    maximum: float = 2.0
    """Longest wait between two tries, in seconds."""
    multiplier: float = 2.0
    """Growth of the wait from one try to the next."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if not 0 < self.initial <= self.maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")

    def delays(self) -> Iterator[float]:
        """The ``attempts - 1`` waits between consecutive tries, each jittered by -20%..0."""
        wait = self.initial
        for _ in range(self.attempts - 1):
            yield wait * random.uniform(0.8, 1.0)
            wait = min(wait * self.multiplier, self.maximum)


def channel_options(max_message_bytes: int, retry: Retry) -> list[tuple[str, int]]:
    """gRPC channel arguments: raised message limits, reconnects paced like the retries."""
    backoff_ms = max(int(retry.initial * 1000), 1)
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A channel that failed to connect otherwise waits ~1 s before trying again,
        # so a retry scheduled sooner would fail without ever reaching a fresh server.
        ("grpc.initial_reconnect_backoff_ms", backoff_ms),
        ("grpc.min_reconnect_backoff_ms", backoff_ms),
        ("grpc.max_reconnect_backoff_ms", max(int(retry.maximum * 1000), backoff_ms)),
    ]


def _passing_wire(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A request serializer that sends pre-serialized requests (``codec.Wire``) as they are."""

    def serializer(request: Any) -> bytes:
        return request.data if isinstance(request, Wire) else serialize(request)

    return serializer


def _path(method: str) -> str:
    """The gRPC path of a ``GradientService`` method, from the descriptor."""
    return f"/{pb.DESCRIPTOR.services_by_name['GradientService'].full_name}/{method}"


class Stub(pb_grpc.GradientServiceStub):
    """The generated stub, whose ``Evaluate`` and ``EvaluateStream`` also take ``codec.Wire``
    requests (a big graph appended already serialized); works on sync and asyncio channels."""

    def __init__(self, channel: Any) -> None:
        """Stubs for every rpc on ``channel``."""
        super().__init__(channel)
        self.Evaluate = channel.unary_unary(
            _path("Evaluate"),
            request_serializer=_passing_wire(pb.EvaluateRequest.SerializeToString),
            response_deserializer=pb.EvaluateResponse.FromString,
        )
        self.EvaluateStream = channel.unary_stream(
            _path("EvaluateStream"),
            request_serializer=_passing_wire(pb.EvaluateStreamRequest.SerializeToString),
            response_deserializer=pb.EvaluateStreamResponse.FromString,
        )
