"""``micrograd.viz`` and ``micrograd-rpc draw``: pictures with the seed's data and gradients.

The numbers drawn are the seed document's (24.7041, 138.8338, 645.5773);
rendering runs Graphviz's real ``dot`` when it is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import graphviz
import numpy as np
import pytest
from micrograd import codec, viz
from micrograd.client import Client
from micrograd.engine import Value
from micrograd.nn import Neuron
from micrograd.tape import Tape

from tests.graphs import seed_graph

ROOT = Path(__file__).resolve().parent.parent
SEED_JSON = ROOT / "examples" / "graphs" / "seed.json"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot not installed")

RECORD = re.compile(r'^\s*(\S+) \[label="\{ (.*?) \| data (\S+) \| grad (\S+) \}"', re.M)


def records(source: str) -> dict[str, tuple[str, str, str]]:
    """Each value record of DOT ``source``: node id -> (label, data, grad)."""
    return {m[1]: (m[2], m[3], m[4]) for m in RECORD.finditer(source)}


def seed_after_backward() -> tuple[Value, Value, Value]:
    a, b, g = seed_graph()
    g.backward()
    return a, b, g


def test_draw_dot_returns_a_digraph_with_one_record_per_value() -> None:
    _a, _b, g = seed_after_backward()
    dot = viz.draw_dot(g)
    assert isinstance(dot, graphviz.Digraph)
    assert dot.format == "svg" and "rankdir=LR" in dot.source
    recs = records(dot.source)
    assert len(recs) == 33  # the seed graph's nodes, as Tape.from_value counts them
    cells = sorted(recs.values())
    assert ("add", "24.7041", "1.0000") in cells  # g, the output
    assert ("input", "-4.0000", "138.8338") in cells  # a
    assert ("input", "2.0000", "645.5773") in cells  # b


def test_draw_dot_puts_op_nodes_between_values_in_data_flow_order() -> None:
    x = Value(1.0)
    y = (x * 2 + 1).relu()
    y.backward()
    source = viz.draw_dot(y, rankdir="TB").source
    assert "rankdir=TB" in source
    ops = dict(re.findall(r'^\s*(n\d+op) \[label="?([^"\]]+)"?\]', source, re.M))
    assert sorted(ops.values()) == ["*", "+", "ReLU"]
    edges = re.findall(r"^\s*(n\d+(?:op)?) -> (n\d+(?:op)?)", source, re.M)
    # Each op node feeds its result; each argument feeds the op node: 3 results + 5 arguments.
    assert len(edges) == 8
    assert all(dst == src[:-2] for src, dst in edges if src.endswith("op"))
    assert all(dst.endswith("op") for src, dst in edges if not src.endswith("op"))
    recs = records(source)
    assert recs["n0"] == ("input", "1.0000", "2.0000")  # dy/dx = 2 where x*2+1 > 0
    assert recs["n5"] == ("relu", "3.0000", "1.0000")


def test_inputs_are_filled_and_the_output_has_a_double_border() -> None:
    _, _, g = seed_after_backward()
    source = viz.draw_dot(g).source
    assert len(re.findall(r"fillcolor=lightblue", source)) == 2  # a and b
    assert len(re.findall(r"peripheries=2", source)) == 1
    assert re.search(r'n32 \[label="\{ add \| data 24\.7041[^\n]*peripheries=2', source)


def test_micrograd_notebook_code_runs_unchanged(tmp_path: Path) -> None:
    # The trace_graph notebook builds its own trace from _prev and _op and draws a Neuron.
    nodes, edges = viz.trace(Value(1.0) * 2)
    assert len(nodes) == 3 and len(edges) == 2
    n = Neuron(2)
    x = [Value(1.0), Value(-2.0)]
    y = n(x)
    y.backward()
    dot = viz.draw_dot(y)
    assert isinstance(dot, graphviz.Digraph)
    assert all(v._op in ("", "+", "*", "ReLU") for v in viz.trace(y)[0])
    if shutil.which("dot"):
        out = dot.render(str(tmp_path / "gout"))
        assert Path(out).name == "gout.svg" and "<svg" in Path(out).read_text()


def test_a_packed_graph_with_a_service_result_draws_the_same_numbers(grpc_server: str) -> None:
    _, _, g = seed_graph()
    packed, _, _ = codec.encode_value(g, names=None)
    with Client(grpc_server) as client:
        result = client.evaluate(packed)
    local = seed_after_backward()[2]
    assert records(viz.draw_dot(packed, result=result).source) == records(
        viz.draw_dot(local).source
    )


def test_a_graph_message_with_a_jsonrpc_result_dict_is_drawn() -> None:
    _, _, g = seed_graph()
    tape, _ = Tape.from_value(g)
    graph = codec.to_graph(tape)
    values, grads = tape.evaluate()
    result = {"nodes": [0, 32], "values": [values[0], values[32]], "grads": [grads[0], 1.0]}
    recs = records(viz.draw_dot(graph, result=result).source)
    assert recs["n0"] == ("input", "-4.0000", "138.8338")
    assert recs["n32"] == ("add", "24.7041", "1.0000")
    assert recs["n5"][1:] == ("?", "?")  # not reported by the result


def test_a_binary_jsonrpc_result_is_decoded() -> None:
    import base64

    _, _, g = seed_graph()
    tape, _ = Tape.from_value(g)
    values, grads = tape.evaluate()
    result = {
        "values": [], "grads": [], "nodeCount": 33,
        "valuesF64": base64.b64encode(values.astype("<f8").tobytes()).decode(),
        "gradsF64": base64.b64encode(grads.astype("<f8").tobytes()).decode(),
    }
    recs = records(viz.draw_dot(codec.pack(tape), result=result).source)
    assert recs["n0"] == ("input", "-4.0000", "138.8338")
    assert recs["n32"] == ("add", "24.7041", "1.0000")


@pytest.mark.slow
def test_a_million_node_graph_draws_only_the_budget_and_says_what_was_left_out() -> None:
    n = 1_000_000
    code = np.full(n, 3, dtype=np.uint8)  # add(previous, input 0)
    code[0] = 1
    arg0 = np.arange(-1, n - 1, dtype=np.int32)
    arg1 = np.zeros(n, dtype=np.int32)
    arg1[0] = -1
    const = np.zeros(n)
    const[0] = 1.0
    tape = Tape.from_arrays(code, arg0, arg1, const)
    source = viz.draw_dot(tape).source
    recs = records(source)
    assert len(recs) == viz.DEFAULT_MAX_NODES
    assert f"n{n - 1}" in recs and "n0" in recs  # the output and its input, the nearest
    assert "999800 of 1000000 nodes not drawn" in source
    assert len(source) < 100_000
    around = records(viz.draw_dot(tape, max_nodes=5, focus=[500_000]).source)
    # Breadth first from node 500000: itself, its arguments, its user, then the next argument.
    assert set(around) == {f"n{i}" for i in (0, 499_998, 499_999, 500_000, 500_001)}


def test_focus_on_values_of_the_graph() -> None:
    a, _b, g = seed_after_backward()
    recs = records(viz.draw_dot(g, max_nodes=3, focus=[a]).source)
    assert len(recs) == 3 and ("input", "-4.0000", "138.8338") in recs.values()


def test_values_can_be_named_in_their_records() -> None:
    a, b, g = seed_after_backward()
    recs = records(viz.draw_dot(g, names={"a": a, "b": b, "g": g}).source)
    assert {("a", "-4.0000", "138.8338"), ("b", "2.0000", "645.5773"),
            ("g", "24.7041", "1.0000")} <= set(recs.values())


def test_bad_arguments_are_named() -> None:
    _, _, g = seed_after_backward()
    with pytest.raises(ValueError, match="rankdir"):
        viz.draw_dot(g, rankdir="RL")
    with pytest.raises(ValueError, match="max_nodes"):
        viz.draw_dot(g, max_nodes=0)
    with pytest.raises(TypeError, match="Graph/PackedGraph"):
        viz.draw_dot("not a graph")


@needs_dot
def test_the_svg_shows_the_seed_numbers() -> None:
    _, _, g = seed_after_backward()
    svg = viz.draw_dot(g).pipe(encoding="utf-8")
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for number in ("24.7041", "138.8338", "645.5773"):
        assert number in svg


def draw_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``micrograd-rpc draw`` (as ``python -m micrograd.server``) with ``args``."""
    return subprocess.run(
        [sys.executable, "-m", "micrograd.server", "draw", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        input=stdin,
    )


def test_draw_writes_dot_source_evaluated_locally(tmp_path: Path) -> None:
    out = tmp_path / "seed.dot"
    done = draw_cli(str(SEED_JSON), "-o", str(out))
    assert done.returncode == 0, done.stderr
    recs = records(out.read_text())
    assert recs["n0"] == ("a", "-4.0000", "138.8338")
    assert recs["n1"] == ("b", "2.0000", "645.5773")
    assert recs["n32"] == ("g", "24.7041", "1.0000")


def test_draw_through_the_service_gives_the_same_picture(grpc_server: str, tmp_path: Path) -> None:
    local, remote = tmp_path / "local.dot", tmp_path / "remote.dot"
    assert draw_cli(str(SEED_JSON), "-o", str(local)).returncode == 0
    done = draw_cli(str(SEED_JSON), "-o", str(remote), "--target", grpc_server, "--inputs", "a=1")
    assert done.returncode == 0, done.stderr
    recs = records(remote.read_text())
    a, _b, g = seed_graph(1.0, 2.0)
    g.backward()
    assert recs["n0"] == ("a", "1.0000", f"{a.grad:.4f}")
    assert recs["n32"] == ("g", f"{g.data:.4f}", "1.0000")
    done = draw_cli(str(SEED_JSON), "-o", str(remote), "--target", grpc_server)
    assert records(remote.read_text()) == records(local.read_text())


def test_draw_reads_stdin_and_limits_nodes(tmp_path: Path) -> None:
    out = tmp_path / "small.dot"
    done = draw_cli("-", "-o", str(out), "--max-nodes", "4", stdin=SEED_JSON.read_text())
    assert done.returncode == 0, done.stderr
    assert len(records(out.read_text())) == 4
    assert "29 of 33 nodes not drawn" in out.read_text()


@needs_dot
def test_draw_renders_svg_and_png(tmp_path: Path) -> None:
    svg, png = tmp_path / "seed.svg", tmp_path / "seed.png"
    assert draw_cli(str(SEED_JSON), "-o", str(svg)).returncode == 0
    assert "138.8338" in svg.read_text()
    assert draw_cli(str(SEED_JSON), "-o", str(png)).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_rejects_bad_input_precisely(tmp_path: Path) -> None:
    done = draw_cli(str(SEED_JSON), "-o", str(tmp_path / "x.jpg"))
    assert done.returncode == 2 and ".svg, .png or .dot" in done.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [{"op": "OP_ADD", "args": [0, 1]}]}')
    done = draw_cli(str(bad), "-o", str(tmp_path / "x.dot"))
    assert done.returncode == 2 and "node 0" in done.stderr
    done = draw_cli(str(SEED_JSON), "-o", str(tmp_path / "x.dot"), "--max-nodes", "0")
    assert done.returncode == 2 and "--max-nodes" in done.stderr
