"""The package's own imports, read from its source: no cycle, and nothing imports "up".

The layers are engine (``micrograd``, ``engine/``) <- codec <- server and
client, with the generated ``micrograd.v1`` messages beside the codec; the
client never imports the server, and the engine knows nothing of protobuf or
gRPC. Every ``import`` statement counts, wherever it stands (inside a
function, under ``TYPE_CHECKING``), because each one is a dependency a
reader has to follow.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LAYER = {"engine": 0, "v1": 0, "codec": 1, "server": 2, "client": 2}
"""Depth of each part: a module may import its own part and parts of a lower depth only."""

FORBIDDEN = {("client", "server"), ("engine", "v1")}
"""Pairs (importer, imported) that are never allowed, whatever the depths say."""

ENGINE_FORBIDDEN_PREFIXES = ("google.protobuf", "grpc", "grpc_status", "grpc_health")
"""Third-party packages the engine must not import."""


def package_modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name, from pyproject's ``package-dir``."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    packages: list[str] = config["tool"]["setuptools"]["packages"]
    modules: dict[str, Path] = {}
    for package in packages:
        # The longest package-dir prefix decides where a package lives.
        base = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / package_dir[base] / Path(*package[len(base) :].strip(".").split(".") or [])
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


MODULES = package_modules()


def part(module: str) -> str:
    """Which part of the package ``module`` belongs to: engine, v1, codec, server or client."""
    pieces = module.split(".")
    if len(pieces) > 1 and pieces[1] in LAYER:
        return pieces[1]
    return "engine"


def imports(module: str, path: Path) -> Iterator[str]:
    """The dotted names ``module`` imports (absolute, relative ones resolved), every statement."""
    is_package = path.stem == "__init__"
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # ``from micrograd import codec`` imports the module micrograd.codec.
                candidate = f"{base}.{alias.name}"
                yield candidate if candidate in MODULES else base


def graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    return {
        module: {name for name in imports(module, path) if name in MODULES and name != module}
        for module, path in MODULES.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_the_package_is_found() -> None:
    for expected in (
        "micrograd.tape",
        "micrograd.codec.graph",
        "micrograd.server.service",
        "micrograd.client.client",
        "micrograd.v1.graph_pb2",
    ):
        assert expected in MODULES


def test_the_reader_sees_relative_and_from_imports() -> None:
    edges = graph()
    assert "micrograd.kernels" in edges["micrograd.tape"]  # from .kernels import ...
    assert "micrograd.codec" in edges["micrograd.server.service"]  # from micrograd import codec
    assert "micrograd.server.calls" in edges["micrograd.server.grpc_server"]


def test_no_import_cycle() -> None:
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(g) for g in found)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_goes_up(module: str) -> None:
    mine = part(module)
    wrong = []
    for name in imports(module, MODULES[module]):
        if name in MODULES:
            theirs = part(name)
            if (mine, theirs) in FORBIDDEN or (theirs != mine and LAYER[theirs] >= LAYER[mine]):
                wrong.append(name)
        elif mine == "engine" and name.startswith(ENGINE_FORBIDDEN_PREFIXES):
            wrong.append(name)
    assert not wrong, f"{module} ({mine}) imports {', '.join(sorted(set(wrong)))}"
