"""The fuzz targets run briefly in every test run, and what fuzzing found stays fixed.

``fuzz/grpc_request.py`` (request bytes -> decoder -> validation -> kernel) and
``fuzz/jsonrpc.py`` (body -> JSON parsing -> params mapping) are atheris targets; the
long runs (a million inputs each) are recorded in docs/RELIABILITY.md. Here each runs for
a few seconds from its seeds, and every input in ``tests/fuzz_regressions/`` is replayed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = ROOT / "tests" / "fuzz_regressions"

pytest.importorskip("atheris")


@pytest.mark.parametrize("target", ["grpc_request", "jsonrpc"])
def test_fuzz_target_runs_seconds_without_a_finding(target: str, tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable, str(ROOT / "fuzz" / f"{target}.py"),
            "-max_total_time=4", "-max_len=4096", "-timeout=10",
            f"-artifact_prefix={tmp_path}/", str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done" in run.stderr
    assert not list(tmp_path.glob("crash-*"))


@pytest.mark.parametrize("found", sorted(REGRESSIONS.glob("*")), ids=lambda p: p.name)
def test_fuzz_finding_stays_fixed(found: Path) -> None:
    target = found.name.split("-", 1)[0]
    target = {"grpc": "grpc_request"}.get(target, target)
    run = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / f"{target}.py"), str(found)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_unpaired_surrogate_in_an_enum_name_is_invalid_params() -> None:
    # Found by fuzz/jsonrpc.py: json_format's enum lookup failed with SystemError (HTTP 500).
    from micrograd.server.config import Settings
    from micrograd.server.jsonrpc import JsonRpc
    from micrograd.server.service import GradientService

    rpc = JsonRpc(GradientService(Settings(workers=1)))
    body = b'{"jsonrpc":"2.0","method":"Evaluate","id":1,"params":{"selection":"\\ud800"}}'
    answer = json.loads(asyncio.run(rpc.handle(body)) or b"null")
    assert answer["error"]["code"] == -32602
    assert "unpaired surrogate" in answer["error"]["message"]
