"""The Node.js client (``client/node/seed.js``) against a real server: the seed's three numbers.

The client loads the repository's ``.proto`` files with ``@grpc/proto-loader``
and calls ``Evaluate`` with ``@grpc/grpc-js``; expected output is the seed
document's 24.7041, 138.8338 and 645.5773, in plaintext and over mutual TLS
with a bearer token. The npm packages come from the
root ``package-lock.json`` (``scripts/test`` installs them; this test runs
``npm ci`` itself when they are missing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tests.pki import make_pki

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "client" / "node" / "seed.js"
SEED_NUMBERS = ["24.7041", "138.8338", "645.5773"]
"""g, dg/da and dg/db of the seed document, to 4 decimals."""

_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader")


@pytest.fixture(scope="module")
def node() -> str:
    """The ``node`` executable, with the client's npm packages installed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (CI machines have it; apt-get install nodejs npm)")
    missing = [p for p in _PACKAGES if not (ROOT / "node_modules" / p / "package.json").exists()]
    if missing:
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip(f"npm is not installed, and {', '.join(missing)} are missing")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=ROOT,
            check=True,
            timeout=300,
        )
    return node


def run_seed(node: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """Run the Node.js client; its stdout lines (the test fails on a non-zero exit)."""
    done = subprocess.run(
        [node, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_node_client_prints_the_seed_numbers(node: str, grpc_server: str) -> None:
    assert run_seed(node, grpc_server) == SEED_NUMBERS


def test_node_client_takes_its_target_from_the_environment(node: str, grpc_server: str) -> None:
    assert run_seed(node, env={"MICROGRAD_RPC_TARGET": grpc_server}) == SEED_NUMBERS


def test_node_client_reports_an_unreachable_server(node: str) -> None:
    done = subprocess.run(
        [node, str(SCRIPT), "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and "Evaluate failed" in done.stderr


def test_node_client_over_tls_with_a_token(
    node: str, grpc_server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    server = grpc_server_factory(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca), auth_token_file=str(pki.tokens),
    )
    env = {
        "MICROGRAD_RPC_TLS_CA": str(pki.ca),
        "MICROGRAD_RPC_TLS_CLIENT_CERT": str(pki.client_cert),
        "MICROGRAD_RPC_TLS_CLIENT_KEY": str(pki.client_key),
        "MICROGRAD_RPC_TOKEN": pki.token,
    }
    assert run_seed(node, server.target, env=env) == SEED_NUMBERS
    wrong = subprocess.run(
        [node, str(SCRIPT), server.target], capture_output=True, text=True, timeout=60,
        env={**os.environ, **env, "MICROGRAD_RPC_TOKEN": "wrong"}, check=False,
    )
    assert wrong.returncode == 1 and "Evaluate failed: 16" in wrong.stderr  # UNAUTHENTICATED
