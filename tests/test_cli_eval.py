"""``micrograd-rpc eval``: a JSON graph evaluated on a real loopback server, printed.

The expected numbers are the seed document's (24.7041, 138.8338, 645.5773)
and, in full precision, the local ``Value.backward`` of the same graph.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from google.protobuf import json_format
from micrograd.v1 import gradient_service_pb2 as pb

from tests.graphs import seed_graph

ROOT = Path(__file__).resolve().parent.parent
SEED_JSON = ROOT / "examples" / "graphs" / "seed.json"


def eval_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``micrograd-rpc eval`` (as ``python -m micrograd.server``) with ``args``."""
    return subprocess.run(
        [sys.executable, "-m", "micrograd.server", "eval", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def seed_backward(a0: float, b0: float) -> tuple[float, float, float]:
    """``(g, dg/da, dg/db)`` of the seed expression, by the local engine."""
    a, b, g = seed_graph(a0, b0)
    g.backward()
    return g.data, a.grad, b.grad


def rows_by_name(table: str) -> dict[str, list[str]]:
    """The cells of each named row of the printed table."""
    rows = {}
    for line in table.splitlines():
        cells = line.split()
        if len(cells) == 5 and cells[0].isdigit():
            rows[cells[1]] = cells
    return rows


def test_eval_prints_the_seed_numbers_by_name(grpc_server: str) -> None:
    done = eval_cli(str(SEED_JSON), "--target", grpc_server)
    assert done.returncode == 0, done.stderr
    rows = rows_by_name(done.stdout)
    assert rows["a"][2:] == ["input", "-4.0000", "138.8338"]
    assert rows["b"][2:] == ["input", "2.0000", "645.5773"]
    assert rows["g"][2:] == ["add", "24.7041", "1.0000"]
    assert len(done.stdout.splitlines()) == 1 + 33 + 1  # header, one line per node, output line
    assert "output: node 32 (g)" in done.stdout


def test_eval_json_gives_full_precision_and_inputs_override(grpc_server: str) -> None:
    done = eval_cli(
        str(SEED_JSON), "--target", grpc_server, "--inputs", "a=1.5,b=-0.5", "--format", "json"
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    by_name = {node["name"]: node for node in doc["nodes"] if "name" in node}
    g, da, db = seed_backward(1.5, -0.5)
    assert (by_name["g"]["value"], by_name["a"]["grad"], by_name["b"]["grad"]) == (g, da, db)
    assert doc["output"] == 32 and doc["nodeCount"] == 33 and doc["rows"] == 1


def test_eval_reads_a_whole_evaluate_request(grpc_server: str, tmp_path: Path) -> None:
    graph = json.loads(SEED_JSON.read_text())
    request = {"graph": graph, "selection": "SELECTION_NAMED", "inputs": {"b": 3.0}}
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    json_format.ParseDict(request, pb.EvaluateRequest())  # it is a valid EvaluateRequest
    done = eval_cli(str(path), "--target", grpc_server, "--format", "json")
    assert done.returncode == 0, done.stderr
    nodes = json.loads(done.stdout)["nodes"]
    g, da, db = seed_backward(-4.0, 3.0)
    assert [(n["name"], n["value"], n["grad"]) for n in nodes] == [
        ("a", -4.0, da),
        ("b", 3.0, db),
        ("g", g, 1.0),
    ]


def test_eval_output_flag_differentiates_another_node(grpc_server: str) -> None:
    done = eval_cli(str(SEED_JSON), "--target", grpc_server, "--output", "0", "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["output"] == 0
    assert [n["grad"] for n in doc["nodes"][:2]] == [1.0, 0.0]


def test_eval_reports_a_rejected_graph_with_its_field(grpc_server: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps({"nodes": [{"op": "OP_INPUT", "name": "x"}, {"op": "OP_ADD", "args": [0, 7]}]})
    )
    done = eval_cli(str(path), "--target", grpc_server)
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "graph.nodes[1].args[1]" in done.stderr


def test_eval_rejects_a_file_that_is_not_a_graph(tmp_path: Path) -> None:
    path = tmp_path / "nonsense.json"
    path.write_text('{"nodes": [{"op": "OP_TELEPORT"}]}')
    done = eval_cli(str(path), "--inputs", "a=1")
    assert done.returncode == 2 and "OP_TELEPORT" in done.stderr
