"""docs/API.md's JSON examples are what a real server returns, call for call.

Each documented request is read from the doc itself (the placeholder for the
seed graph becomes examples/graphs/seed.json), sent to a loopback server's
JSON-RPC endpoint, and the answer compared with the documented response.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningServer

ROOT = Path(__file__).resolve().parent.parent
API = (ROOT / "docs" / "API.md").read_text()
SEED = (ROOT / "examples" / "graphs" / "seed.json").read_text()
PLACEHOLDERS = ('{"nodes": [ ...the seed graph... ]}', "{...seed...}")


def parse(text: str) -> Any:
    """A documented JSON text with the seed graph's placeholder filled in."""
    for placeholder in PLACEHOLDERS:
        text = text.replace(placeholder, SEED)
    return json.loads(text)


def blocks_after(anchor: str, count: int) -> list[str]:
    """The first ``count`` ```json blocks after ``anchor`` in the doc."""
    assert anchor in API, anchor
    return re.findall(r"```json\n(.*?)```", API.split(anchor, 1)[1], re.S)[:count]


def inline_after(anchor: str) -> str:
    """The first inline code span holding a JSON object after ``anchor``."""
    assert anchor in API, anchor
    m = re.search(r"`(\{.*?\})`", API.split(anchor, 1)[1], re.S)
    assert m is not None, anchor
    return m[1]


@pytest.fixture(scope="module")
def call(
    grpc_server_factory: Callable[..., RunningServer],
) -> Callable[[str, Any], Any]:
    """``call(method, params)``: the ``result`` of one JSON-RPC call to a fresh server."""
    running = grpc_server_factory()

    def rpc(method: str, params: Any) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        request = urllib.request.Request(
            running.http_url + "/rpc", data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        assert "error" not in answer, answer
        return answer["result"]

    return rpc


@pytest.fixture(scope="module")
def grpc_server_factory() -> Any:  # module-scoped twin of the conftest fixture
    from tests.conftest import start_in_process

    started: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        running = start_in_process(**overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def test_no_shortened_ids_in_the_doc() -> None:
    assert not re.search(r"sha256:[0-9a-f]*…", API)
    ids = set(re.findall(r"sha256:[0-9a-f]{16,}", API))  # (sha256:0000 is a made-up unknown id)
    assert ids and all(len(i) == len("sha256:") + 64 for i in ids)


def test_evaluate_example(call: Callable[[str, Any], Any]) -> None:
    request, response = blocks_after("Request (`params` of JSON-RPC method `Evaluate`):", 2)
    assert call("Evaluate", parse(request)) == parse(response)


def test_evaluate_batch_example(call: Callable[[str, Any], Any]) -> None:
    call("RegisterGraph", {"graph": json.loads(SEED)})
    request, response = blocks_after("A batch of three bindings", 2)
    assert call("Evaluate", parse(request)) == parse(response)


def test_evaluate_stream_example(call: Callable[[str, Any], Any]) -> None:
    request = inline_after("Request: ")
    (lines,) = blocks_after("Response (one message per line):", 1)
    expected = [json.loads(line) for line in lines.splitlines() if line.strip()]
    assert call("EvaluateStream", parse(request)) == expected


def test_register_then_evaluate_by_id_examples(call: Callable[[str, Any], Any]) -> None:
    request = re.search(r"Request `(\{.*?\})`, response:", API)[1]  # type: ignore[index]
    (registered,) = blocks_after("Request `" + request + "`, response:", 1)
    assert call("RegisterGraph", parse(request)) == parse(registered)
    anchor = "Then `Evaluate` with "
    (answer,) = blocks_after(anchor, 1)
    assert call("Evaluate", parse(inline_after(anchor))) == parse(answer)


def test_server_info_example(call: Callable[[str, Any], Any]) -> None:
    (shown,) = blocks_after("### GetServerInfo", 1)
    doc = parse(shown)
    info = call("GetServerInfo", {})
    assert info["version"] == doc["version"] and info["limits"] == doc["limits"]
    assert info["ops"][: len(doc["ops"])] == doc["ops"]
    assert {k: v for k, v in info.items() if k not in ("ops", "kernel")} == {
        k: v for k, v in doc.items() if k not in ("ops", "kernel")
    }


@pytest.mark.parametrize("method", ["Jacobian", "HessianVectorProduct"])
def test_jacobian_and_hvp_examples(call: Callable[[str, Any], Any], method: str) -> None:
    request, response = blocks_after(f"Request (`params` of JSON-RPC method `{method}`)", 2)
    assert call(method, parse(request)) == parse(response)
