"""What both benches share: timing, isolated worker processes, tables, and the graphs' data.

Every measured system runs in its own Python process (``run_worker``), so
imports, allocator state and garbage collection of one system never touch
another's figures. A worker prints one JSON line; the parent collects them
and prints a table.

The data behind the graphs is generated here from fixed seeds, so every
system (ours, micrograd 0.1.0, PyTorch, CasADi) is fed the same numbers.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
"""The project checkout (the folder holding ``bench/``)."""

MICROGRAD_PYPI = "0.1.0"
MICROGRAD_DIR = ROOT / ".bench" / f"micrograd-{MICROGRAD_PYPI}"
"""Where the PyPI micrograd is installed for the benches (git-ignored)."""

MLP_SIZES = (2, [16, 16, 1])
"""``MLP(2, [16, 16, 1])``: the network of micrograd's demo."""
MLP_POINTS = 100
MLP_ALPHA = 1e-4
DATA_SEED = 1
WEIGHT_SEED = 2


# -- data ------------------------------------------------------------------


def moons(n: int = MLP_POINTS, seed: int = DATA_SEED) -> list[tuple[float, float, float]]:
    """``n`` points ``(x1, x2, label)`` of two noisy interleaved half-moons; labels ±1."""
    rng = random.Random(seed)
    points = []
    for i in range(n):
        t = rng.uniform(0.0, math.pi)
        if i % 2 == 0:
            x1, x2, label = math.cos(t), math.sin(t), 1.0
        else:
            x1, x2, label = 1.0 - math.cos(t), 0.5 - math.sin(t), -1.0
        points.append((x1 + rng.gauss(0.0, 0.1), x2 + rng.gauss(0.0, 0.1), label))
    return points


def mlp_parameter_count(nin: int = MLP_SIZES[0], nouts: Sequence[int] = MLP_SIZES[1]) -> int:
    """Weights plus biases of ``MLP(nin, nouts)`` (337 for the demo network)."""
    sizes = [nin, *nouts]
    return sum((sizes[i] + 1) * sizes[i + 1] for i in range(len(nouts)))


def mlp_weights(seed: int = WEIGHT_SEED) -> list[float]:
    """Parameters of ``MLP(2, [16, 16, 1])`` in ``parameters()`` order, uniform in [-1, 1]."""
    rng = random.Random(seed)
    return [rng.uniform(-1.0, 1.0) for _ in range(mlp_parameter_count())]


def svm_loss(
    model: Any, points: Sequence[tuple[float, float, float]], alpha: float = MLP_ALPHA
) -> Any:
    """micrograd's demo loss: mean of ``relu(1 - y * score)`` plus ``alpha * sum(p * p)``.

    Written once against the operators ``Value`` spells, so it builds the graph
    for micrograd 0.1.0's ``Value`` and ours alike.
    """
    scores = [model([x1, x2]) for x1, x2, _ in points]
    losses = [(1 - label * s).relu() for (_, _, label), s in zip(points, scores)]
    data_loss = sum(losses) * (1.0 / len(losses))
    reg_loss = alpha * sum(p * p for p in model.parameters())
    return data_loss + reg_loss


def relu_chain(value_type: Any, steps: int) -> tuple[Any, Any]:
    """``y = relu(y * 0.9999 + 0.001)``, ``steps`` times from ``y0 = 0.5``; returns (y0, y)."""
    y0 = value_type(0.5)
    y = y0
    for _ in range(steps):
        y = (y * 0.9999 + 0.001).relu()
    return y0, y


# -- measuring -------------------------------------------------------------


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``; garbage is collected between, untimed."""
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result
    gc.collect()
    return times


def traced_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes Python allocated (tracemalloc) while ``fn`` ran, result included."""
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    gc.collect()
    return peak


def _status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux only)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_growth(fn: Callable[[], Any]) -> int | None:
    """Peak resident memory reached while ``fn`` ran minus the resident memory before, in bytes.

    Counts what tracemalloc cannot see (C++ allocators such as PyTorch's).
    Linux only: the peak is reset through ``/proc/self/clear_refs``; ``None`` elsewhere.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return None
    before = _status_kb("VmRSS")
    result = fn()
    peak = _status_kb("VmHWM")
    del result
    gc.collect()
    if before is None or peak is None:
        return None
    return (peak - before) * 1024


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


# -- processes ---------------------------------------------------------------


def ensure_micrograd_pypi() -> Path:
    """Install micrograd 0.1.0 from PyPI into ``.bench/`` unless it is there; return its folder.

    It shares our import name ``micrograd``, so it is never installed into the
    environment: only a worker that puts this folder first on ``sys.path`` sees it.
    """
    if not (MICROGRAD_DIR / "micrograd" / "engine.py").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(MICROGRAD_DIR),
                f"micrograd=={MICROGRAD_PYPI}",
            ],
            check=True,
        )
    return MICROGRAD_DIR


def micrograd_pypi_beside_ours() -> Any:
    """micrograd 0.1.0's ``engine`` and ``nn`` loaded under other names, beside our ``micrograd``.

    For workers that run both systems in one process. Its ``nn`` imports
    ``micrograd.engine``; that one import is pointed at 0.1.0's engine while
    ``nn`` loads. Returns a namespace with ``engine`` and ``nn``.
    """
    import importlib.util
    import types

    folder = ensure_micrograd_pypi() / "micrograd"
    loaded: dict[str, Any] = {}
    for name in ("engine", "nn"):
        spec = importlib.util.spec_from_file_location(
            f"micrograd_pypi_{name}", folder / f"{name}.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        saved = sys.modules.get("micrograd.engine")
        if name == "nn":
            sys.modules["micrograd.engine"] = loaded["engine"]
        try:
            spec.loader.exec_module(module)
        finally:
            if name == "nn":
                if saved is None:
                    del sys.modules["micrograd.engine"]
                else:
                    sys.modules["micrograd.engine"] = saved
        loaded[name] = module
    return types.SimpleNamespace(**loaded)


def import_micrograd_pypi() -> Any:
    """Import PyPI micrograd 0.1.0 in this worker process, in place of ours; return it."""
    sys.path.insert(0, str(ensure_micrograd_pypi()))
    import micrograd
    import micrograd.engine
    import micrograd.nn

    if not Path(micrograd.__file__ or "").resolve().is_relative_to(MICROGRAD_DIR.resolve()):
        raise RuntimeError("micrograd 0.1.0 did not shadow the project's micrograd")
    return micrograd


def run_worker(script: Path, args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run ``script --worker args`` in a fresh interpreter and return its JSON report.

    A crash, a non-zero exit or a timeout comes back as ``{"error": reason}``.
    """
    command = [sys.executable, str(script), "--worker", *args]
    env = dict(os.environ, PYTHONHASHSEED="0")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"error": tail[:160]}
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def report(result: dict[str, Any]) -> None:
    """Print a worker's report as the one JSON line the parent reads."""
    print(json.dumps(result), flush=True)


# -- output ------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with columns padded to line up in a terminal."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def si(x: float) -> str:
    """A rate such as ``1.23 M`` (k, M, G suffixes)."""
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def fixed(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures, or ``—`` when unknown."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:,.0f}"


def verdict(name: str, measured: float, target: float, higher_is_better: bool, unit: str) -> str:
    """One ``target met / missed`` line: the target, the measured figure, and by how much."""
    met = measured >= target if higher_is_better else measured <= target
    sign = "≥" if higher_is_better else "≤"
    if met:
        return f"- {name}: target {sign} {target:g}{unit}, measured {fixed(measured)}{unit}: met"
    factor = target / measured if higher_is_better else measured / target
    return (
        f"- {name}: target {sign} {target:g}{unit}, measured {fixed(measured)}{unit}: "
        f"missed by {factor:.2f}×"
    )
