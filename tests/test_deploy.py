"""Deployment as shipped: the compose file, the image recipe, and nginx in front of replicas.

``scripts/test-containers`` builds the image and runs the compose stack with
podman (that is where containers are tested). Here, without containers: the
compose file is validated by docker-compose itself and read for its
replicas, registry, secrets and healthchecks; nginx's limits are checked
against the server's defaults; and scale-out is tested for real with two
replica processes behind a real nginx running the repository's own
``deploy/nginx.conf`` (only the addresses and file paths change: the compose
service names become 127.0.0.1 ports, the TLS certificate one made for the
test). ``scripts/test`` installs nginx and docker-compose; a test that needs
one is skipped, saying why, only where it cannot be had.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import json_format
from micrograd import codec
from micrograd.server.config import Settings
from micrograd.server.grpc_server import PID_METADATA
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer
from tests.graphs import seed_graph

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (scripts/test installs it)"
)
COMPOSE = shutil.which("docker-compose")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_config(replicas: list[RunningServer], grpc_port: int, http_port: int, where: Path) -> str:
    """``deploy/nginx.conf`` with its upstreams, listeners and files moved onto loopback.

    Its TLS files (``scripts/gen-certs``'s) are expected in ``where``.
    """
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    grpc_servers = " ".join(f"server {r.target};" for r in replicas)
    http_servers = " ".join(f"server 127.0.0.1:{r.http_port};" for r in replicas)
    edits = [
        (r"(\s*server gradient-\d+:50051[^;]*;)+", "\n" + grpc_servers),
        (r"(\s*server gradient-\d+:8080[^;]*;)+", "\n" + http_servers),
        (r"listen 50051 ssl http2;", f"listen 127.0.0.1:{grpc_port} ssl http2;"),
        (r"listen 8080 ssl;", f"listen 127.0.0.1:{http_port} ssl;"),
        (r"error_log [^;]*;", f"error_log {where}/error.log warn;\npid {where}/nginx.pid;"),
        (r"access_log [^;]*;", "access_log off;"),
    ]
    for pattern, replacement in edits:
        text, count = re.subn(pattern, replacement, text)
        assert count == 1, f"deploy/nginx.conf no longer has {pattern!r}"
    text, count = re.subn(r" /etc/nginx/tls/", f" {where}/", text)
    assert count == 8, "deploy/nginx.conf's TLS files moved"
    temp = "".join(
        f"    {name}_temp_path {where}/{name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", f"http {{\n{temp}", 1)
    return "user root;\n" + text


@pytest.fixture
def balanced(
    grpc_server_factory: Callable[..., RunningServer], tmp_path: Path
) -> Iterator[tuple[str, str, list[RunningServer], bytes, str]]:
    """Two replicas and nginx in front, secured as the compose stack is (SECURITY.md): TLS
    to nginx, TLS with nginx's client certificate to the replicas, tokens checked there.

    Yields (grpc target, https url, replicas, CA certificate, token).
    """
    subprocess.run(
        [str(ROOT / "scripts" / "gen-certs"), str(tmp_path)], check=True, capture_output=True
    )
    security = {
        "tls_cert": str(tmp_path / "server.pem"),
        "tls_key": str(tmp_path / "server.key"),
        "tls_client_ca": str(tmp_path / "ca.pem"),
        "auth_token_file": str(tmp_path / "tokens"),
    }
    replicas = [grpc_server_factory(process=True, http_port=0, **security) for _ in range(2)]
    grpc_port, http_port = free_port(), free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(local_config(replicas, grpc_port, http_port, tmp_path))
    assert NGINX is not None
    test = subprocess.run([NGINX, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    proc = subprocess.Popen(
        [NGINX, "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", grpc_port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.05)
        ca = (tmp_path / "ca.pem").read_bytes()
        token = (tmp_path / "token").read_text().strip()
        yield f"127.0.0.1:{grpc_port}", f"https://127.0.0.1:{http_port}", replicas, ca, token
    finally:
        proc.terminate()
        proc.wait(10)


@needs_nginx
def test_nginx_spreads_grpc_calls_over_both_replicas(
    balanced: tuple[str, str, list[RunningServer], bytes, str],
) -> None:
    target, _, replicas, ca, token = balanced
    auth = (("authorization", f"Bearer {token}"),)
    pids: set[str] = set()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(target, credentials) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        for _ in range(20):  # round robin: 20 calls reach both
            _, call = stub.GetServerInfo.with_call(
                pb.GetServerInfoRequest(), timeout=10, metadata=auth
            )
            pids.update(v for k, v in call.trailing_metadata() if k == PID_METADATA)
        a, b, g = seed_graph()
        packed, tape, _ = codec.encode_value(g, {"a": a, "b": b})
        reply = stub.Evaluate(
            pb.EvaluateRequest(packed_graph=packed, binary_output=True), metadata=auth
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    values, grads = codec.response_arrays(reply)
    assert pids == {str(r.pid) for r in replicas}
    assert f"{values[-1]:.4f}" == "24.7041"
    assert (f"{grads[tape.names['a']]:.4f}", f"{grads[tape.names['b']]:.4f}") == (
        "138.8338",
        "645.5773",
    )


@needs_nginx
def test_nginx_proxies_json_rpc_and_readiness(
    balanced: tuple[str, str, list[RunningServer], bytes, str],
) -> None:
    _, url, _, ca, token = balanced
    context = ssl.create_default_context(cadata=ca.decode())
    a, b, g = seed_graph()
    _, tape, _ = codec.encode_value(g, {"a": a, "b": b})
    params = {
        "graph": json_format.MessageToDict(codec.to_graph(tape)),
        "selection": "SELECTION_NAMED",
    }
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "Evaluate", "params": params})
    request = urllib.request.Request(
        f"{url}/rpc",
        data=body.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        result = json.loads(response.read())["result"]
    grads = {name: result["grads"][position] for name, position in result["names"].items()}
    assert (f"{grads['a']:.4f}", f"{grads['b']:.4f}") == ("138.8338", "645.5773")
    with urllib.request.urlopen(f"{url}/readyz", timeout=10, context=context) as response:
        assert response.status == 200


@pytest.mark.skipif(
    COMPOSE is None, reason="docker-compose is not installed (scripts/test installs it)"
)
def test_compose_file_is_valid() -> None:
    assert COMPOSE is not None
    done = subprocess.run(
        [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr


def compose_file() -> dict[str, Any]:
    """docker-compose.yml, parsed, with ``${VAR:-default}`` replaced by its default."""
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", (ROOT / "docker-compose.yml").read_text())
    return dict(yaml.safe_load(text))


def nginx_setting(name: str, text: str) -> list[str]:
    """Every value of directive ``name`` in nginx configuration ``text``."""
    return [m.group(1).strip() for m in re.finditer(rf"^\s*{name}\s+([^;]*);", text, re.M)]


def test_image_recipe_matches_the_tree_and_the_server_defaults() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            for source in parts[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is missing"
    defaults = Settings(workers=1)
    exposed = re.search(r"^EXPOSE (.+)$", dockerfile, re.M)
    assert exposed is not None
    assert exposed.group(1).split() == [str(defaults.port), str(defaults.http_port)]
    assert re.search(r"^HEALTHCHECK ", dockerfile, re.M), "the image has no HEALTHCHECK"
    assert re.search(r"^USER \d+$", dockerfile, re.M), "a numeric non-root USER (runAsNonRoot)"
    nginx = compose_file()["services"]["nginx"]
    assert nginx["ports"] == [
        f"127.0.0.1:{defaults.port}:{defaults.port}",
        f"127.0.0.1:{defaults.http_port}:{defaults.http_port}",
    ]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]


def test_compose_runs_three_replicas_redis_and_nginx_with_healthchecks() -> None:
    services = compose_file()["services"]
    replicas = sorted(name for name in services if name.startswith("gradient-"))
    assert replicas == ["gradient-1", "gradient-2", "gradient-3"]
    for name in replicas:
        service = services[name]
        assert service["image"] == services["gradient-1"]["image"]
        assert service["healthcheck"]["test"][0] == "CMD"
        grace = float(service["environment"].get("MICROGRAD_RPC_GRACE_PERIOD", 10))
        assert float(service["stop_grace_period"].rstrip("s")) > grace
        assert "ports" not in service, "replicas are reached through nginx only"
        for variable in service["environment"]:
            assert variable.removeprefix("MICROGRAD_RPC_").lower() in Settings.__dataclass_fields__
    redis = services["redis"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "allkeys-lru" in redis["command"] and "--maxmemory" in redis["command"]
    assert set(services["nginx"]["depends_on"]) == set(replicas)
    # TLS ends at nginx; the replicas check the bearer token of every call.
    mounts = [v.split(":")[1] for v in services["nginx"]["volumes"]]
    assert {"/etc/nginx/tls/server.pem", "/etc/nginx/tls/server.key"} <= set(mounts)
    for name in replicas:
        tokens = services[name]["environment"]["MICROGRAD_RPC_AUTH_TOKEN_FILE"]
        assert any(v.endswith(f":{tokens}:ro") for v in services[name]["volumes"])
        assert services[name]["environment"]["MICROGRAD_RPC_GRAPH_STORE"] == "redis://redis:6379/0"
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    for port in ("50051", "8080"):
        named = re.findall(rf"server (gradient-\d+):{port}\b", conf)
        assert sorted(named) == replicas, f"nginx.conf's upstreams on {port} are not the replicas"


def test_nginx_limits_match_the_server_limits() -> None:
    """Bodies the server accepts pass nginx; gRPC retries on another replica when one fails."""
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    defaults = Settings(workers=1)
    sizes = nginx_setting("client_max_body_size", conf)
    assert sizes == [
        f"{defaults.max_message_bytes >> 20}m",
        f"{defaults.http_max_body_bytes >> 20}m",
    ]
    assert nginx_setting("listen", conf) == [
        f"{defaults.port} ssl http2",
        f"{defaults.http_port} ssl",
    ]
    (retry,) = nginx_setting("grpc_next_upstream", conf)
    assert retry.startswith("error timeout") and "http_502" in retry and "http_503" in retry
    for name in ("grpc_read_timeout", "grpc_send_timeout", "proxy_read_timeout"):
        (value,) = nginx_setting(name, conf)
        assert int(value.rstrip("s")) > defaults.grace_period
    assert "$upstream_addr" in conf, "the access log names the replica of each call"


def test_the_whole_suite_runs_the_container_stage_before_pytest() -> None:
    script = (ROOT / "scripts" / "test").read_text()
    assert script.index("./scripts/test-containers") < script.index("-m pytest")
    stage = (ROOT / "scripts" / "test-containers").read_text()
    assert "-f docker-compose.yml" in stage and "-f docker-compose.override" not in stage
    assert "tests.compose_stack" in stage


@pytest.mark.skipif(
    shutil.which("setpriv") is None or not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root and setpriv to run the script as an unprivileged user",
)
def test_the_container_stage_says_loudly_when_it_cannot_run_and_lets_the_suite_go_on() -> None:
    """As a user who cannot run rootful podman, the script exits 0 with a banner."""
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "bash",
            str(ROOT / "scripts" / "test-containers"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    assert "CONTAINER TESTS NOT RUN" in done.stdout and "#####" in done.stdout
