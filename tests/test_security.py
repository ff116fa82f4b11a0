"""TLS, mutual TLS, bearer tokens and protected mode, end to end on loopback.

Certificates are made at test time (``trustme``; ``scripts/gen-certs`` with
openssl in one test). Every server is real: in-process for most cases,
a ``micrograd-rpc serve`` process where signals, exit codes or workers
matter. Expected numbers are the seed document's: 24.7041, 138.8338, 645.5773.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from micrograd import codec
from micrograd.client import AsyncClient, Client, RemoteError
from micrograd.server import cli, security
from micrograd.server.config import Settings
from micrograd.server.security import SecurityError, TokenSet, check_exposure
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer
from tests.graphs import seed_graph
from tests.pki import Pki, make_pki

ROOT = Path(__file__).resolve().parent.parent
SEED = (24.7041, 138.8338, 645.5773)
"""g, dg/da and dg/db of the seed document."""
SEED_GRAPH = json.loads((ROOT / "examples" / "graphs" / "seed.json").read_text())

Factory = Callable[..., RunningServer]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, server and client certificates, a stranger's certificate and a token file."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: Pki, mutual: bool = False, tokens: bool = True) -> dict[str, Any]:
    """Server settings for TLS (+ client certificates when ``mutual``) and tokens."""
    settings: dict[str, Any] = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}
    if mutual:
        settings["tls_client_ca"] = str(pki.ca)
    if tokens:
        settings["auth_token_file"] = str(pki.tokens)
    return settings


@pytest.fixture
def secured(grpc_server_factory: Factory, pki: Pki) -> RunningServer:
    """An in-process server with TLS and tokens on both ports."""
    return grpc_server_factory(**tls_settings(pki))


@pytest.fixture
def mutual(grpc_server_factory: Factory, pki: Pki) -> RunningServer:
    """An in-process server requiring CA-signed client certificates and tokens."""
    return grpc_server_factory(**tls_settings(pki, mutual=True))


def seed_numbers(client: Client) -> tuple[float, float, float]:
    """The seed's g, dg/da, dg/db evaluated through ``client``, rounded to 4 decimals."""
    a, b, g = seed_graph()
    client.backward(g)
    return round(g.data, 4), round(a.grad, 4), round(b.grad, 4)


def seed_request() -> pb.EvaluateRequest:
    *_, g = seed_graph()
    packed, _, _ = codec.encode_value(g)
    return pb.EvaluateRequest(packed_graph=packed, binary_output=True)


def post_rpc(
    url: str,
    context: ssl.SSLContext | None,
    token: str | None = None,
    path: str = "/rpc",
    body: dict[str, Any] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """POST a JSON-RPC Evaluate of the seed (or GET ``path`` when it is not /rpc)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if path == "/rpc":
        payload = body or {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "Evaluate",
            "params": {"graph": SEED_GRAPH, "selection": "SELECTION_NAMED"},
        }
        data = json.dumps(payload).encode()
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def jsonrpc_seed(body: bytes) -> tuple[float, float, float]:
    result = json.loads(body)["result"]
    names = result["names"]
    return (
        round(result["values"][names["g"]], 4),
        round(result["grads"][names["a"]], 4),
        round(result["grads"][names["b"]], 4),
    )


def grpc_code(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code ``call`` fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[attr-defined,no-any-return]


def tls_channel(server: RunningServer, pki: Pki, client: bool | str = False) -> grpc.Channel:
    """A raw gRPC channel over TLS, with the client certificate (or a stranger's) if asked."""
    cert, key = None, None
    if client == "other":
        cert, key = pki.other_client_cert.read_bytes(), pki.other_client_key.read_bytes()
    elif client:
        cert, key = pki.client_cert.read_bytes(), pki.client_key.read_bytes()
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes(), key, cert)
    return grpc.secure_channel(server.target, credentials)


# -- TLS and tokens: both ports ----------------------------------------------------------


def test_grpc_over_tls_with_the_right_token_evaluates_the_seed(
    secured: RunningServer, pki: Pki
) -> None:
    with Client(secured.target, root_certificates=pki.ca, token=pki.token) as client:
        assert seed_numbers(client) == SEED


def test_https_jsonrpc_with_the_right_token_evaluates_the_seed(
    secured: RunningServer, pki: Pki
) -> None:
    assert secured.http_url.startswith("https://")
    status, _, body = post_rpc(secured.http_url, pki.ssl_context(), pki.token)
    assert status == 200, body
    assert jsonrpc_seed(body) == SEED


def test_every_listed_token_is_accepted_and_comments_are_not(
    secured: RunningServer, pki: Pki
) -> None:
    with Client(secured.target, tls=pki.ca, token="retired-but-still-listed-token") as client:
        assert seed_numbers(client) == SEED
    with Client(secured.target, tls=pki.ca, token="#", retries=0) as client:
        with pytest.raises(RemoteError) as info:
            seed_numbers(client)
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("token", [None, "wrong-token", "x" * 64])
def test_grpc_without_the_right_token_is_unauthenticated(
    secured: RunningServer, pki: Pki, token: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MICROGRAD_RPC_TOKEN", raising=False)
    with Client(secured.target, root_certificates=pki.ca, token=token, retries=0) as client:
        with pytest.raises(RemoteError) as info:
            seed_numbers(client)
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert ("missing" if token is None else "invalid") in info.value.message
    assert token is None or token not in info.value.message


def test_every_gradient_service_method_needs_the_token(secured: RunningServer, pki: Pki) -> None:
    with tls_channel(secured, pki) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        request = seed_request()
        calls: list[Callable[[], object]] = [
            lambda: stub.Evaluate(request, timeout=10),
            lambda: list(
                stub.EvaluateStream(pb.EvaluateStreamRequest(request=request), timeout=10)
            ),
            lambda: stub.RegisterGraph(
                pb.RegisterGraphRequest(packed_graph=request.packed_graph), timeout=10
            ),
            lambda: stub.UploadGraph(iter([pb.UploadGraphRequest()]), timeout=10),
            lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10),
        ]
        for call in calls:
            assert grpc_code(call) is grpc.StatusCode.UNAUTHENTICATED
        bad = (("authorization", "Basic dXNlcjpwYXNz"),)
        assert (
            grpc_code(
                lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=bad, timeout=10)
            )
            is grpc.StatusCode.UNAUTHENTICATED
        )
        good = (("authorization", f"bearer {pki.token}"),)  # the scheme is case-insensitive
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=good, timeout=10)
        assert info.version


def test_a_request_is_not_parsed_before_its_token_is_checked(
    secured: RunningServer, pki: Pki
) -> None:
    garbage = b"\xff\xff\xff\xff not a protobuf message"
    with tls_channel(secured, pki) as channel:
        evaluate = channel.unary_unary("/micrograd.v1.GradientService/Evaluate")
        assert grpc_code(lambda: evaluate(garbage, timeout=10)) is grpc.StatusCode.UNAUTHENTICATED
        token = (("authorization", f"Bearer {pki.token}"),)
        assert grpc_code(
            lambda: evaluate(garbage, metadata=token, timeout=10)
        ) is grpc.StatusCode.INVALID_ARGUMENT
        reply = pb.EvaluateResponse.FromString(
            evaluate(seed_request().SerializeToString(), metadata=token, timeout=10)
        )
    assert round(codec.f64_array(reply.values_f64)[-1], 4) == SEED[0]


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_https_without_the_right_token_is_401_with_a_jsonrpc_error(
    secured: RunningServer, pki: Pki, token: str | None
) -> None:
    status, headers, body = post_rpc(secured.http_url, pki.ssl_context(), token)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    answer = json.loads(body)
    assert answer["jsonrpc"] == "2.0" and answer["id"] is None
    assert answer["error"]["code"] == -32016
    assert answer["error"]["data"]["grpcCode"] == "UNAUTHENTICATED"
    assert token is None or token not in body.decode()


def test_plaintext_to_a_tls_port_fails_on_both_ports(secured: RunningServer, pki: Pki) -> None:
    with grpc.insecure_channel(secured.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        code = grpc_code(lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5))
    assert code is grpc.StatusCode.UNAVAILABLE
    plain = secured.http_url.replace("https://", "http://")
    with pytest.raises((OSError, urllib.error.URLError, ConnectionError)):
        post_rpc(plain, None, pki.token, path="/healthz")


def test_a_client_that_does_not_trust_the_server_ca_is_refused(
    secured: RunningServer, pki: Pki, tmp_path: Path
) -> None:
    stranger = make_pki(tmp_path)
    with Client(secured.target, root_certificates=stranger.ca, token=pki.token, retries=0) as c:
        with pytest.raises(RemoteError) as info:
            seed_numbers(c)
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(urllib.error.URLError) as error:
        post_rpc(secured.http_url, stranger.ssl_context(), pki.token)
    assert isinstance(error.value.reason, ssl.SSLCertVerificationError)


def test_health_stays_open_but_metrics_and_reflection_need_the_token(
    secured: RunningServer, pki: Pki
) -> None:
    with tls_channel(secured, pki) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "micrograd.v1.GradientService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        assert (
            grpc_code(lambda: list(reflection.ServerReflectionInfo(iter([ask]), timeout=10)))
            is grpc.StatusCode.UNAUTHENTICATED
        )
        token = (("authorization", f"Bearer {pki.token}"),)
        (listed,) = reflection.ServerReflectionInfo(iter([ask]), metadata=token, timeout=10)
        assert "micrograd.v1.GradientService" in {
            s.name for s in listed.list_services_response.service
        }
    context = pki.ssl_context()
    assert post_rpc(secured.http_url, context, path="/healthz")[0] == 200
    assert post_rpc(secured.http_url, context, path="/readyz")[0] == 200
    status, headers, _ = post_rpc(secured.http_url, context, path="/metrics")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    status, _, body = post_rpc(secured.http_url, context, pki.token, path="/metrics")
    assert status == 200 and b"micrograd_" in body


def test_tokens_never_appear_in_metrics(secured: RunningServer, pki: Pki) -> None:
    context = pki.ssl_context()
    post_rpc(secured.http_url, context, "not-the-token-but-secret")
    with Client(secured.target, tls=pki.ca, token="another-secret-guess", retries=0) as client:
        with pytest.raises(RemoteError):
            client.server_info()
    status, _, body = post_rpc(secured.http_url, context, pki.token, path="/metrics")
    assert status == 200
    text = body.decode()
    # Refusals are counted by method and status, never by what the caller sent.
    assert (
        'micrograd_requests_total{code="UNAUTHENTICATED",method="GetServerInfo",'
        'transport="grpc"} 1.0' in text
    )
    assert 'micrograd_http_responses_total{path="/rpc",status="401"} 1.0' in text
    for secret in (pki.token, "not-the-token-but-secret", "another-secret-guess"):
        assert secret not in text


def test_tokens_alone_without_tls_work_in_plaintext(grpc_server_factory: Factory, pki: Pki) -> None:
    server = grpc_server_factory(auth_token_file=str(pki.tokens))
    with Client(server.target, token=pki.token) as client:
        assert seed_numbers(client) == SEED
    with Client(server.target, retries=0) as client:
        with pytest.raises(RemoteError) as info:
            client.server_info()
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert post_rpc(server.http_url, None)[0] == 401
    assert post_rpc(server.http_url, None, pki.token)[0] == 200


def test_the_token_comes_from_the_environment(
    secured: RunningServer, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROGRAD_RPC_TOKEN", pki.token)
    with Client(secured.target, tls=str(pki.ca)) as client:
        assert seed_numbers(client) == SEED


# -- the Python clients: sync and asyncio ----------------------------------------------


def test_async_client_over_tls_with_a_token(secured: RunningServer, pki: Pki) -> None:
    async def main() -> tuple[float, float, float, str]:
        async with AsyncClient(secured.target, tls=pki.ca, token=pki.token) as client:
            a, b, g = seed_graph()
            await client.backward(g)
            status = await client.health()
        return round(g.data, 4), round(a.grad, 4), round(b.grad, 4), status

    assert asyncio.run(main()) == (*SEED, "SERVING")


def test_async_client_with_a_wrong_token_is_unauthenticated(
    secured: RunningServer, pki: Pki
) -> None:
    async def main() -> RemoteError:
        async with AsyncClient(secured.target, tls=pki.ca, token="nope", retries=0) as client:
            try:
                await client.server_info()
            except RemoteError as error:
                return error
        raise AssertionError("the call succeeded without a valid token")

    assert asyncio.run(main()).code is grpc.StatusCode.UNAUTHENTICATED


# -- mutual TLS: both ports --------------------------------------------------------------


def test_mutual_tls_accepts_a_ca_signed_client_on_both_ports(
    mutual: RunningServer, pki: Pki
) -> None:
    with Client(
        mutual.target,
        root_certificates=pki.ca,
        client_certificate=pki.client_cert,
        client_key=pki.client_key,
        token=pki.token,
    ) as client:
        assert seed_numbers(client) == SEED

    async def main() -> float:
        async with AsyncClient(
            mutual.target,
            tls=pki.ca,
            client_certificate=(pki.client_cert, pki.client_key),
            token=pki.token,
        ) as client:
            *_, g = seed_graph()
            await client.backward(g)
            return round(g.data, 4)

    assert asyncio.run(main()) == SEED[0]
    status, _, body = post_rpc(mutual.http_url, pki.ssl_context(client=True), pki.token)
    assert status == 200 and jsonrpc_seed(body) == SEED


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
def test_mutual_tls_refuses_other_clients_on_the_grpc_port(
    mutual: RunningServer, pki: Pki, who: str
) -> None:
    with tls_channel(mutual, pki, client="other" if who == "another CA" else False) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        code = grpc_code(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10))
    assert code is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
def test_mutual_tls_refuses_other_clients_on_the_http_port(
    mutual: RunningServer, pki: Pki, who: str
) -> None:
    context = pki.ssl_context(client="other" if who == "another CA" else False)
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)) as info:
        post_rpc(mutual.http_url, context, pki.token, path="/healthz")
    error = info.value
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    assert isinstance(reason, (ssl.SSLError, ConnectionError)), reason


# -- startup: files, protected mode --------------------------------------------------------


def serve_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``micrograd-rpc serve ARGS`` in this process; (exit code, stderr)."""
    code = cli.main(["serve", "--workers", "1", "--port", "0", "--http-port", "0", *args])
    return code, capsys.readouterr().err


def test_missing_tls_files_are_startup_errors_naming_the_file(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.pem"
    code, err = serve_cli(
        "--tls-cert", str(missing), "--tls-key", str(pki.server_key), capsys=capsys
    )
    assert code == 2
    assert str(missing) in err and "--tls-cert" in err and "no such file" in err
    assert "Traceback" not in err


def test_a_key_that_does_not_match_the_certificate_is_named(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = serve_cli(
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key), capsys=capsys
    )
    assert code == 2
    assert f"{pki.client_key} is not the private key of the certificate in {pki.server_cert}" in err


@pytest.mark.parametrize("which", ["cert", "key", "client-ca"])
def test_a_file_that_is_not_pem_is_named(
    pki: Pki, tmp_path: Path, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not PEM\n")
    files = {"cert": str(pki.server_cert), "key": str(pki.server_key), "client-ca": str(pki.ca)}
    files[which] = str(junk)
    code, err = serve_cli(
        "--tls-cert",
        files["cert"],
        "--tls-key",
        files["key"],
        "--tls-client-ca",
        files["client-ca"],
        capsys=capsys,
    )
    assert code == 2
    assert f"--tls-{which}" in err and str(junk) in err and "not a PEM" in err


def test_an_unreadable_token_file_or_one_without_tokens_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("# nothing yet\n\n")
    code, err = serve_cli("--auth-token-file", str(empty), capsys=capsys)
    assert code == 2 and str(empty) in err and "no tokens" in err
    empty.write_text("good-token\nhas a space\n")
    code, err = serve_cli("--auth-token-file", str(empty), capsys=capsys)
    assert code == 2 and f"{empty}, line 2" in err and "has a space" not in err
    code, err = serve_cli("--auth-token-file", str(tmp_path / "absent"), capsys=capsys)
    assert code == 2 and "--auth-token-file" in err and "no such file" in err


def test_half_a_tls_pair_or_a_client_ca_alone_is_an_error(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = serve_cli("--tls-cert", str(pki.server_cert), capsys=capsys)
    assert code == 2 and "--tls-cert" in err and "needs --tls-key" in err
    code, err = serve_cli("--tls-client-ca", str(pki.ca), capsys=capsys)
    assert code == 2 and "--tls-client-ca" in err and "--tls-cert" in err


def test_a_non_loopback_listen_without_tls_or_tokens_refuses_to_start(tmp_path: Path) -> None:
    # The refusal comes before anything is bound, so nothing listens beyond loopback.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "micrograd.server",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--workers",
            "1",
            "--http-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
    )
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0" in done.stderr and "--insecure" in done.stderr
    assert "Traceback" not in done.stderr


def test_protected_mode_is_satisfied_by_tls_tokens_or_insecure(pki: Pki) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        with pytest.raises(SecurityError, match="--insecure"):
            check_exposure(Settings(host=host, workers=1))
        check_exposure(Settings(host=host, workers=1, insecure=True))
        check_exposure(Settings(host=host, workers=1, auth_token_file=str(pki.tokens)))
        check_exposure(
            Settings(
                host=host, workers=1, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)
            )
        )
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(Settings(host=host, workers=1))


def test_insecure_comes_from_the_environment_too() -> None:
    from micrograd.server import config

    settings = config.from_sources(
        environ={
            "MICROGRAD_RPC_INSECURE": "1",
            "MICROGRAD_RPC_HOST": "0.0.0.0",
            "MICROGRAD_RPC_TLS_CERT": "c.pem",
            "MICROGRAD_RPC_TLS_KEY": "k.pem",
            "MICROGRAD_RPC_TLS_CLIENT_CA": "ca.pem",
            "MICROGRAD_RPC_AUTH_TOKEN_FILE": "t",
        }
    )
    assert settings.insecure is True
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == (
        "c.pem",
        "k.pem",
        "ca.pem",
    )
    assert settings.auth_token_file == "t"


# -- tokens: the file, rotation on SIGHUP ------------------------------------------------------


def test_token_file_comments_blank_lines_and_constant_time_check(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# ops team\nalpha-token  # since March\n\n   beta.token~+/==\nalpha-token\n")
    tokens = TokenSet(str(path))
    assert len(tokens) == 2
    assert tokens.accepts("alpha-token") and tokens.accepts("beta.token~+/==")
    for wrong in ("", None, "alpha", "alpha-token ", "# ops team", "since"):
        assert not tokens.accepts(wrong)
    assert security.bearer_token("Bearer alpha-token") == "alpha-token"
    assert security.bearer_token("BEARER  alpha-token ") == "alpha-token"
    assert security.bearer_token("Basic alpha-token") is None
    assert security.bearer_token("Bearer") is None


def test_a_failed_reload_keeps_the_current_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("first-token\n")
    tokens = TokenSet(str(path))
    path.write_text("# emptied by mistake\n")
    assert tokens.reload() is False
    assert tokens.accepts("first-token")
    path.write_text("second-token\n")
    assert tokens.reload() is True
    assert tokens.accepts("second-token") and not tokens.accepts("first-token")


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("MICROGRAD_RPC_")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _until(condition: Callable[[], bool], seconds: float = 15.0) -> bool:
    """Poll ``condition`` (bounded in time) until it holds."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _accepted(target: str, pki: Pki, token: str) -> bool:
    with Client(target, tls=pki.ca, token=token, retries=0, timeout=10) as client:
        try:
            client.server_info()
            return True
        except RemoteError as error:
            assert error.code is grpc.StatusCode.UNAUTHENTICATED, error
            return False


def test_tokens_rotate_on_sighup_in_every_worker(
    grpc_server_factory: Factory, pki: Pki, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token\n")
    server = grpc_server_factory(
        process=True,
        workers=2,
        port=_free_port(),
        http_port=_free_port(),
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        auth_token_file=str(tokens),
    )
    # Each new client opens a new connection; SO_REUSEPORT spreads them over both workers.
    assert all(_accepted(server.target, pki, "old-token") for _ in range(8))
    tokens.write_text("# rotated\nnew-token\n")
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    assert _until(lambda: all(not _accepted(server.target, pki, "old-token") for _ in range(8)))
    assert all(_accepted(server.target, pki, "new-token") for _ in range(8))
    context = pki.ssl_context()
    assert post_rpc(server.http_url, context, "new-token", path="/metrics")[0] == 200
    assert post_rpc(server.http_url, context, "old-token", path="/metrics")[0] == 401
    assert server.process.poll() is None, "SIGHUP must not stop the server"
    assert server.stop() == 0
    log = server.log()
    assert log.count("reloaded 1 token(s)") == 2, log
    for secret in ("old-token", "new-token"):
        assert secret not in log


# -- command line clients and the certificate script -------------------------------------


def client_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "micrograd.server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**_clean_env(), **(env or {})},
    )


def test_eval_and_health_commands_over_mutual_tls_with_a_token(
    mutual: RunningServer, pki: Pki
) -> None:
    tls = [
        "--tls-ca",
        str(pki.ca),
        "--tls-cert",
        str(pki.client_cert),
        "--tls-key",
        str(pki.client_key),
    ]
    done = client_cli(
        "eval",
        "examples/graphs/seed.json",
        "--target",
        mutual.target,
        "--format",
        "json",
        *tls,
        env={"MICROGRAD_RPC_TOKEN": pki.token},
    )
    assert done.returncode == 0, done.stderr
    nodes = {n.get("name"): n for n in json.loads(done.stdout)["nodes"]}
    assert round(nodes["g"]["value"], 4) == SEED[0] and round(nodes["a"]["grad"], 4) == SEED[1]
    refused = client_cli(
        "eval", "examples/graphs/seed.json", "--target", mutual.target, *tls, "--token", "wrong"
    )
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    health = client_cli("health", "--target", mutual.target, *tls)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr
    no_cert = client_cli(
        "health", "--target", mutual.target, "--tls-ca", str(pki.ca), "--timeout", "3"
    )
    assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr


def test_gen_certs_makes_files_a_server_and_clients_accept(
    grpc_server_factory: Factory, tmp_path: Path
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (scripts/test installs it)")
    where = tmp_path / "secrets"
    done = subprocess.run(
        [str(ROOT / "scripts" / "gen-certs"), str(where)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (where / "server.key").stat().st_mode & 0o077 == 0
    server = grpc_server_factory(
        tls_cert=str(where / "server.pem"),
        tls_key=str(where / "server.key"),
        tls_client_ca=str(where / "ca.pem"),
        auth_token_file=str(where / "tokens"),
    )
    token = (where / "token").read_text().strip()
    with Client(
        server.target,
        tls=where / "ca.pem",
        client_certificate=where / "client.pem",
        client_key=where / "client.key",
        token=token,
    ) as client:
        assert seed_numbers(client) == SEED
    context = ssl.create_default_context(cafile=str(where / "ca.pem"))
    context.load_cert_chain(where / "client.pem", where / "client.key")
    status, _, body = post_rpc(server.http_url, context, token)
    assert status == 200 and jsonrpc_seed(body) == SEED
    again = subprocess.run(
        [str(ROOT / "scripts" / "gen-certs"), str(where)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "already holds" in again.stdout
    assert (where / "token").read_text().strip() == token


def test_draw_evaluates_on_a_server_over_tls_with_a_token(
    secured: RunningServer, pki: Pki, tmp_path: Path
) -> None:
    out = tmp_path / "seed.dot"
    args = ["draw", "examples/graphs/seed.json", "-o", str(out), "--target", secured.target,
            "--tls-ca", str(pki.ca)]
    refused = client_cli(*args)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    done = client_cli(*args, env={"MICROGRAD_RPC_TOKEN": pki.token})
    assert done.returncode == 0, done.stderr
    assert "24.7041" in out.read_text()


def test_grpcurl_lists_services_with_the_token_and_not_without(
    secured: RunningServer, pki: Pki
) -> None:
    grpcurl = shutil.which("grpcurl", path=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (the test extra has it)")
    base = [grpcurl, "-cacert", str(pki.ca)]
    refused = subprocess.run([*base, secured.target, "list"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    listed = subprocess.run(
        [*base, "-H", f"authorization: Bearer {pki.token}", secured.target, "list"],
        capture_output=True, text=True, timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "micrograd.v1.GradientService" in listed.stdout.split()
    # The token only for reflection (grpcurl's schema lookup): the health call goes without.
    health = subprocess.run(
        [*base, "-reflect-header", f"authorization: Bearer {pki.token}", secured.target,
         "grpc.health.v1.Health/Check"],
        capture_output=True, text=True, timeout=60,
    )
    assert health.returncode == 0 and '"SERVING"' in health.stdout, health.stderr


def test_health_command_in_plaintext_and_against_nothing(grpc_server: str) -> None:
    done = client_cli("health", "--target", grpc_server)
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr
    gone = client_cli("health", "--target", "127.0.0.1:1", "--timeout", "2")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr
    bad = client_cli("health", "--target", grpc_server, "--tls-ca", "/nonexistent/ca.pem")
    assert bad.returncode == 2 and "/nonexistent/ca.pem" in bad.stderr
