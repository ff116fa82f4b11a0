"""Rough edges a newcomer hit, each fixed and kept fixed: eval's help and flags, the names= hint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from micrograd.client import Client
from micrograd.engine import Value

from tests.graphs import seed_graph

ROOT = Path(__file__).resolve().parent.parent
SEED_JSON = ROOT / "examples" / "graphs" / "seed.json"


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``micrograd-rpc`` (as ``python -m micrograd.server``) with ``args``."""
    return subprocess.run(
        [sys.executable, "-m", "micrograd.server", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, input=stdin,
    )


def test_eval_help_is_clean_text_with_defaults_and_every_flag_described() -> None:
    done = cli("eval", "--help")
    assert done.returncode == 0
    text = done.stdout
    assert "``" not in text and "add_eval_parser" not in text
    assert "(default 127.0.0.1:50051)" in text
    fmt = text.split("--format", 1)[1].split("\n  --", 1)[0]
    assert "table" in fmt and "camelCase" in fmt
    assert "'-' reads standard input" in " ".join(text.split())


def test_eval_dash_reads_standard_input(grpc_server: str) -> None:
    done = cli("eval", "-", "--target", grpc_server, stdin=SEED_JSON.read_text())
    assert done.returncode == 0, done.stderr
    assert "24.7041" in done.stdout and "138.8338" in done.stdout and "645.5773" in done.stdout


def test_eval_json_uses_jsonrpc_camel_case(grpc_server: str) -> None:
    done = cli("eval", str(SEED_JSON), "--target", grpc_server, "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert {"graphId", "nodeCount", "output", "rows", "nodes"} <= set(doc)
    assert "graph_id" not in doc and "node_count" not in doc
    assert doc["graphId"].startswith("sha256:") and len(doc["graphId"]) == 7 + 64


def test_binding_a_value_graph_by_name_hints_at_names(grpc_server: str) -> None:
    a, _b, g = seed_graph()
    with Client(grpc_server) as client:
        with pytest.raises(ValueError, match=r"no input is named 'a'.*names=") as info:
            client.evaluate(g, inputs={"a": 2.0})
        assert "names={'a': a}" in str(info.value)
        result = client.evaluate(g, inputs={"a": 2.0}, names={"a": a})
    _again_a, _, again = seed_graph(2.0, 2.0)
    again.backward()
    assert result.values[-1] == pytest.approx(again.data, rel=1e-15)
    assert isinstance(a, Value)
