"""The guided tour (examples/README.md): every command on the page runs, as written.

The commands are read from the page's ``sh`` blocks; the default addresses
(127.0.0.1:50051, http://127.0.0.1:8080) become those of a real loopback
server, and the two-moons runs take 5 steps instead of 100 (the full run to
100 % accuracy is tests/test_examples.py's). Expected numbers: the seed's.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningServer

ROOT = Path(__file__).resolve().parent.parent
TOUR = ROOT / "examples" / "README.md"
SEED = ["24.7041", "138.8338", "645.5773"]
PNG = b"\x89PNG\r\n\x1a\n"


def tour_commands() -> list[str]:
    """Every command line of the page's ``sh`` blocks, comments stripped."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", TOUR.read_text(), re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


def argv_of(command: str, server: RunningServer) -> list[str]:
    """The command as this machine runs it: the suite's Python, paths from the repository root."""
    text = command.replace("http://127.0.0.1:8080", server.http_url)
    text = text.replace("127.0.0.1:50051", server.target)
    words = shlex.split(text)
    out = [str(ROOT / w) if (ROOT / w).exists() and "/" in w else w for w in words]
    if out[0] == "python":
        out[0] = sys.executable
    elif out[0] == "micrograd-rpc":
        out[0:1] = [sys.executable, "-m", "micrograd.server"]
    elif out[0].endswith(".sh"):
        out.insert(0, "bash")
    if "train_moons" in command:
        out += ["--steps", "5"]
    return out


def needs(command: str) -> str | None:
    """Why this machine cannot run ``command`` (a missing tool), or ``None``."""
    if command.startswith("node "):
        if shutil.which("node") is None:
            return "node is not installed"
        if not (ROOT / "node_modules" / "@grpc" / "grpc-js").exists():
            return "node_modules missing (npm ci)"
    if command.startswith("examples/curl_seed.sh") and shutil.which("curl") is None:
        return "curl is not installed"
    if re.search(r"\.(svg|png)\b", command) and shutil.which("dot") is None and ("draw" in command):
        return "Graphviz's dot is not installed"
    return None


COMMANDS = [c for c in tour_commands() if not c.startswith("./scripts/serve")]


def test_the_tour_lists_every_step() -> None:
    scripts = " ".join(COMMANDS)
    for name in (
        "seed.py",
        "seed_remote.py",
        "neuron.py",
        "train_moons.py",
        "train_moons_remote.py",
        "seed.js",
        "curl_seed.sh",
        "micrograd-rpc draw",
    ):
        assert name in scripts, name


def seed_body(path: Path) -> list[str]:
    """The seed program's own lines of a script: from ``a = Value(-4.0)`` to the last print."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    start = lines.index("a = Value(-4.0)")
    end = max(i for i, line in enumerate(lines) if line.startswith("print("))
    return lines[start : end + 1]


def test_seed_local_and_remote_differ_in_one_line() -> None:
    local = seed_body(ROOT / "examples" / "seed.py")
    remote = seed_body(ROOT / "examples" / "seed_remote.py")
    changed = [d for d in difflib.ndiff(local, remote) if d[:1] in "+-"]
    assert changed == ["- g.backward()", "+ client.backward(g)"]


@pytest.mark.parametrize(
    "command",
    [pytest.param(c, marks=pytest.mark.slow) if "train_moons" in c else c for c in COMMANDS],
)
def test_tour_command_runs(
    command: str, grpc_server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    missing = needs(command)
    if missing:
        pytest.skip(missing)
    server = grpc_server_factory()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROGRAD_RPC_")}
    done = subprocess.run(
        argv_of(command, server),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    out = done.stdout.splitlines()
    # The moons scripts exit 1 until the training accuracy reaches 100 %, which 5 steps do not.
    full = not ("train_moons" in command and out and not out[-1].endswith("accuracy 100%"))
    assert done.returncode == (0 if full else 1), f"{command}\n{done.stdout}\n{done.stderr}"
    if re.search(r"seed(_remote)?\.py|seed\.js\b|curl_seed\.sh", command):
        assert out == SEED
    elif "neuron.py" in command:
        assert out[0] == "output 1.0594"
        assert "w1 -0.7937  grad -2.0000  (x1 = -2.0000)" in out
        if shutil.which("dot"):
            svg = (tmp_path / "neuron.svg").read_text()
            assert re.search(r"grad (-|&#45;)2\.0000", svg)  # dot writes '-' as &#45;
    elif "draw" in command:
        picture = tmp_path / shlex.split(command)[shlex.split(command).index("-o") + 1]
        data = picture.read_bytes()
        if picture.suffix == ".png":
            assert data.startswith(PNG)
        else:
            assert b"138.8338" in data and b"645.5773" in data
    elif "train_moons" in command:
        plot = tmp_path / shlex.split(command)[-1]
        assert plot.read_bytes().startswith(PNG)
        assert "] 5/5 loss" in done.stderr  # the progress bar's last state
        assert out[-1].startswith(("final loss", "after 5 steps"))
    else:  # pragma: no cover - a new command on the page needs its expectation here
        raise AssertionError(f"no expectation for {command!r}")
