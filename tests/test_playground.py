"""The playground page at ``GET /``, driven in a real headless Chromium over the DevTools protocol.

The default example must show the seed's numbers (24.7041, 138.8338,
645.5773); an edited input must show what the service computes for it; an
invalid program must show its error inline. Chromium is Debian's
``chromium`` (scripts/apt.d/viz.txt); without it the browser tests skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from micrograd.client import Client
from micrograd.client.cli import read_request
from micrograd.server import playground

from tests.conftest import RunningServer

SEED_JSON = Path(__file__).resolve().parent.parent / "examples" / "graphs" / "seed.json"

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


def get(url: str) -> tuple[int, str, str]:
    """``(status, content type, body)`` of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def test_the_page_and_its_files_are_served_from_the_package(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    running = grpc_server_factory()
    status, kind, body = get(running.http_url + "/")
    assert status == 200 and kind.startswith("text/html")
    assert '<script src="playground/playground.js">' in body
    assert not re.search(r"https?://", body.replace("http://www.w3.org", ""))  # no CDN
    status, kind, script = get(running.http_url + "/playground/playground.js")
    assert status == 200 and kind.startswith("text/javascript")
    assert script.encode() == playground.asset("playground.js")
    assert not re.search(r"\beval\s*\(|new Function|https?://(?!www\.w3\.org)", script)
    assert get(running.http_url + "/playground/playground.css")[0] == 200


def test_no_playground_turns_the_page_off(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    running = grpc_server_factory(playground=False)
    assert get(running.http_url + "/")[0] == 404
    assert get(running.http_url + "/healthz")[0] == 200


def test_the_playground_setting_from_flag_and_environment() -> None:
    from micrograd.server import cli, config

    assert config.Settings().playground is True
    args = cli.build_parser().parse_args(["serve", "--no-playground"])
    assert config.from_sources(args, environ={}).playground is False
    assert config.from_sources(None, {"MICROGRAD_RPC_PLAYGROUND": "false"}).playground is False
    assert config.from_sources(None, {"MICROGRAD_RPC_NO_PLAYGROUND": "1"}).playground is False
    assert config.from_sources(None, {"MICROGRAD_RPC_NO_PLAYGROUND": "0"}).playground is True
    with pytest.raises(config.SettingsError, match="MICROGRAD_RPC_NO_PLAYGROUND"):
        config.from_sources(None, {"MICROGRAD_RPC_NO_PLAYGROUND": "maybe"})
    on = cli.build_parser().parse_args(["serve", "--playground"])
    assert config.from_sources(on, {"MICROGRAD_RPC_NO_PLAYGROUND": "1"}).playground is True


def test_the_page_forbids_eval_and_foreign_scripts(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    running = grpc_server_factory()
    with urllib.request.urlopen(running.http_url + "/", timeout=10) as response:
        policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-eval" not in policy


class Page:
    """One Chromium tab, driven over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        for _ in range(10_000):  # bounded: events may arrive before the answer
            message = await asyncio.wait_for(self.ws.receive_json(), 30)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message["result"])
        raise RuntimeError(f"no answer to {method}")

    async def js(self, expression: str) -> Any:
        answer = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def wait_for(self, expression: str, tries: int = 300) -> Any:
        """The first truthy value of ``expression``, polled every 50 ms (bounded)."""
        guarded = f"(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()"
        for _ in range(tries):
            value = await self.js(guarded)
            if value:
                return value
            await asyncio.sleep(0.05)
        seen = await self.js(
            "(() => { try { return document.getElementById('status').textContent + ' | ' +"
            " document.getElementById('error').textContent + ' | ' +"
            " document.getElementById('output-value').textContent; }"
            " catch (e) { return String(e); } })()"
        )
        raise AssertionError(f"never true in the page: {expression}; the page shows: {seen}")


@pytest.fixture(scope="module")
def chromium() -> Iterator[str]:
    """The DevTools websocket URL of a headless Chromium (stopped afterwards)."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed")
    profile = tempfile.mkdtemp(prefix="playground-profile-")
    argv = [
        CHROMIUM,
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    if os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        url = None
        for _ in range(500):  # bounded: a few lines of startup chatter before the URL
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            pytest.skip("chromium did not start its DevTools endpoint")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
        shutil.rmtree(profile, ignore_errors=True)


async def open_page(browser_url: str, page_url: str, session: aiohttp.ClientSession) -> Page:
    """A new tab showing ``page_url``."""
    host = re.match(r"ws://([^/]+)/", browser_url).group(1)  # type: ignore[union-attr]
    async with session.put(f"http://{host}/json/new?{page_url}") as response:
        target = json.loads(await response.text())
    ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
    page = Page(ws)
    await page.send("Runtime.enable")
    return page


def service_numbers(target: str, a: float, b: float) -> tuple[str, str, str]:
    """``(g, dg/da, dg/db)`` of the seed graph as the service computes them, 4 decimals."""
    request = read_request(SEED_JSON.read_text())
    request.inputs["a"], request.inputs["b"] = a, b
    with Client(target) as client:
        r = client.send(request)
    return f"{r['g'][0]:.4f}", f"{r['a'][1]:.4f}", f"{r['b'][1]:.4f}"


OUTPUT = "document.getElementById('output-value').textContent"
GRADS = (
    "JSON.stringify([...document.querySelectorAll('#inputs tbody tr')]"
    ".map(tr => [tr.dataset.input, tr.querySelector('.grad').textContent]))"
)
ERROR = "!document.getElementById('error').hidden && document.getElementById('error').textContent"


@needs_chromium
def test_the_playground_shows_the_seed_then_follows_an_edited_input(
    chromium: str, grpc_server_factory: Callable[..., RunningServer]
) -> None:
    running = grpc_server_factory()

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            page = await open_page(chromium, running.http_url + "/", session)
            try:
                assert await page.wait_for(f"{OUTPUT} === '24.7041' && {OUTPUT}")
                grads = json.loads(await page.js(GRADS))
                assert grads == [["a", "138.8338"], ["b", "645.5773"]]
                # Every value node of the drawing carries its data and grad.
                drawn = await page.js(
                    "JSON.stringify([...document.querySelectorAll('#graph g.value')]"
                    ".map(g => [g.querySelector('.data').textContent,"
                    " g.querySelector('.grad').textContent]))"
                )
                cells = json.loads(drawn)
                assert len(cells) >= 30
                assert ["data 24.7041", "grad 1.0000"] in cells
                assert ["data -4.0000", "grad 138.8338"] in cells
                assert all(re.fullmatch(r"data -?\d+\.\d{4}", d) for d, _ in cells)
                assert all(re.fullmatch(r"grad -?\d+\.\d{4}", g) for _, g in cells)

                # Change input a: the page re-evaluates through the service.
                await page.js(
                    "(() => { const box = document.querySelector('#inputs input[name=a]');"
                    " box.value = '1.5'; box.dispatchEvent(new Event('change')); })()"
                )
                g, da, db = service_numbers(running.target, 1.5, 2.0)
                assert await page.wait_for(f"{OUTPUT} === {g!r}")
                assert json.loads(await page.js(GRADS)) == [["a", da], ["b", db]]
                assert g != "24.7041"

                # A typo is reported with its line, and nothing is evaluated.
                await page.js(
                    "document.getElementById('program').value = 'a = Value(2.0)\\nb = a +* 3';"
                    "document.getElementById('evaluate').click()"
                )
                message = await page.wait_for(ERROR)
                assert message.startswith("line 2:"), message

                # An op this server does not have: the service's own message, inline.
                await page.js(
                    "document.getElementById('program').value = 'a = Value(2.0)\\nb = a.cotanh()';"
                    "document.getElementById('evaluate').click()"
                )
                message = await page.wait_for(
                    f"({ERROR}) && ({ERROR}).includes('OP_COTANH') && ({ERROR})"
                )
                assert message.startswith("line 2:") and "micrograd.v1.Op" in message, message
            finally:
                await page.ws.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_with_tokens_on_the_page_is_behind_the_token(
    grpc_server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("playground-secret-token-0123456789\n")
    running = grpc_server_factory(auth_token_file=str(tokens))
    assert get(running.http_url + "/")[0] == 401
    assert get(running.http_url + "/playground/playground.js")[0] == 401
    request = urllib.request.Request(
        running.http_url + "/",
        headers={"Authorization": "Bearer playground-secret-token-0123456789"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and b"playground.js" in response.read()


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_parser_takes_its_methods_from_the_servers_op_table() -> None:
    # The op list as GetServerInfo's JSON-RPC result gives it, with two ops no table has yet.
    script = Path(__file__).resolve().parent.parent / "server" / "playground" / "playground.js"
    ops = [
        {"op": "OP_INPUT", "name": "input", "arity": 0}, {"op": "OP_CONST", "name": "const"},
        {"op": "OP_ADD", "name": "add", "arity": 2}, {"op": "OP_MUL", "name": "mul", "arity": 2},
        {"op": "OP_SOFTPLUS", "name": "softplus", "arity": 1},  # an op added to the table later
        {"op": "OP_HYPOT", "name": "hypot", "arity": 2},
    ]
    program = "x = Value(2.0)\ny = (x * 3).softplus().hypot(x + 1)"
    code = (f"const p = require({json.dumps(str(script))});"
            f"console.log(JSON.stringify(p.parseProgram({json.dumps(program)}, "
            f"{json.dumps(ops)})))")
    done = subprocess.run([NODE, "-e", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    parsed = json.loads(done.stdout)
    assert parsed["nodes"] == [
        {"op": "OP_INPUT", "value": 2.0, "name": "x"},
        {"op": "OP_CONST", "value": 3.0},
        {"op": "OP_MUL", "args": [0, 1]},
        {"op": "OP_SOFTPLUS", "args": [2]},
        {"op": "OP_CONST", "value": 1.0},
        {"op": "OP_ADD", "args": [0, 4]},
        {"op": "OP_HYPOT", "args": [3, 5], "name": "y"},
    ]
    assert parsed["output"] == 6 and parsed["outputName"] == "y"
