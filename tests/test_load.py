"""The load tool against a real server for 20 seconds: no call may fail or answer wrongly.

This is the short run of the soak recorded in docs/RELIABILITY.md (bench/load.py); it
asserts outcomes, never speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_twenty_seconds_of_mixed_load_without_an_error(tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    run = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "load.py"),
            "--processes", "2", "--inflight", "4", "--seconds", "20",
            "--json", str(report_file),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(report_file.read_text())
    assert report["errors"] == {}
    assert report["calls"] > 0
    assert set(report["kinds"]) == {
        "grpc small", "grpc big", "grpc big by id", "jsonrpc small", "jsonrpc big by id"
    }  # fmt: skip
    assert report["rss"], "the server's memory was sampled"
    assert "calls/s" in run.stdout and "errors by code: none" in run.stdout
