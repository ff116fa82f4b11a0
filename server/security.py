"""Security at the edge of each transport: TLS files, bearer tokens and protected mode.

``load(settings)`` reads and checks everything once per process (each
worker loads its own copy) and returns a ``Security``:

* TLS: ``--tls-cert``/``--tls-key`` (PEM) serve gRPC over TLS and HTTP as
  HTTPS; ``--tls-client-ca`` also requires client certificates signed by
  that CA on both ports. Every file is read and parsed at startup, so a
  missing, unreadable, malformed or mismatched file is an error naming it.
* Tokens: ``--auth-token-file`` holds the accepted bearer tokens, one a
  line (``#`` starts a comment); SIGHUP re-reads it. Only SHA-256 digests
  are kept, and a presented token is compared with every one of them in
  constant time. gRPC methods are guarded once, at handler registration
  (``TokenGuard``); HTTP by an aiohttp middleware. Health checking
  (``grpc.health.v1``, ``/healthz``, ``/readyz``) stays open for probes.
* Protected mode: a server asked to listen beyond loopback with neither
  TLS nor tokens refuses to start unless ``--insecure`` is given.

Tokens never reach a log line or a metrics label: failures are logged by
reason ("missing", "invalid"), never by value.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from .config import Settings, SettingsError
from .handlers import rebuilt

__all__ = [
    "OPEN_GRPC_SERVICES",
    "OPEN_HTTP_PATHS",
    "Security",
    "SecurityError",
    "Tls",
    "TokenGuard",
    "TokenSet",
    "bearer_token",
    "check_exposure",
    "is_loopback",
    "load",
    "load_tls",
]

log = logging.getLogger("micrograd.server")

OPEN_GRPC_SERVICES = ("grpc.health.v1.Health",)
"""gRPC services callable without a token: orchestrators probe them."""
OPEN_HTTP_PATHS = ("/healthz", "/readyz")
"""HTTP paths served without a token, for the same reason."""

UNAUTHENTICATED_JSONRPC = -32016
"""JSON-RPC ``error.code`` of UNAUTHENTICATED (``-32000 - 16``, as ``jsonrpc.error_code``)."""

_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
"""RFC 6750 ``b64token``: what a bearer token may be made of."""


class SecurityError(SettingsError):
    """A TLS file or token file the server cannot start with; the message names the file."""


def _label(name: str) -> str:
    return f"--{name.replace('_', '-')} (MICROGRAD_RPC_{name.upper()})"


def _read(name: str, path: str) -> bytes:
    """The bytes of the file a setting names; ``SecurityError`` saying why it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SecurityError(f"{_label(name)}: {path}: no such file") from None
    except IsADirectoryError:
        raise SecurityError(f"{_label(name)}: {path}: is a directory, not a file") from None
    except PermissionError:
        raise SecurityError(
            f"{_label(name)}: {path}: permission denied (the server's user must be able to read it)"
        ) from None
    except OSError as exc:
        raise SecurityError(f"{_label(name)}: {path}: cannot read: {exc.strerror}") from None


def _certificates(name: str, path: str, data: bytes) -> None:
    """Check that ``data`` holds at least one PEM certificate OpenSSL can parse."""
    text = data.decode("ascii", "replace")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise SecurityError(f"{_label(name)}: {path}: not a PEM certificate (no BEGIN CERTIFICATE)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except ssl.SSLError as exc:
        raise SecurityError(
            f"{_label(name)}: {path}: the certificate cannot be parsed ({exc.reason or exc})"
        ) from None


def _no_passphrase() -> str:
    raise SecurityError("encrypted")


@dataclass(frozen=True)
class Tls:
    """The server's certificate chain and key (PEM), and the CA its clients must be signed by."""

    cert_path: str
    key_path: str
    cert_chain: bytes
    private_key: bytes
    client_ca_path: str = ""
    client_ca: bytes | None = None

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate signed by ``client_ca``."""
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``: TLS, with client certificates required if mutual."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.mutual,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server ``SSLContext`` for the HTTP port (TLS 1.2+), verifying clients if mutual."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path, password=_no_passphrase)
        if self.client_ca is not None:
            context.load_verify_locations(cadata=self.client_ca.decode("ascii"))
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def load_tls(settings: Settings) -> Tls | None:
    """The TLS files of ``settings`` read and checked, or ``None`` when TLS is off.

    Raises ``SecurityError`` naming the file for a missing or unreadable file,
    a file that is not PEM, an encrypted key, or a key that does not belong
    to the certificate.
    """
    if not settings.tls_cert and not settings.tls_key:
        if settings.tls_client_ca:
            raise SecurityError(
                f"{_label('tls_client_ca')} needs {_label('tls_cert')} and {_label('tls_key')}: "
                "client certificates are checked in the TLS handshake"
            )
        return None
    if not settings.tls_cert or not settings.tls_key:
        given, missing = ("tls_cert", "tls_key") if settings.tls_cert else ("tls_key", "tls_cert")
        raise SecurityError(f"{_label(given)} needs {_label(missing)} too")
    cert = _read("tls_cert", settings.tls_cert)
    key = _read("tls_key", settings.tls_key)
    _certificates("tls_cert", settings.tls_cert, cert)
    key_text = key.decode("ascii", "replace")
    if not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", key_text):
        raise SecurityError(
            f"{_label('tls_key')}: {settings.tls_key}: not a PEM private key (no BEGIN PRIVATE KEY)"
        )
    if "ENCRYPTED" in key_text:
        raise SecurityError(
            f"{_label('tls_key')}: {settings.tls_key}: the key is protected by a passphrase; "
            "give the server an unencrypted key readable only by its user"
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            settings.tls_cert, settings.tls_key, password=_no_passphrase
        )
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise SecurityError(
                f"{_label('tls_key')}: {settings.tls_key} is not the private key of the "
                f"certificate in {settings.tls_cert}"
            ) from None
        raise SecurityError(
            f"{_label('tls_cert')}/{_label('tls_key')}: {settings.tls_cert}, {settings.tls_key}: "
            f"not a usable certificate and key ({exc.reason or exc})"
        ) from None
    except SecurityError:
        raise SecurityError(
            f"{_label('tls_key')}: {settings.tls_key}: the key is protected by a passphrase"
        ) from None
    client_ca = None
    if settings.tls_client_ca:
        client_ca = _read("tls_client_ca", settings.tls_client_ca)
        _certificates("tls_client_ca", settings.tls_client_ca, client_ca)
    return Tls(settings.tls_cert, settings.tls_key, cert, key, settings.tls_client_ca, client_ca)


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def parse_tokens(text: str, path: str) -> list[str]:
    """The tokens of a token file's ``text``: one a line, ``#`` to the end of a line a comment.

    Raises ``SecurityError`` naming the file and line (never the token) for a
    line that is not one RFC 6750 token, and when no token is left.
    """
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.split("#", 1)[0].strip()
        if not token:
            continue
        if not _TOKEN.match(token):
            raise SecurityError(
                f"{_label('auth_token_file')}: {path}, line {number}: not a bearer token "
                "(one token a line, made of letters, digits and -._~+/ and ending in optional =)"
            )
        tokens.append(token)
    if not tokens:
        raise SecurityError(
            f"{_label('auth_token_file')}: {path}: no tokens (one a line; # starts a comment)"
        )
    return tokens


class TokenSet:
    """The bearer tokens a server accepts, read from a file and re-read on ``reload``.

    Only SHA-256 digests are held. ``accepts`` hashes the presented token and
    compares it with every digest with ``hmac.compare_digest``, so neither
    the time taken nor an early exit tells how much of a token was right.
    """

    def __init__(self, path: str) -> None:
        """The tokens in ``path``; raises ``SecurityError`` if it cannot be read or is empty."""
        self.path = path
        self._digests = self._read()

    def _read(self) -> tuple[bytes, ...]:
        text = _read("auth_token_file", self.path).decode("utf-8", "replace")
        return tuple(_digest(token) for token in dict.fromkeys(parse_tokens(text, self.path)))

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, token: str | bytes | None) -> bool:
        """Whether ``token`` is one of the accepted tokens (constant time in its content)."""
        if not token:
            return False
        presented = _digest(token)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(presented, digest)
        return found

    def reload(self) -> bool:
        """Re-read the file (SIGHUP); on any problem keep the current tokens and log why."""
        try:
            digests = self._read()
        except SecurityError as exc:
            log.error("token file not reloaded, keeping the %d current token(s): %s",
                      len(self._digests), exc)
            return False
        self._digests = digests
        log.info("reloaded %d token(s) from %s", len(digests), self.path)
        return True


def bearer_token(value: str | bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme in any case), or ``None``."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _metadata_authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _refusal(tokens: TokenSet, authorization: str | None) -> str | None:
    """Why a call with this ``authorization`` is refused, or ``None`` if its token is good."""
    token = bearer_token(authorization)
    if token is None:
        return (
            "missing bearer token: send 'authorization: Bearer <token>' "
            "(gRPC metadata or HTTP header)"
            if authorization is None
            else "malformed authorization: expected 'Bearer <token>'"
        )
    return None if tokens.accepts(token) else "invalid bearer token"


class TokenGuard:
    """Wraps every gRPC method handler, once at registration, to require a valid bearer token.

    A call without ``authorization: Bearer <token>`` metadata, or with a token
    not in the set, ends with UNAUTHENTICATED before the method runs. Methods
    of ``OPEN_GRPC_SERVICES`` are left as they are.
    """

    def __init__(self, tokens: TokenSet, open_services: Iterable[str] = OPEN_GRPC_SERVICES) -> None:
        """Guard with ``tokens``; methods of ``open_services`` stay callable without one."""
        self.tokens = tokens
        self.open_services = frozenset(open_services)

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` for ``path`` (``/pkg.Service/Method``), refusing calls without a token."""
        service = path.lstrip("/").split("/", 1)[0]
        if service in self.open_services:
            return handler
        # A unary request is received whole before the behavior runs: keep it as bytes and
        # parse it only once the token is checked, so an unauthenticated caller cannot make
        # the server parse anything. Streamed requests are read after the check anyway.
        parse = None if handler.request_streaming else handler.request_deserializer
        receive = None if parse is None else _as_received
        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream
            return rebuilt(handler, self._streaming(inner, parse), request_deserializer=receive)
        inner = handler.unary_unary or handler.stream_unary
        return rebuilt(handler, self._unary(inner, parse), request_deserializer=receive)

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        reason = _refusal(self.tokens, _metadata_authorization(context))
        if reason is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    def _unary(
        self, behavior: Callable[..., Any], parse: Callable[[bytes], Any] | None
    ) -> Callable[..., Awaitable[Any]]:
        check = self._check

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            if parse is not None:
                request = await _parsed(parse, request, context)
            response = behavior(request, context)
            if inspect.isawaitable(response):
                response = await response
            return response

        return guarded

    def _streaming(
        self, behavior: Callable[..., Any], parse: Callable[[bytes], Any] | None
    ) -> Callable[..., AsyncIterator[Any]]:
        check = self._check

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(context)
            if parse is not None:
                request = await _parsed(parse, request, context)
            responses = behavior(request, context)
            if hasattr(responses, "__aiter__"):
                async for response in responses:
                    yield response
            elif inspect.isawaitable(responses):
                await responses
            else:
                for response in responses:
                    yield response

        return guarded


def _as_received(data: bytes) -> bytes:
    """A request deserializer that leaves the message as the bytes that arrived."""
    return data


async def _parsed(
    parse: Callable[[bytes], Any], data: bytes, context: grpc.aio.ServicerContext
) -> Any:
    """The request message parsed from ``data``; a call whose bytes do not parse ends with
    INVALID_ARGUMENT (gRPC itself would say INTERNAL, which blames the server)."""
    try:
        return parse(data)
    except Exception:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "the request message could not be parsed"
        )


_HttpHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def token_middleware(tokens: TokenSet, open_paths: Iterable[str] = OPEN_HTTP_PATHS) -> Any:
    """An aiohttp middleware answering 401 (``WWW-Authenticate: Bearer``) without a good token.

    The body is a JSON-RPC error (code -32016, ``data.grpcCode``
    UNAUTHENTICATED) so a JSON-RPC client reads it like any other error.
    """
    open_set = frozenset(open_paths)

    @web.middleware
    async def require_token(request: web.Request, handler: _HttpHandler) -> web.StreamResponse:
        if request.path in open_set:
            return await handler(request)
        reason = _refusal(tokens, request.headers.get("Authorization"))
        if reason is None:
            return await handler(request)
        body = {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": UNAUTHENTICATED_JSONRPC,
                "message": reason,
                "data": {"grpcCode": "UNAUTHENTICATED", "violations": []},
            },
        }
        return web.Response(
            status=401,
            text=json.dumps(body),
            content_type="application/json",
            # Close rather than drain a body nobody will read.
            headers={"WWW-Authenticate": "Bearer", "Connection": "close"},
        )

    return require_token


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only ever means this machine."""
    name = host.strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]).is_loopback for info in infos
    )


def check_exposure(settings: Settings) -> None:
    """Protected mode: refuse a non-loopback listen with neither TLS nor tokens.

    Raises ``SecurityError`` saying why and what to do, unless ``insecure`` is set.
    """
    if settings.tls_cert or settings.auth_token_file or is_loopback(settings.host):
        return
    if settings.insecure:
        log.warning(
            "listening on %s without TLS or tokens (--insecure): anyone who can reach the "
            "ports can evaluate graphs and read /metrics",
            settings.host,
        )
        return
    raise SecurityError(
        f"refusing to listen on {settings.host} with neither TLS nor bearer tokens: anyone who "
        "can reach the ports could use the service and read /metrics. Give --tls-cert and "
        "--tls-key, and/or --auth-token-file; or pass --insecure (MICROGRAD_RPC_INSECURE=1) if "
        "the network itself is trusted"
    )


@dataclass
class Security:
    """What one server process enforces: its TLS material and its token set (either optional)."""

    tls: Tls | None = None
    tokens: TokenSet | None = None

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials for the gRPC port, or ``None`` for plaintext."""
        return self.tls.grpc_credentials() if self.tls is not None else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The HTTPS context for the HTTP port, or ``None`` for plain HTTP."""
        return self.tls.ssl_context() if self.tls is not None else None

    def handler_wrappers(self) -> list[TokenGuard]:
        """The gRPC handler wrappers to install (the token check when tokens are configured)."""
        return [TokenGuard(self.tokens)] if self.tokens is not None else []

    def http_middlewares(self) -> list[Any]:
        """The aiohttp middlewares to install (the token check when tokens are configured)."""
        return [token_middleware(self.tokens)] if self.tokens is not None else []

    def reload(self) -> None:
        """SIGHUP: re-read the token file, if there is one."""
        if self.tokens is not None:
            self.tokens.reload()
        else:
            log.info("SIGHUP: no token file to reload (--auth-token-file is not set)")

    def summary(self) -> str:
        """What is enforced, for the startup line: `` with TLS, client certificates, tokens``."""
        parts = []
        if self.tls is not None:
            parts.append("TLS, client certificates" if self.tls.mutual else "TLS")
        if self.tokens is not None:
            parts.append(f"{len(self.tokens)} bearer token(s)")
        return f" with {', '.join(parts)}" if parts else " in plaintext, without tokens"

    @property
    def scheme(self) -> str:
        """``https`` with TLS, else ``http``: how the HTTP port is reached."""
        return "https" if self.tls is not None else "http"


def load(settings: Settings) -> Security:
    """Everything ``settings`` asks to enforce, read and checked; ``SecurityError`` otherwise."""
    check_exposure(settings)
    tls = load_tls(settings)
    tokens = TokenSet(settings.auth_token_file) if settings.auth_token_file else None
    return Security(tls, tokens)
