"""How the clients talk to a server: channel options and the retry schedule.

Calls that fail with ``UNAVAILABLE`` (server not up yet, restarting, a
connection dropped) are tried again after a bounded, jittered exponential
backoff. The loop lives in the client rather than in a gRPC service-config
retry policy so that it covers streaming uploads too (they are restarted
from the first piece), shares one deadline across all attempts and reports
how many attempts were made. Every call of the service is idempotent (pure
evaluation, content-addressed registration), so retrying is always safe.

A target may name several servers, as a list of ``host:port`` (or one
comma-separated string) or as a ``dns:///name:port`` whose name resolves to
several addresses (a Kubernetes headless Service); the channel then keeps a
connection to each and spreads calls over them one by one with gRPC's
``round_robin`` policy, skipping servers it cannot reach. A retry after
``UNAVAILABLE`` (a server killed mid-call) so lands on another server.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from micrograd.codec import Wire
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc

from .result import stream_message

__all__ = [
    "TOKEN_ENV",
    "MiB",
    "Pem",
    "Retry",
    "Stub",
    "Target",
    "channel_credentials",
    "channel_options",
    "channel_target",
    "describe_target",
    "open_channel",
    "token_metadata",
]

MiB = 1 << 20

TOKEN_ENV = "MICROGRAD_RPC_TOKEN"
"""Environment variable the clients take their bearer token from when ``token`` is not given."""

Pem: TypeAlias = bytes | str | os.PathLike[str]
"""PEM data: the bytes themselves, or the path of a file holding them (``str`` or ``Path``)."""

Metadata: TypeAlias = tuple[tuple[str, str], ...]

Target: TypeAlias = str | Sequence[str]
"""One ``host:port``, several (a list, or one string with commas), or a gRPC target URI
such as ``dns:///name:port``."""

_URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")
"""Targets starting with these go to gRPC as they are."""


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


def _pem(source: Pem | None, what: str) -> bytes | None:
    """The bytes of ``source`` (PEM bytes, PEM text or a file path); ValueError if unreadable."""
    if source is None:
        return None
    if isinstance(source, bytes):
        return source
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        return source.encode("ascii")
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {os.fspath(source)}: {exc.strerror}") from None


def channel_credentials(
    tls: bool | Pem = False,
    root_certificates: Pem | None = None,
    client_certificate: Pem | tuple[Pem, Pem] | None = None,
    client_key: Pem | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials for a channel, or ``None`` for plaintext.

    TLS is on when ``tls`` is true, or PEM root certificates (which ``tls``
    may also be), or a client certificate is given; without root certificates
    the system's trusted roots verify the server. ``client_certificate``
    (with ``client_key``, or a ``(certificate, key)`` pair) is sent to
    servers that require one (mutual TLS).
    """
    if tls is not True and tls is not False and root_certificates is None:
        root_certificates = tls
    if isinstance(client_certificate, tuple):
        client_certificate, client_key = client_certificate
    if not tls and root_certificates is None and client_certificate is None:
        return None
    if (client_certificate is None) != (client_key is None):
        raise ValueError("a client certificate needs its key (client_certificate and client_key)")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates, "root certificates"),
        private_key=_pem(client_key, "client key"),
        certificate_chain=_pem(client_certificate, "client certificate"),
    )


def token_metadata(token: str | None) -> Metadata:
    """The ``authorization: Bearer`` metadata for ``token`` (default ``$MICROGRAD_RPC_TOKEN``)."""
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    token = (token or "").strip()
    if not token:
        return ()
    if any(c.isspace() for c in token):
        raise ValueError("a bearer token cannot contain white space")
    return (("authorization", f"Bearer {token}"),)


def describe_target(target: Target) -> str:
    """``target`` as one line for messages (several addresses joined by commas)."""
    return target if isinstance(target, str) else ",".join(target)


def channel_target(target: Target) -> tuple[str, bool]:
    """The gRPC target for ``target``, and whether it names several servers to balance over.

    A single ``host:port`` stays as it is (one server: gRPC's default
    ``pick_first``). Several addresses become one ``ipv4:`` (or ``ipv6:``)
    list, host names resolved now; a ``dns:`` target is resolved by gRPC,
    again whenever connections fail, so servers may come and go. Raises
    ``ValueError`` for an empty list, a malformed address or a host name
    that does not resolve.
    """
    if isinstance(target, str):
        if target.startswith(_URI_SCHEMES):
            return target, target.startswith("dns:") or "," in target
        parts = [part.strip() for part in target.split(",") if part.strip()]
    else:
        parts = [str(part).strip() for part in target]
    if not parts:
        raise ValueError("no server address given")
    if len(parts) == 1:
        return parts[0], False
    return _address_list(parts), True


def _address_list(addresses: Sequence[str]) -> str:
    """``ipv4:a:p,b:q`` (or ``ipv6:[a]:p,...``) for ``host:port`` addresses, names resolved."""
    v4: list[str] = []
    v6: list[str] = []
    literal6 = literal4 = False
    for address in addresses:
        host, sep, port_text = address.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{address!r} is not host:port")
        port = int(port_text)
        try:
            ips = [ipaddress.ip_address(host)]
            literal4 |= ips[0].version == 4
            literal6 |= ips[0].version == 6
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise ValueError(
                    f"cannot resolve {host!r} ({exc}); a dns:///{host}:{port} target "
                    "resolves when connecting instead"
                ) from None
            ips = [ipaddress.ip_address(info[4][0]) for info in infos]
        for ip in ips:
            (v4 if ip.version == 4 else v6).append(
                f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"
            )
    if literal4 and literal6:
        raise ValueError(
            "gRPC balances over IPv4 or IPv6 addresses, not a mix of both: "
            + ", ".join(addresses)
        )
    family, chosen = ("ipv6", v6) if literal6 or not v4 else ("ipv4", v4)
    return f"{family}:" + ",".join(dict.fromkeys(chosen))


def open_channel(
    target: Target,
    options: Sequence[tuple[str, Any]],
    credentials: grpc.ChannelCredentials | None,
    server_name: str | None = None,
    aio: bool = False,
) -> Any:
    """A sync (or ``grpc.aio`` when ``aio``) channel to ``target``; TLS with ``credentials``,
    checking the server's certificate for ``server_name`` instead of the target's host.

    Several servers (see ``channel_target``) get the ``round_robin`` policy:
    each call goes to the next server that is connected.
    """
    target, balanced = channel_target(target)
    options = list(options)
    if balanced:
        options.append(("grpc.lb_policy_name", "round_robin"))
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    module: Any = grpc.aio if aio else grpc
    if credentials is None:
        return module.insecure_channel(target, options=options)
    return module.secure_channel(target, credentials, options=options)


class _WithMetadata:
    """A multi-callable that sends ``metadata`` (the token) with every call."""

    def __init__(self, call: Any, metadata: Metadata) -> None:
        self.call = call
        self.metadata = metadata

    def __call__(self, request: Any, **kwargs: Any) -> Any:
        extra = kwargs.pop("metadata", None) or ()
        return self.call(request, metadata=(*self.metadata, *extra), **kwargs)


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

    def __init__(self, channel: Any, metadata: Metadata = ()) -> None:
        """Stubs for every rpc on ``channel``, each call sending ``metadata`` (the token)."""
        super().__init__(channel)
        self.Evaluate = channel.unary_unary(
            _path("Evaluate"),
            request_serializer=_passing_wire(pb.EvaluateRequest.SerializeToString),
            response_deserializer=pb.EvaluateResponse.FromString,
        )
        self.EvaluateStream = channel.unary_stream(
            _path("EvaluateStream"),
            request_serializer=_passing_wire(pb.EvaluateStreamRequest.SerializeToString),
            response_deserializer=stream_message,
        )
        if metadata:
            for name in pb.DESCRIPTOR.services_by_name["GradientService"].methods_by_name:
                setattr(self, name, _WithMetadata(getattr(self, name), metadata))
