"""Kernel benchmark: forward + reverse sweeps over big tapes, ours beside CasADi and the rest.

    python bench/kernels.py [--quick]

Four graphs, generated from fixed seeds (``--quick`` shrinks the big ones):

* ``mlp``: micrograd's demo loss, ``MLP(2, [16, 16, 1])`` on 100 two-moons
  points (the 337 parameters are the inputs, the data are constants).
* ``chain``: ``y = tanh(1.0001 * y + 0.001)`` for 1,000,000 steps, three
  nodes per step (``*``, ``+``, ``tanh``; the two constants are shared).
* ``random``: a random DAG on 1,000 inputs: 720,000 nodes whose ops are drawn
  as add 25 %, sub 15 %, mul 20 %, neg 5 %, relu 5 %, tanh 15 %,
  sigmoid 15 %, with arguments drawn uniformly from all earlier nodes, then
  every node nobody uses summed by a balanced tree of adds (about 1M nodes
  in all). Binary ops and ``neg`` only read nodes bounded by 1 (inputs,
  ``tanh``, ``sigmoid``, products and negations of such), so every value
  and gradient stays finite without any check; div, pow, exp and log are
  left out for that reason.
* ``batch``: the ``mlp`` tape at 1,000 input bindings: 1,000 parameter
  vectors (the seeded weights plus Gaussian noise of 0.1), as a population
  or an ensemble would send them.

On the three one-binding graphs, ``Tape.evaluate_selected`` of one binding
with the output and the inputs selected (what CasADi's (b) returns: the
output and its gradient w.r.t. the inputs; it runs the compiled program of
``NativeKernel.program``) is timed beside ``Tape.evaluate``, and the targets
against CasADi are judged on that row.

On ``mlp`` the native kernel's Hessian-vector product (forward-over-reverse,
one call) is timed beside one forward + reverse sweep and beside CasADi's
``jtimes`` of its gradient. ``--baseline REV`` (default ``auto``: the commit
before the op table grew ``where``) builds the native kernel of that commit
in a temporary directory and times its sweeps on the same tapes in the same
run, so the cost of the larger op set is measured, not remembered.

The 1M graphs are built straight as tape arrays (``Tape.from_arrays``), and
CasADi's SX graph is built from the same arrays with vector operations and
``substitute_inplace``, so no system is slowed by a Python object per node
that it would not otherwise need. Every system runs in its own process.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import _common as c
import numpy as np

SIZES = {  # full run, --quick
    "chain_steps": (1_000_000, 100_000),
    "random_nodes": (720_000, 72_000),
    "batch": (1_000, 100),
}
SUBSAMPLE_CHAIN_STEPS = 100_000
SUBSAMPLE_RANDOM_NODES = 72_000
RANDOM_INPUTS = 1_000
RANDOM_SEED = 3
BATCH_SEED = 4
RANDOM_MIX = {
    "add": 0.25,
    "sub": 0.15,
    "mul": 0.20,
    "neg": 0.05,
    "relu": 0.05,
    "tanh": 0.15,
    "sigmoid": 0.15,
}
GRAPHS = ("mlp", "chain", "random", "batch")
SYSTEMS = ("native", "baseline", "python", "casadi", "torch", "micrograd", "floor")
TITLES = {
    "mlp": "MLP(2, [16, 16, 1]) SVM loss, 100 points, one binding",
    "chain": "chain y = tanh(1.0001 * y + 0.001), {chain_steps:,} steps",
    "random": "random DAG, {random_nodes:,} random nodes + sum of the unused ones",
    "batch": "MLP loss at {batch:,} bindings of the 337 parameters (per node-binding)",
}


# -- graphs as tape arrays ---------------------------------------------------------


def _code(name: str) -> int:
    from micrograd import ops

    return ops.BY_NAME[name].code


def mlp_tape() -> Any:
    """The demo MLP loss compiled from our ``Value`` graph; inputs are the 337 parameters."""
    from micrograd.nn import MLP
    from micrograd.tape import Tape

    model = MLP(c.MLP_SIZES[0], c.MLP_SIZES[1])
    for p, w in zip(model.parameters(), c.mlp_weights(), strict=True):
        p.data = w
    tape, _ = Tape.from_value(c.svm_loss(model, c.moons()))
    return tape


def chain_tape(steps: int) -> Any:
    """``y = tanh(1.0001 * y + 0.001)`` from the input ``y0 = 0.5``: ``3 + 3 * steps`` nodes."""
    from micrograd.tape import Tape

    n = 3 + 3 * steps
    code = np.empty(n, dtype=np.uint8)
    a = np.full(n, -1, dtype=np.int32)
    b = np.full(n, -1, dtype=np.int32)
    const = np.zeros(n)
    code[:3] = (_code("input"), _code("const"), _code("const"))
    const[:3] = (0.5, 1.0001, 0.001)
    mul = np.arange(3, n, 3)
    code[mul], code[mul + 1], code[mul + 2] = _code("mul"), _code("add"), _code("tanh")
    a[mul] = np.concatenate([[0], mul[:-1] + 2])
    b[mul] = 1
    a[mul + 1], b[mul + 1] = mul, 2
    a[mul + 2] = mul + 1
    return Tape.from_arrays(code, a, b, const)


def random_tape(random_nodes: int, inputs: int = RANDOM_INPUTS, seed: int = RANDOM_SEED) -> Any:
    """The random DAG described in the module docstring, from ``seed``."""
    from micrograd import ops
    from micrograd.tape import Tape

    rng = np.random.default_rng(seed)
    names = list(RANDOM_MIX)
    kinds = rng.choice(len(names), size=random_nodes, p=list(RANDOM_MIX.values()))
    op_code = np.array([_code(name) for name in names], dtype=np.uint8)
    arity = np.array([ops.BY_NAME[name].arity for name in names])
    reads_bounded = np.array([ops.BY_NAME[name].arity == 2 or name == "neg" for name in names])
    is_bounded = np.array([name in ("mul", "neg", "tanh", "sigmoid") for name in names])

    n = inputs + random_nodes
    code = np.concatenate([np.full(inputs, _code("input"), dtype=np.uint8), op_code[kinds]])
    bounded = np.concatenate([np.ones(inputs, dtype=bool), is_bounded[kinds]])
    idx = np.arange(inputs, n)
    pool = np.flatnonzero(bounded)
    below = np.searchsorted(pool, idx)  # bounded nodes before each node (>= inputs)

    def draw(from_bounded: np.ndarray) -> np.ndarray:
        u = rng.random(random_nodes)
        anywhere = np.floor(u * idx).astype(np.int64)
        among_bounded = pool[np.floor(u * below).astype(np.int64)]
        return np.where(from_bounded, among_bounded, anywhere)

    a = np.concatenate([np.full(inputs, -1), draw(reads_bounded[kinds])])
    b = np.concatenate([np.full(inputs, -1), draw(reads_bounded[kinds])])
    b[inputs:][arity[kinds] < 2] = -1
    const = np.concatenate([rng.uniform(-1.0, 1.0, inputs), np.zeros(random_nodes)])

    used = np.zeros(n, dtype=bool)
    used[a[a >= 0]] = True
    used[b[b >= 0]] = True
    level = np.flatnonzero(~used)
    extra_a: list[np.ndarray] = []
    extra_b: list[np.ndarray] = []
    top = n
    while level.shape[0] > 1:
        pairs = level.shape[0] // 2
        extra_a.append(level[0 : 2 * pairs : 2])
        extra_b.append(level[1 : 2 * pairs : 2])
        summed = np.arange(top, top + pairs)
        top += pairs
        level = np.concatenate([summed, level[2 * pairs :]])
    sums = top - n
    return Tape.from_arrays(
        np.concatenate([code, np.full(sums, _code("add"), dtype=np.uint8)]),
        np.concatenate([a, *extra_a]),
        np.concatenate([b, *extra_b]),
        np.concatenate([const, np.zeros(sums)]),
    )


def batch_bindings(tape: Any, size: int, seed: int = BATCH_SEED) -> np.ndarray:
    """``size`` parameter vectors: the tape's own input values plus Gaussian noise (sigma 0.1)."""
    rng = np.random.default_rng(seed)
    base = tape.const[tape.inputs]
    return base[None, :] + rng.normal(0.0, 0.1, (size, base.shape[0]))


def make_tape(graph: str, quick: bool, subsample: bool = False) -> Any:
    """The tape of ``graph``; ``subsample``: the smaller stand-ins of 1M graphs for slow systems."""
    full = 1 if quick else 0
    if graph in ("mlp", "batch"):
        return mlp_tape()
    if graph == "chain":
        steps = SIZES["chain_steps"][full]
        return chain_tape(min(steps, SUBSAMPLE_CHAIN_STEPS) if subsample else steps)
    nodes = SIZES["random_nodes"][full]
    return random_tape(min(nodes, SUBSAMPLE_RANDOM_NODES) if subsample else nodes)


# -- the systems --------------------------------------------------------------------

Row = dict[str, Any]


def _repeats(n_nodes: int, quick: bool) -> int:
    """Runs to take the median of: 3 for 1M-node graphs (and --quick above 100k nodes), 5 above
    100k nodes, else 31."""
    if n_nodes >= 1_000_000 or (quick and n_nodes > 100_000):
        return 3
    return 5 if n_nodes > 100_000 else 31


def _row(label: str, times: list[float], work: int | None, **extra: Any) -> Row:
    """A table row: ``work`` is node count (times bindings for a batch) behind each time."""
    return {"label": label, "times": times, "work": work, **extra}


def native_rows(graph: str, quick: bool) -> list[Row]:
    """Our native kernel: ``Tape.evaluate``, sweeps into reused buffers, and (batch) threads."""
    from micrograd.kernels import available_kernels, get_kernel

    if "native" not in available_kernels():
        return [{"label": "ours: native kernel", "error": "not built on this machine"}]
    kernel = get_kernel("native")
    tape = make_tape(graph, quick)
    n = len(tape)
    bindings = batch_bindings(tape, SIZES["batch"][quick]) if graph == "batch" else None
    width = 1 if bindings is None else bindings.shape[0]
    repeats = 3 if graph == "batch" else _repeats(n, quick)
    values, grads = tape.evaluate(bindings, kernel=kernel)
    first = int(tape.inputs[0])
    check = (float(values[..., -1].flat[0]), float(grads[..., first].flat[0]))
    rows = [
        _row(
            "ours: native, Tape.evaluate",
            c.timed(lambda: tape.evaluate(bindings, kernel=kernel), repeats),
            n * width,
            check=check,
            base=True,
        )
    ]

    if bindings is None:
        rows.append(_selected_row(kernel, tape, repeats))
    buffers = tape.leaf_values(bindings)
    grad_buffer = np.zeros_like(buffers)

    def sweeps() -> None:
        kernel.forward(tape, buffers)
        grad_buffer.fill(0.0)
        kernel.backward(tape, buffers, grad_buffer, n - 1)

    rows.append(
        _row(
            "ours: native, sweeps into reused buffers",
            c.timed(sweeps, repeats),
            n * width,
            sweeps=True,
        )
    )
    if graph == "mlp":
        rows.append(_hvp_row(kernel, tape, repeats))
    if bindings is not None:
        threads = os.cpu_count() or 1
        chunks = np.array_split(bindings, threads)
        with ThreadPoolExecutor(threads) as pool:

            def threaded() -> None:
                list(pool.map(lambda chunk: tape.evaluate(chunk, kernel=kernel), chunks))

            rows.append(
                _row(
                    f"ours: native, Tape.evaluate on {threads} threads",
                    c.timed(threaded, repeats),
                    n * width,
                    threads=threads,
                )
            )
        for count in sorted({1, threads}):
            rows.append(
                _row(
                    f"ours: native, evaluate_selected (tiles, inputs only), {count} thread(s)",
                    c.timed(
                        partial(
                            tape.evaluate_selected,
                            bindings,
                            tape.inputs,
                            kernel=kernel,
                            threads=count,
                        ),
                        repeats,
                    ),
                    n * width,
                )
            )
    return rows


def _selected_row(kernel: Any, tape: Any, repeats: int) -> Row:
    """What CasADi (b) returns, ours: ``Tape.evaluate_selected`` of one binding with the
    output and the inputs selected (output value + input gradients, the compiled program)."""
    n = len(tape)
    one = tape.const[tape.inputs][None, :]
    selection = np.append(tape.inputs, n - 1)
    run = partial(tape.evaluate_selected, one, selection, kernel=kernel)
    run()  # the first call sweeps the tape itself; the second builds the program
    values, grads = run()
    return _row(
        "ours: native, evaluate_selected of one binding: output + input gradients",
        c.timed(run, repeats),
        n,
        check=(float(values[0, -1]), float(grads[0, 0])),
        single=True,
        note="the compiled one-binding program (NativeKernel.program), built on the second "
        "call (not timed)",
    )


def _hvp_row(kernel: Any, tape: Any, repeats: int) -> Row:
    """The native HVP of the output w.r.t. the inputs along a fixed vector, reused buffers."""
    n = len(tape)
    values = tape.leaf_values()
    tangents = np.zeros(n)
    tangents[tape.inputs] = np.random.default_rng(5).normal(size=tape.inputs.shape[0])
    grads, grad_tangents = np.zeros(n), np.zeros(n)

    def run() -> None:
        grads.fill(0.0)
        grad_tangents.fill(0.0)
        kernel.hvp(tape, values, tangents, grads, grad_tangents, n - 1)

    run()
    hv = grad_tangents[tape.inputs]
    return _row(
        "ours: native HVP (forward-over-reverse), reused buffers",
        c.timed(run, repeats),
        n,
        hvp=True,
        hvp_check=float(hv[0]),
    )


def _baseline_source(rev: str) -> str | None:
    """The commit to compare against: ``rev``, or for ``auto`` the parent of the commit that
    added ``where`` to the op table (``None`` if there is no such commit or no git)."""
    if rev == "none":
        return None
    try:
        if rev != "auto":
            return subprocess.run(
                ["git", "rev-parse", rev], cwd=c.ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        found = subprocess.run(
            ["git", "log", "--first-parent", "--format=%H", "-S", 'name="where"', "--",
             "engine/ops.py"],
            cwd=c.ROOT, capture_output=True, text=True, check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{found[-1]}^" if found else None


def build_baseline(rev: str, into: Path) -> Any:
    """Compile the native kernel of commit ``rev`` (its C sources and setup.py's flags) into
    ``into`` and import it as a module of its own."""

    def show(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=c.ROOT, capture_output=True, text=True,
            check=True,
        ).stdout

    listing = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, "engine/"], cwd=c.ROOT, capture_output=True,
        text=True, check=True,
    ).stdout.split()
    sources = []
    for path in listing:
        if path.endswith((".c", ".h")):
            (into / Path(path).name).write_text(show(path))
            if path.endswith(".c"):
                sources.append(str(into / Path(path).name))
    setup_py = show("setup.py")
    flags_at = setup_py.index("_UNIX_FLAGS = ")
    flags = ast.literal_eval(setup_py[flags_at + len("_UNIX_FLAGS = ") :].split("]", 1)[0] + "]")
    package = into / "mg_baseline"
    package.mkdir()
    target = package / f"_kernel{sysconfig.get_config_var('EXT_SUFFIX')}"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()
    include = sysconfig.get_paths()["include"]
    subprocess.run(
        [*compiler, *flags, "-shared", "-fPIC", f"-I{include}", *sources, "-o", str(target), "-lm"],
        check=True, capture_output=True,
    )
    spec = importlib.util.spec_from_file_location("mg_baseline._kernel", target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def baseline_rows(graph: str, quick: bool) -> list[Row]:
    """The native kernel of the baseline commit: sweeps into reused buffers, as ours above."""
    rev = _baseline_source(os.environ.get("MICROGRAD_BENCH_BASELINE", "auto"))
    if rev is None or graph == "batch":
        return []
    tape = make_tape(graph, quick)
    n = len(tape)
    with tempfile.TemporaryDirectory() as tmp:
        old = build_baseline(rev, Path(tmp))
        values = tape.leaf_values()
        grads = np.zeros_like(values)

        def sweeps() -> None:
            old.forward(tape.code, tape.arg0, tape.arg1, tape.const, values)
            grads.fill(0.0)
            old.backward(tape.code, tape.arg0, tape.arg1, tape.const, values, grads, n - 1)

        sweeps()
        short = subprocess.run(
            ["git", "rev-parse", "--short", rev], cwd=c.ROOT, capture_output=True, text=True
        ).stdout.strip()
        return [
            _row(
                f"baseline {short} (before the new ops): native sweeps into reused buffers",
                c.timed(sweeps, _repeats(n, quick)),
                n,
                baseline=True,
                check=(float(values[-1]), float(grads[int(tape.inputs[0])])),
            )
        ]


def python_rows(graph: str, quick: bool) -> list[Row]:
    """Our portable Python kernel through ``Tape.evaluate``."""
    from micrograd.kernels import get_kernel

    kernel = get_kernel("python")
    tape = make_tape(graph, quick)
    bindings = batch_bindings(tape, SIZES["batch"][quick]) if graph == "batch" else None
    width = 1 if bindings is None else bindings.shape[0]
    values, grads = tape.evaluate(bindings, kernel=kernel)
    first = int(tape.inputs[0])
    check = (float(values[..., -1].flat[0]), float(grads[..., first].flat[0]))
    repeats = 3 if graph == "batch" else _repeats(len(tape), quick)
    times = c.timed(lambda: tape.evaluate(bindings, kernel=kernel), repeats)
    return [_row("ours: Python kernel, Tape.evaluate", times, len(tape) * width, check=check)]


def micrograd_rows(graph: str, quick: bool) -> list[Row]:
    """micrograd 0.1.0 (PyPI): build + backward of the MLP loss; nothing else is expressible."""
    label = "micrograd 0.1.0, build + backward"
    if graph in ("chain", "random"):
        return [{"label": label, "error": "skipped: micrograd 0.1.0 has no tanh or sigmoid"}]
    if graph == "batch":
        return [{"label": label, "error": "skipped: 1,000 builds take about 10 minutes; see mlp"}]
    mg = c.import_micrograd_pypi()
    model = mg.nn.MLP(c.MLP_SIZES[0], c.MLP_SIZES[1])
    for p, w in zip(model.parameters(), c.mlp_weights(), strict=True):
        p.data = w
    points = c.moons()

    def run() -> Any:
        loss = c.svm_loss(model, points)
        loss.backward()
        return loss

    model.zero_grad()
    # the first input of our tape is the output neuron's bias, the last parameter
    check = (float(run().data), float(model.parameters()[-1].grad))
    # work=None: the parent counts the nodes of our tape of the same graph (68,818)
    return [_row(label, c.timed(run, 5), None, check=check)]


def _torch_from_tape(torch: Any, tape: Any) -> tuple[Any, list[Any]]:
    """Evaluate ``tape`` with one PyTorch 0-d float64 tensor per node; returns (output, inputs)."""
    from micrograd import ops

    exprs = {op.code: compile(op.expr, op.name, "eval") for op in ops.OPS if op.arity}
    nodes: list[Any] = []
    leaves: list[Any] = []
    input_code, const_code = _code("input"), _code("const")
    for k, ai, bi, ci in zip(
        tape.code.tolist(), tape.arg0.tolist(), tape.arg1.tolist(), tape.const.tolist()
    ):
        if k == input_code:
            leaf = torch.tensor(ci, dtype=torch.float64, requires_grad=True)
            leaves.append(leaf)
            nodes.append(leaf)
        elif k == const_code:
            nodes.append(torch.tensor(ci, dtype=torch.float64))
        else:
            scope = {"x": nodes[ai], "y": nodes[bi] if bi >= 0 else None, "c": ci}
            nodes.append(eval(exprs[k], {}, scope))
    return nodes[-1], leaves


def torch_rows(graph: str, quick: bool) -> list[Row]:
    """PyTorch: scalar autograd (a tensor per node), and for the batch the MLP as tensor ops."""
    import torch

    if graph == "batch":
        return [torch_batched_row(torch, quick)]
    subsample = graph in ("chain", "random")
    tape = make_tape(graph, quick, subsample=subsample)

    def run() -> Any:
        out, leaves = _torch_from_tape(torch, tape)
        out.backward()
        return out, leaves

    out, leaves = run()
    check = None if subsample else (float(out.item()), float(leaves[0].grad))
    note = f"measured on a {len(tape):,}-node graph of the same kind" if subsample else ""
    return [
        _row(
            f"PyTorch {torch.__version__.split('+')[0]} scalar autograd, build + backward",
            c.timed(run, 3),
            len(tape),
            check=check,
            note=note,
        )
    ]


def torch_batched_row(torch: Any, quick: bool) -> Row:
    """The MLP loss for every binding at once as batched tensor ops; backward to the parameters."""
    tape = mlp_tape()
    bindings = batch_bindings(tape, SIZES["batch"][quick])
    # The tape lists parameters in the order they first appear in the graph, which for this
    # model is parameters() order with each neuron's bias first; map them back.
    weights = c.mlp_weights()
    order = [weights.index(w) for w in tape.const[tape.inputs].tolist()]
    params_in_model_order = np.empty_like(bindings)
    params_in_model_order[:, order] = bindings
    points = np.array(c.moons())
    x = torch.tensor(points[:, :2])
    label = torch.tensor(points[:, 2])
    nin, nouts = c.MLP_SIZES
    sizes = [nin, *nouts]

    def run() -> Any:
        p = torch.tensor(params_in_model_order, requires_grad=True)
        h: Any = x.expand(p.shape[0], *x.shape)
        start = 0
        for i in range(len(nouts)):
            block = p[:, start : start + sizes[i + 1] * (sizes[i] + 1)]
            block = block.reshape(p.shape[0], sizes[i + 1], sizes[i] + 1)
            start += block.shape[1] * block.shape[2]
            h = (
                torch.einsum("boi,bpi->bpo", block[:, :, : sizes[i]], h)
                + block[:, None, :, sizes[i]]
            )
            if i < len(nouts) - 1:
                h = h.relu()
        losses = (1 - label * h[:, :, 0]).relu().mean(dim=1) + c.MLP_ALPHA * (p * p).sum(dim=1)
        losses.sum().backward()
        return losses, p

    losses, p = run()
    check = (float(losses[0]), float(p.grad[0, order[0]]))  # type: ignore[index]
    n = len(tape) * bindings.shape[0]
    return _row(
        f"PyTorch batched tensor ops ({torch.get_num_threads()} threads), fwd + bwd",
        c.timed(run, 5),
        n,
        check=check,
        note="values and gradients of the parameters only, not of every node",
    )


# CasADi spelling of each op of the table, on SX vectors: ``(x, y, z, k)``, ``k`` a DM of
# constants (``z`` the third argument of ``where``).
def _casadi_forms(ca: Any) -> dict[str, Callable[[Any, Any, Any, Any], Any]]:
    return {
        "add": lambda x, y, z, k: x + y,
        "sub": lambda x, y, z, k: x - y,
        "mul": lambda x, y, z, k: x * y,
        "div": lambda x, y, z, k: x / y,
        "neg": lambda x, y, z, k: -x,
        "pow": lambda x, y, z, k: x**k,
        "pow_value": lambda x, y, z, k: x**y,
        "relu": lambda x, y, z, k: ca.fmax(x, 0),
        "tanh": lambda x, y, z, k: ca.tanh(x),
        "exp": lambda x, y, z, k: ca.exp(x),
        "log": lambda x, y, z, k: ca.log(x),
        "sigmoid": lambda x, y, z, k: 1 / (1 + ca.exp(-x)),
        "sin": lambda x, y, z, k: ca.sin(x),
        "cos": lambda x, y, z, k: ca.cos(x),
        "tan": lambda x, y, z, k: ca.tan(x),
        "asin": lambda x, y, z, k: ca.asin(x),
        "acos": lambda x, y, z, k: ca.acos(x),
        "atan": lambda x, y, z, k: ca.atan(x),
        "sinh": lambda x, y, z, k: ca.sinh(x),
        "cosh": lambda x, y, z, k: ca.cosh(x),
        "asinh": lambda x, y, z, k: ca.asinh(x),
        "acosh": lambda x, y, z, k: ca.acosh(x),
        "atanh": lambda x, y, z, k: ca.atanh(x),
        "sqrt": lambda x, y, z, k: ca.sqrt(x),
        "abs": lambda x, y, z, k: ca.fabs(x),
        "log1p": lambda x, y, z, k: ca.log1p(x),
        "expm1": lambda x, y, z, k: ca.expm1(x),
        "log2": lambda x, y, z, k: ca.log(x) / np.log(2.0),
        "log10": lambda x, y, z, k: ca.log10(x),
        "erf": lambda x, y, z, k: ca.erf(x),
        "softplus": lambda x, y, z, k: ca.if_else(x > 20, x, ca.log1p(ca.exp(x))),
        "floor": lambda x, y, z, k: ca.floor(x),
        "ceil": lambda x, y, z, k: ca.ceil(x),
        "sign": lambda x, y, z, k: ca.sign(x),
        "atan2": lambda x, y, z, k: ca.atan2(x, y),
        "maximum": lambda x, y, z, k: ca.fmax(x, y),
        "minimum": lambda x, y, z, k: ca.fmin(x, y),
        "where": lambda x, y, z, k: ca.if_else(x > 0, y, z),
    }


def casadi_graph(ca: Any, tape: Any) -> tuple[Any, Any]:
    """``(inputs, all node values)`` as SX: one definition per node, then ``substitute_inplace``."""
    from micrograd import ops

    forms = _casadi_forms(ca)
    missing = [op.name for op in ops.OPS if op.arity and op.name not in forms]
    if missing:
        raise NotImplementedError(f"no CasADi form for op(s) {', '.join(missing)}")
    n = len(tape)
    x = ca.SX.sym("x", int(tape.inputs.shape[0]))
    v = ca.SX.sym("v", n)
    vdef = ca.SX(n, 1)
    if tape.inputs.shape[0]:
        vdef[tape.inputs.tolist()] = x
    consts = np.flatnonzero(tape.code == _code("const"))
    if consts.shape[0]:
        vdef[consts.tolist()] = ca.DM(tape.const[consts])
    for op in ops.OPS:
        at = np.flatnonzero(tape.code == op.code)
        if not op.arity or not at.shape[0]:
            continue
        xs = v[tape.arg0[at].tolist()]
        ys = v[tape.arg1[at].tolist()] if op.arity >= 2 else None
        zs = v[tape.arg2[at].tolist()] if op.arity == 3 and tape.arg2 is not None else None
        vdef[at.tolist()] = forms[op.name](xs, ys, zs, ca.DM(tape.const[at]))
    (resolved,), _ = ca.substitute_inplace([v], [vdef], [], False)
    return x, resolved


def casadi_rows(graph: str, quick: bool) -> list[Row]:
    """CasADi's SX VM: (a) all values, (b) output + gradient, (c) both; ``map`` for a batch."""
    import time

    import casadi as ca

    version = str(getattr(ca, "__version__", "?"))
    tape = make_tape(graph, quick)
    n = len(tape)
    start = time.perf_counter()
    x, allv = casadi_graph(ca, tape)
    out = allv[n - 1]
    grad = ca.gradient(out, x)
    f_all = ca.Function("all_values", [x], [allv])
    f_grad = ca.Function("output_and_gradient", [x], [out, grad])
    f_both = ca.Function("all_values_and_gradient", [x], [allv, grad])
    build = time.perf_counter() - start
    x0 = ca.DM(tape.const[tape.inputs])
    got = f_grad(x0)
    check = (float(got[0]), float(got[1][0]))
    note = f"SX graph and Functions built in {build:.1f} s (not timed)"
    if graph == "batch":
        width = SIZES["batch"][quick]
        xb = ca.DM(batch_bindings(tape, width).T)
        threads = os.cpu_count() or 1
        rows = []
        for how, mapped in (
            ("serial", f_grad.map(width, "serial")),
            (f"thread, {threads}", f_grad.map(width, "thread", threads)),
        ):
            got = mapped(xb)
            rows.append(
                _row(
                    f"CasADi {version} SX map({width}, {how}): output + gradient",
                    c.timed(partial(mapped, xb), 3),
                    n * width,
                    check=(float(got[0][0]), float(got[1][0, 0])),
                    casadi=how,
                )
            )
        rows[0]["note"] = (
            note + "; 'openmp' is not compiled into this CasADi (falls back to serial)"
        )
        return rows
    repeats = _repeats(n, quick)
    label = f"CasADi {version} SX"
    extra = []
    if graph == "mlp":
        vec = ca.SX.sym("v", x.shape[0])
        f_hvp = ca.Function("hessian_vector", [x, vec], [ca.jtimes(grad, x, vec)])
        v0 = ca.DM(np.random.default_rng(5).normal(size=x.shape[0]))
        extra.append(
            _row(
                f"{label} (d) jtimes of the gradient: H v",
                c.timed(lambda: f_hvp(x0, v0), repeats),
                n,
                instructions=f_hvp.n_instructions(),
                casadi="d",
                hvp_check=float(f_hvp(x0, v0)[0]),
            )
        )
    return [*extra,
        _row(
            f"{label} (a) all node values",
            c.timed(lambda: f_all(x0), repeats),
            n,
            instructions=f_all.n_instructions(),
            casadi="a",
        ),
        _row(
            f"{label} (b) output + gradient w.r.t. inputs",
            c.timed(lambda: f_grad(x0), repeats),
            n,
            instructions=f_grad.n_instructions(),
            casadi="b",
            check=check,
            note=note,
        ),
        _row(
            f"{label} (c) all node values + gradient",
            c.timed(lambda: f_both(x0), repeats),
            n,
            instructions=f_both.n_instructions(),
            casadi="c",
        ),
    ]


def floor_rows(graph: str, quick: bool) -> list[Row]:
    """Memory-bandwidth floor: copy the tape's four arrays and a values and a grads array once."""
    tape = make_tape(graph, quick)
    n = len(tape)
    width = SIZES["batch"][quick] if graph == "batch" else 1
    sources = [
        tape.code,
        tape.arg0,
        tape.arg1,
        tape.const,
        np.ones((n, width)),
        np.ones((n, width)),
    ]
    targets = [np.empty_like(s) for s in sources]

    def stream() -> None:
        for s, t in zip(sources, targets):
            np.copyto(t, s)

    stream()
    moved = 2 * sum(s.nbytes for s in sources)
    times = c.timed(stream, 9)
    gbps = moved / c.median(times) / 1e9
    return [
        _row(
            "floor: numpy copy of tape arrays + values + grads",
            times,
            n * width,
            floor=True,
            note=f"{moved / 1e6:,.1f} MB read + written per run, {gbps:.1f} GB/s",
        )
    ]


WORKERS: dict[str, Callable[[str, bool], list[Row]]] = {
    "native": native_rows,
    "baseline": baseline_rows,
    "python": python_rows,
    "casadi": casadi_rows,
    "torch": torch_rows,
    "micrograd": micrograd_rows,
    "floor": floor_rows,
}


def worker(system: str, graph: str, quick: bool) -> dict[str, Any]:
    """Measure one system on one graph in this process."""
    try:
        rows = WORKERS[system](graph, quick)
    except Exception as e:  # reported in the table as this system's failure
        rows = [{"label": system, "error": f"{type(e).__name__}: {e}"[:160]}]
    return {"rows": rows}


# -- the table ------------------------------------------------------------------------


def main() -> None:
    """Run every system on every graph, print the tables and the targets."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="100k-step chain, 72k random nodes, batch 100"
    )
    parser.add_argument(
        "--graphs", default=",".join(GRAPHS), help="comma-separated subset of " + ", ".join(GRAPHS)
    )
    parser.add_argument(
        "--baseline",
        default="auto",
        help="commit whose native kernel to time beside ours ('auto': the one before the ops "
        "grew 'where'; 'none': skip)",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated subset of " + ", ".join(SYSTEMS),
    )
    parser.add_argument("--worker", nargs=2, metavar=("SYSTEM", "GRAPH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["MICROGRAD_BENCH_BASELINE"] = args.baseline
    if args.worker:
        c.report(worker(args.worker[0], args.worker[1], args.quick))
        return

    c.ensure_micrograd_pypi()
    # numpy's OpenBLAS threads spin for a while after any BLAS call (building the tapes makes
    # some); on a small machine they take a core from the sweeps being timed. Nothing timed
    # here uses BLAS, so every worker gets one BLAS thread.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    here = Path(__file__).resolve()
    sizes = {key: value[args.quick] for key, value in SIZES.items()}
    found: dict[str, list[Row]] = {}
    for graph in args.graphs.split(","):
        rows: list[Row] = []
        for system in args.systems.split(","):
            extra = ["--quick"] if args.quick else []
            result = c.run_worker(here, [system, graph, *extra], timeout=900)
            rows += result.get("rows", [{"label": system, "error": result.get("error", "?")}])
        _fill_work(rows)
        found[graph] = rows
        print_graph(graph, rows, sizes)
    print_targets(found)


def _ns(row: Row) -> float:
    """Median nanoseconds per node (per node-binding for a batch)."""
    return 1e9 * c.median(row["times"]) / row["work"]


def _fill_work(rows: list[Row]) -> None:
    """Rows measured without our tape count the nodes of our tape of the same graph."""
    work = next((r["work"] for r in rows if r.get("work")), None)
    for r in rows:
        if "times" in r and not r.get("work"):
            r["work"] = work


def print_graph(graph: str, rows: list[Row], sizes: dict[str, int]) -> None:
    """One graph's table, plus its notes and the agreement of the outputs."""
    base = next((r for r in rows if r.get("base") and "times" in r), None)
    n_note = next((r["work"] for r in rows if r.get("base")), None)
    print(
        f"\n### {TITLES[graph].format(**sizes)}"
        + (f": {n_note:,} node(-binding)s" if n_note else "")
        + "\n"
    )
    table = []
    notes = []
    for r in rows:
        if "error" in r:
            table.append([r["label"], "—", "—", "—", "—", r["error"]])
            continue
        ns = _ns(r)
        ratio = f"{c.fixed(ns / _ns(base))}×" if base else "—"
        table.append(
            [
                r["label"],
                str(len(r["times"])),
                c.fixed(1e3 * c.median(r["times"])),
                c.fixed(ns),
                c.si(1e9 / ns),
                ratio,
            ]
        )
        if r.get("note"):
            notes.append(f"- {r['label']}: {r['note']}")
        if r.get("instructions"):
            notes.append(f"- {r['label']}: {r['instructions']:,} VM instructions")
    headers = [
        "system",
        "N",
        "median ms",
        "ns/node",
        "nodes/s",
        "native speed-up (their time / ours)",
    ]
    print(c.table(headers, table))
    checks = [r["check"] for r in rows if r.get("check")]
    if checks:
        out0, d0 = checks[0]
        spread = max(
            max(abs(o - out0) / abs(out0), abs(d - d0) / max(abs(d0), 1e-300)) for o, d in checks
        )
        notes.append(
            f"- output {out0:.12g}, d output/d first input {d0:.12g}; largest relative "
            f"difference between systems {spread:.1e}"
        )
    print("\n" + "\n".join(notes), flush=True)


def _flagged(key: str, row: Row) -> bool:
    return bool(row.get(key))


def _mapped(how: str, row: Row) -> bool:
    return str(row.get("casadi", "")).startswith(how)


def print_targets(found: dict[str, list[Row]]) -> None:
    """The issue's targets for the native kernel, met or missed, with the figures."""
    lines = []

    def pick(graph: str, test: Callable[[Row], bool]) -> Row | None:
        return next((r for r in found.get(graph, []) if "times" in r and test(r)), None)

    for graph, factor in (("mlp", 1.5), ("random", 1.5), ("chain", 1.0)):
        single = pick(graph, partial(_flagged, "single"))
        native = pick(graph, lambda r: bool(r.get("base")))
        casadi = pick(graph, lambda r: r.get("casadi") == "b")
        if single and casadi:
            lines.append(
                c.verdict(
                    f"native single binding (output + input gradients) speed-up over CasADi SX "
                    f"(b), {graph}",
                    _ns(casadi) / _ns(single),
                    factor,
                    True,
                    "×",
                )
            )
        if native and casadi:
            lines.append(
                f"- (for reference) Tape.evaluate, every node's value and gradient, over CasADi "
                f"SX (b), {graph}: {c.fixed(_ns(casadi) / _ns(native))}×"
            )
    native = pick("mlp", lambda r: bool(r.get("base")))
    floor = pick("mlp", lambda r: bool(r.get("floor")))
    if native and floor:
        lines.append(
            c.verdict(
                "native MLP vs bandwidth floor", _ns(native) / _ns(floor), 2.0, False, "× the floor"
            )
        )
    for mark, theirs in (("base", "serial"), ("threads", "thread")):
        native = pick("batch", partial(_flagged, mark))
        casadi = pick("batch", partial(_mapped, theirs))
        if native and casadi:
            label = native["label"].removeprefix("ours: ")
            lines.append(
                c.verdict(
                    f"batch speed-up of {label} over CasADi map ({theirs})",
                    _ns(casadi) / _ns(native),
                    1.0,
                    True,
                    "×",
                )
            )
    for graph in ("mlp", "chain", "random"):
        ours = pick(graph, partial(_flagged, "sweeps"))
        old = pick(graph, partial(_flagged, "baseline"))
        if ours and old:
            lines.append(
                c.verdict(
                    f"{graph}: native sweeps vs the baseline commit's (same run)",
                    _ns(ours) / _ns(old),
                    1.05,
                    False,
                    "× the baseline",
                )
            )
    sweeps = pick("mlp", partial(_flagged, "sweeps"))
    hvp = pick("mlp", partial(_flagged, "hvp"))
    jtimes = pick("mlp", lambda r: r.get("casadi") == "d")
    if sweeps and hvp:
        lines.append(
            c.verdict(
                "MLP HVP vs one forward + reverse sweep", _ns(hvp) / _ns(sweeps), 4.0, False, "×"
            )
        )
    if hvp and jtimes:
        lines.append(
            c.verdict(
                "MLP HVP speed-up over CasADi jtimes of the gradient",
                _ns(jtimes) / _ns(hvp),
                1.0,
                True,
                "×",
            )
        )
        if abs(hvp["hvp_check"] - jtimes["hvp_check"]) > 1e-9 * max(1.0, abs(hvp["hvp_check"])):
            ours, theirs = hvp["hvp_check"], jtimes["hvp_check"]
            lines.append(f"- HVP disagrees: ours {ours!r}, CasADi {theirs!r}")
    print("\n### Targets\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
