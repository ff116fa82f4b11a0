"""Engine benchmark: building and differentiating graphs, ours beside micrograd and PyTorch.

    python bench/engine.py [--quick]

Two graphs, each run by every system in its own process:

* ``mlp``: micrograd's demo loss for ``MLP(2, [16, 16, 1])`` on 100 two-moons
  points: mean of ``relu(1 - y * score)`` plus ``1e-4 * sum(p * p)``.
* ``chain``: ``y = relu(y * 0.9999 + 0.001)`` repeated 100,000 times (ops
  micrograd 0.1.0 has; it has no ``tanh``).

Systems: micrograd 0.1.0 from PyPI, PyTorch scalar autograd (one float64
0-d tensor per value), our ``Value``, and our tape with every kernel this
machine has (compile time reported apart from the sweeps). Each runs in its
own process; then the collected-heap method runs micrograd 0.1.0 and our
``Value`` in one process, alternating, each run from a collected heap. Figures are
medians of N runs; "nodes" is always the size of our graph (``len`` of the
tape), so nodes/s compares the same work across systems.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import _common as c

CHAIN_STEPS = 100_000
QUICK_CHAIN_STEPS = 20_000
TRACED_CHAIN_STEPS = 5_000
GRAPH_TITLES = {
    "mlp": "MLP(2, [16, 16, 1]) SVM loss over {points} points",
    "chain": "chain y = relu(y * 0.9999 + 0.001), {steps:,} steps",
}
REPEATS = {  # (mlp, chain): fewer for the slow systems
    "micrograd": (5, 3),
    "torch": (5, 3),
    "value": (7, 5),
    "tape": (9, 5),
}
TARGET_VALUE_SPEEDUP = 8.0
TARGET_BYTES_PER_NODE = {"mlp": 142.0, "chain": 154.0}
"""``Value``'s tracemalloc bytes per node of build + backward before the native walks:
not to grow."""
TARGET_TAPE_SPEEDUP = 20.0


# -- the graphs in each system ---------------------------------------------------


class TorchMLP:
    """``MLP(2, [16, 16, 1])`` on PyTorch 0-d float64 tensors, summing in micrograd's order."""

    def __init__(self, torch: Any, weights: list[float]) -> None:
        """One ``requires_grad`` leaf per parameter, in micrograd's ``parameters()`` order."""
        self.params = [torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in weights]
        nin, nouts = c.MLP_SIZES
        self.layers: list[list[tuple[list[Any], Any]]] = []
        it = iter(self.params)
        sizes = [nin, *nouts]
        for i in range(len(nouts)):
            layer = []
            for _ in range(sizes[i + 1]):
                w = [next(it) for _ in range(sizes[i])]
                layer.append((w, next(it)))
            self.layers.append(layer)

    def __call__(self, x: list[Any]) -> Any:
        """The network's output for one point."""
        out: list[Any] = x
        for depth, layer in enumerate(self.layers):
            last = depth == len(self.layers) - 1
            acts = []
            for w, b in layer:
                act = b
                for wi, xi in zip(w, out):
                    act = act + wi * xi
                acts.append(act if last else act.relu())
            out = acts
        return out[0]

    def parameters(self) -> list[Any]:
        """The leaves, in micrograd's order."""
        return self.params


def _with_weights(model: Any) -> Any:
    """Overwrite a micrograd-style model's parameters with the bench's seeded weights."""
    for p, w in zip(model.parameters(), c.mlp_weights(), strict=True):
        p.data = w
    return model


def _in_deep_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread with a 1 GiB stack and a recursion limit of 10 million frames."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # handed back to the caller's thread
            out["error"] = e

    sys.setrecursionlimit(10_000_000)
    threading.stack_size(1 << 30)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    threading.stack_size(0)
    if "error" in out:
        raise out["error"]
    return out.get("value")


Check = Callable[[], tuple[float, float]]


def _work(system: str, graph: str, steps: int) -> tuple[Callable[[], Any], Check, str]:
    """``(run, check, note)``: ``run`` builds the graph and back-propagates.

    ``check`` does a fresh run and returns the output and its derivative
    w.r.t. the first leaf, to show that every system computed the same.
    """
    points = c.moons()
    note = ""
    if system == "torch":
        import torch

        if graph == "mlp":
            model: Any = TorchMLP(torch, c.mlp_weights())
        leaf = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True)
    elif system == "micrograd":
        mg = c.import_micrograd_pypi()
        if graph == "mlp":
            model = _with_weights(mg.nn.MLP(c.MLP_SIZES[0], c.MLP_SIZES[1]))
        leaf = mg.engine.Value
    else:
        from micrograd.engine import Value
        from micrograd.nn import MLP

        if graph == "mlp":
            model = _with_weights(MLP(c.MLP_SIZES[0], c.MLP_SIZES[1]))
        leaf = Value

    def zero(xs: list[Any]) -> None:
        for x in xs:
            x.grad = None if system == "torch" else 0.0

    def grad(x: Any) -> float:
        return float(x.grad)

    if graph == "mlp":

        def run() -> Any:
            loss = c.svm_loss(model, points)
            loss.backward()
            return loss

        def check() -> tuple[float, float]:
            zero(model.parameters())
            loss = run()
            out = float(loss.item() if system == "torch" else loss.data)
            return out, grad(model.parameters()[0])

        return run, check, note

    def run_chain() -> Any:
        y0, y = c.relu_chain(leaf, steps)
        y.backward()
        return y0, y

    def check_chain() -> tuple[float, float]:
        y0, y = run_chain()
        return float(y.data if system != "torch" else y.item()), grad(y0)

    if system == "micrograd":
        note = "recursive backward: recursion limit 10M, 1 GiB thread stack"
        return (lambda: _in_deep_thread(run_chain)), (lambda: _in_deep_thread(check_chain)), note
    return run_chain, check_chain, note


def _our_graph(graph: str, steps: int) -> tuple[Any, list[Any], Any]:
    """Our ``Value`` graph: ``(root, nodes in tape order, first leaf)``."""
    from micrograd.engine import Value, topological_order
    from micrograd.nn import MLP

    if graph == "mlp":
        model = _with_weights(MLP(c.MLP_SIZES[0], c.MLP_SIZES[1]))
        root = c.svm_loss(model, c.moons())
        first = model.parameters()[0]
    else:
        first, root = c.relu_chain(Value, steps)
    return root, topological_order(root), first


def chain_size(steps: int) -> int:
    """Nodes of our chain: per step two constants, ``*``, ``+`` and ``relu``; plus ``y0``."""
    return 5 * steps + 1


def graph_size(graph: str, steps: int) -> int:
    """Nodes of our graph (the tape's length): the common count behind nodes/s."""
    return len(_our_graph(graph, steps)[1])


# -- workers ----------------------------------------------------------------------


def worker(system: str, graph: str, steps: int, repeats: int) -> dict[str, Any]:
    """Measure one system on one graph in this process; return the report."""
    if system.startswith("tape:"):
        return tape_worker(system.split(":", 1)[1], graph, steps, repeats)
    if system == "heap":
        return heap_worker(graph, steps, repeats)
    run, check, note = _work(system, graph, steps)
    rss = c.rss_growth(run)
    output, dfirst = check()
    traced_steps = None
    if system == "micrograd" and graph == "chain" and steps > TRACED_CHAIN_STEPS:
        # tracemalloc slows micrograd's recursive backward down quadratically with depth
        traced_steps = TRACED_CHAIN_STEPS
        traced = c.traced_peak(_work(system, graph, traced_steps)[0])
        note += f"; tracemalloc figure from a {traced_steps:,}-step chain"
    else:
        traced = c.traced_peak(run)
    times = c.timed(run, repeats)
    return {
        "times": times,
        "traced": traced,
        "traced_steps": traced_steps,
        "rss": rss,
        "output": output,
        "dfirst": dfirst,
        "note": note,
    }


def heap_worker(graph: str, steps: int, repeats: int) -> dict[str, Any]:
    """The collected-heap method: micrograd 0.1.0 and our ``Value`` in one process, alternating.

    Every run starts from a collected heap (``gc.collect()`` before it, not
    timed), so no system pays for the other's garbage, nor for its own from
    the run before; the order of the two alternates from round to round.
    """
    import gc
    import time

    from micrograd.engine import Value
    from micrograd.nn import MLP

    mg = c.micrograd_pypi_beside_ours()
    points = c.moons()
    runs: dict[str, Callable[[], Any]] = {}
    for system, value, mlp in (("micrograd", mg.engine.Value, mg.nn.MLP), ("value", Value, MLP)):
        run: Callable[[], Any]
        if graph == "mlp":
            model = _with_weights(mlp(c.MLP_SIZES[0], c.MLP_SIZES[1]))

            def run_mlp(model: Any = model) -> Any:
                loss = c.svm_loss(model, points)
                loss.backward()
                return loss

            run = run_mlp
        else:

            def run_chain(value: Any = value) -> Any:
                y0, y = c.relu_chain(value, steps)
                y.backward()
                return y0, y

            run = run_chain
        if system == "micrograd" and graph != "mlp":
            run = partial(_in_deep_thread, run)
        runs[system] = run
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            start = time.perf_counter()
            result = runs[name]()
            times[name].append(time.perf_counter() - start)
            del result
    gc.collect()
    return {"times": times}


def tape_worker(kernel_name: str, graph: str, steps: int, repeats: int) -> dict[str, Any]:
    """Compile our graph to a tape, then time forward + backward sweeps with one kernel."""
    from micrograd.kernels import get_kernel
    from micrograd.tape import Tape

    kernel = get_kernel(kernel_name)
    root, _, first = _our_graph(graph, steps)
    compile_times = c.timed(lambda: Tape.from_value(root), max(3, repeats // 2))
    tape, order = Tape.from_value(root)
    first_index = next(i for i, v in enumerate(order) if v is first)
    del order, first
    values, grads = tape.evaluate(kernel=kernel)
    arrays = tape.code.nbytes + tape.arg0.nbytes + tape.arg1.nbytes + tape.const.nbytes
    run = lambda: tape.evaluate(kernel=kernel)
    rss = c.rss_growth(run)
    peak = c.traced_peak(run)
    times = c.timed(run, repeats)
    return {
        "times": times,
        "compile": compile_times,
        "traced": arrays + peak,
        "rss": None if rss is None else arrays + rss,
        "output": float(values[-1]),
        "dfirst": float(grads[first_index]),
        "note": f"compile (Tape.from_value) median {c.fixed(1e3 * c.median(compile_times))} ms,"
        " not included",
    }


# -- the table -----------------------------------------------------------------------


def systems() -> list[str]:
    """The systems to measure, reference systems first, then ours."""
    from micrograd.kernels import available_kernels

    return ["micrograd", "torch", "value", *(f"tape:{k}" for k in available_kernels())]


LABELS = {
    "micrograd": "micrograd 0.1.0 (build+backward)",
    "torch": "PyTorch {torch} scalar (build+backward)",
    "value": "ours: Value (build+backward)",
}


def label(system: str, versions: dict[str, str]) -> str:
    """The row label of ``system``."""
    if system.startswith("tape:"):
        return f"ours: tape, {system[5:]} kernel (fwd+bwd)"
    return LABELS[system].format(**versions)


def main() -> None:
    """Run every system on both graphs, print the tables and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000-step chain, 3 repeats each")
    parser.add_argument("--worker", nargs=2, metavar=("SYSTEM", "GRAPH"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=CHAIN_STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        c.report(worker(args.worker[0], args.worker[1], args.steps, args.repeats))
        return

    import torch

    versions = {"torch": torch.__version__.split("+")[0]}
    c.ensure_micrograd_pypi()
    steps = QUICK_CHAIN_STEPS if args.quick else CHAIN_STEPS
    here = Path(__file__).resolve()
    verdicts: list[str] = []
    for graph in ("mlp", "chain"):
        n = graph_size(graph, steps)
        assert graph != "chain" or n == chain_size(steps)
        title = GRAPH_TITLES[graph].format(points=c.MLP_POINTS, steps=steps)
        print(f"\n### {title}: {n:,} nodes\n", flush=True)
        results: dict[str, dict[str, Any]] = {}
        for system in systems():
            kind = system.split(":")[0]
            repeats = 3 if args.quick else REPEATS[kind][graph == "chain"]
            results[system] = c.run_worker(
                here, [system, graph, "--steps", str(steps), "--repeats", str(repeats)], timeout=900
            )
        base = results["micrograd"]
        base_ms = 1e3 * c.median(base["times"]) if "times" in base else None
        rows = []
        notes = []
        for system, r in results.items():
            if "error" in r:
                failure = f"fails ({r['error']})"
                rows.append([label(system, versions), "—", failure, "—", "—", "—", "—"])
                continue
            ms = 1e3 * c.median(r["times"])
            ratio = base_ms / ms if base_ms else None
            rss = r.get("rss")
            traced_n = n if r.get("traced_steps") is None else chain_size(r["traced_steps"])
            per_node = r["traced"] / traced_n
            rows.append(
                [
                    label(system, versions),
                    str(len(r["times"])),
                    c.fixed(ms),
                    c.si(n / (ms / 1e3)),
                    "n/a (C++ heap)" if system == "torch" else f"{per_node:,.0f}",
                    "—" if rss is None else f"{rss / n:,.0f}",
                    "1.00×" if system == "micrograd" else (f"{c.fixed(ratio)}×" if ratio else "—"),
                ]
            )
            if r.get("note"):
                notes.append(f"- {label(system, versions)}: {r['note']}")
            r["ratio"], r["bytes"] = ratio, per_node
        print(
            c.table(
                [
                    "system",
                    "N",
                    "median ms",
                    "nodes/s",
                    "bytes/node (tracemalloc)",
                    "RSS growth/node",
                    "speed vs micrograd",
                ],
                rows,
            )
        )
        outputs = [(s, r["output"], r["dfirst"]) for s, r in results.items() if "output" in r]
        if outputs:
            ref_out, ref_d = outputs[0][1], outputs[0][2]
            spread = max(
                max(abs(o - ref_out) / abs(ref_out), abs(d - ref_d) / abs(ref_d))
                for _, o, d in outputs
            )
            first = "first parameter" if graph == "mlp" else "y0"
            notes.append(
                f"- output {ref_out:.12g}, d output/d {first} {ref_d:.12g}; largest relative "
                f"difference between systems {spread:.1e}"
            )
        print("\n" + "\n".join(notes))
        heap_repeats = 3 if args.quick else REPEATS["value"][graph == "chain"]
        heap = c.run_worker(
            here,
            ["heap", graph, "--steps", str(steps), "--repeats", str(heap_repeats)],
            timeout=900,
        )
        if "error" in heap:
            print(f"\ncollected-heap method: fails ({heap['error']})")
        else:
            mg_ms = 1e3 * c.median(heap["times"]["micrograd"])
            ours_ms = 1e3 * c.median(heap["times"]["value"])
            print(
                "\ncollected-heap method (both in one process, alternating, gc.collect() before "
                "every run):\n\n"
                + c.table(
                    ["system", "N", "median ms", "speed vs micrograd"],
                    [
                        [LABELS["micrograd"], str(heap_repeats), c.fixed(mg_ms), "1.00×"],
                        [
                            LABELS["value"],
                            str(heap_repeats),
                            c.fixed(ours_ms),
                            f"{c.fixed(mg_ms / ours_ms)}×",
                        ],
                    ],
                )
            )
            verdicts.append(
                c.verdict(
                    f"Value speed vs micrograd, {graph}, collected heap",
                    mg_ms / ours_ms,
                    TARGET_VALUE_SPEEDUP,
                    True,
                    "×",
                )
            )
        value = results.get("value", {})
        if value.get("ratio"):
            verdicts.append(
                c.verdict(
                    f"Value speed vs micrograd, {graph}",
                    value["ratio"],
                    TARGET_VALUE_SPEEDUP,
                    True,
                    "×",
                )
            )
        if "bytes" in value:
            verdicts.append(
                c.verdict(
                    f"Value bytes/node, {graph}",
                    value["bytes"],
                    TARGET_BYTES_PER_NODE[graph],
                    False,
                    " B",
                )
            )
        for system, r in results.items():
            if system.startswith("tape:") and r.get("ratio"):
                verdicts.append(
                    c.verdict(
                        f"tape ({system[5:]}) fwd+bwd vs micrograd, {graph}",
                        r["ratio"],
                        TARGET_TAPE_SPEEDUP,
                        True,
                        "×",
                    )
                )
    print("\n### Targets\n")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
