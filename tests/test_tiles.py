"""Tiled batch evaluation (``Tape.evaluate_selected``) against the full sweeps.

The native kernel sweeps a batch a tile of bindings at a time and keeps only
the selected nodes; every binding goes through the same operations in the
same order as the full sweeps, so its numbers must be bit-identical to them
(NaN payloads aside), and within 1e-12 of the Python kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from micrograd import ops
from micrograd.errors import GraphError
from micrograd.kernels import PythonKernel
from micrograd.tape import Tape

native = pytest.importorskip("micrograd.native", reason="the C extension is not built")

NATIVE = native.NativeKernel()
EDGE = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 2.0, 0.5, 1e-300, 710.0)
EXPONENTS = (0.0, 1.0, 2.0, 3.0, -1.0, 0.5, -0.5, 1.5)


def random_tape(seed: int, n: int = 300, leaves: int = 12, window: int = 20) -> Tape:
    """A seeded random DAG using every unary and binary op of the table (tapes with a ternary
    node are swept whole, see below); some nodes use one argument twice."""
    rng = np.random.default_rng(seed)
    inner = [op for op in ops.OPS if op.arity in (1, 2)]
    code = np.empty(n, np.uint8)
    a = np.full(n, -1, np.int32)
    b = np.full(n, -1, np.int32)
    c = np.zeros(n)
    for i in range(n):
        if i < leaves:
            code[i] = ops.INPUT.code if i % 3 else ops.CONST.code
            c[i] = EDGE[rng.integers(len(EDGE))] if rng.random() < 0.3 else rng.normal()
            continue
        op = inner[(i - leaves) % len(inner)] if i - leaves < len(inner) else rng.choice(inner)
        code[i] = op.code
        a[i] = rng.integers(max(0, i - window), i)
        if op.arity == 2:
            b[i] = a[i] if rng.random() < 0.1 else rng.integers(max(0, i - window), i)
        if op.uses_value:
            c[i] = EXPONENTS[rng.integers(len(EXPONENTS))]
    return Tape.from_arrays(code, a, b, c)


def full(
    tape: Tape, bindings: np.ndarray, selection: np.ndarray, output: int, kernel: object
) -> tuple[np.ndarray, np.ndarray]:
    """The selected columns of the full sweeps' ``(B, n)`` values and gradients."""
    with np.errstate(all="ignore"):
        values, grads = tape.evaluate(bindings, output, kernel=kernel)  # type: ignore[arg-type]
    return values[:, selection], grads[:, selection]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 35])
def test_tiles_are_bit_identical_to_the_full_sweeps(seed: int, rows: int) -> None:
    tape = random_tape(seed)
    rng = np.random.default_rng(seed + 1000)
    bindings = rng.normal(size=(rows, len(tape.inputs))) * 2
    bindings[0, 0] = math.nan if seed % 2 else 0.0
    n = len(tape)
    output = int(rng.integers(n // 2, n))
    selection = np.concatenate([tape.inputs, rng.integers(0, n, 40), [output, n - 1, 0]]).astype(
        np.int64
    )
    expected_values, expected_grads = full(tape, bindings, selection, output, NATIVE)
    for threads in (1, 3):
        values, grads = tape.evaluate_selected(
            bindings, selection, output, kernel=NATIVE, threads=threads
        )
        assert values.shape == grads.shape == (rows, selection.shape[0])  # type: ignore[union-attr]
        np.testing.assert_array_equal(values, expected_values)
        np.testing.assert_array_equal(grads, expected_grads)


def tiled(
    tape: Tape, bindings: np.ndarray, selection: np.ndarray, output: int, tile: int, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """The C entry point at one tile width (0: the kernel's choice)."""
    from micrograd import _kernel

    values = np.full((bindings.shape[0], selection.shape[0]), 7.0)
    grads = np.full_like(values, 7.0)
    with np.errstate(all="ignore"):
        done = _kernel.evaluate_tiles(
            tape.code,
            tape.arg0,
            tape.arg1,
            tape.const,
            tape.inputs.astype(np.int64),
            np.ascontiguousarray(bindings),
            output,
            selection,
            values,
            grads,
            threads=threads,
            tile=tile,
        )
    assert done
    return values, grads


def mlp_like_tape(seed: int, width: int = 6, layers: int = 3) -> Tape:
    """Dot products (mul/add chains) into relu/tanh layers, like an MLP loss graph: most values
    and gradients are short-lived, which is what the tiles' slot reuse exploits."""
    rng = np.random.default_rng(seed)
    nodes: list[tuple[str, tuple[int, ...], float]] = []

    def add(op: str, args: tuple[int, ...] = (), value: float = 0.0) -> int:
        nodes.append((op, args, value))
        return len(nodes) - 1

    layer = [add("input", (), float(v)) for v in rng.normal(size=4)]
    for depth in range(layers):
        out = []
        for _ in range(width):
            acc = add("const", (), 0.5)
            for x in layer:
                w = add("input", (), float(rng.normal()))
                acc = add("add", (acc, add("mul", (w, x))))
            out.append(add("relu" if depth % 2 == 0 else "tanh", (acc,)))
        layer = out
    total = layer[0]
    for x in layer[1:]:
        total = add("add", (total, add("mul", (x, x))))
    add("exp", (add("div", (total, add("sub", (layer[-1], add("const", (), 3.0))))),))
    return Tape.from_nodes(nodes)


@pytest.mark.parametrize("tile", [0, 8, 16])
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 33, 47])
def test_every_tile_width_and_thread_count_gives_the_same_bits(tile: int, rows: int) -> None:
    for seed, tape in enumerate([random_tape(20 + rows), mlp_like_tape(rows)]):
        rng = np.random.default_rng(seed + rows)
        bindings = rng.normal(size=(rows, len(tape.inputs))) * 2
        n = len(tape)
        output = n - 1 if seed else int(rng.integers(n // 2, n))
        selection = np.concatenate(
            [tape.inputs, rng.integers(0, n, 30), [output, n - 1, 0, 0]]
        ).astype(np.int64)
        expected = full(tape, bindings, selection, output, NATIVE)
        for threads in (1, 2, 3):
            values, grads = tiled(tape, bindings, selection, output, tile, threads)
            np.testing.assert_array_equal(values, expected[0])
            np.testing.assert_array_equal(grads, expected[1])


def test_the_c_entry_point_refuses_other_tile_widths() -> None:
    tape = random_tape(5)
    with pytest.raises(ValueError, match="tile"):
        tiled(tape, np.zeros((4, len(tape.inputs))), np.array([0], np.int64), 5, 12, 1)


@pytest.mark.parametrize("op", [op for op in ops.OPS if op.partials_read != "xyo"])
def test_partials_read_only_what_the_table_says(op: ops.Op) -> None:
    """A tile drops a value no partial derivative reads: changing one must change nothing."""
    rng = np.random.default_rng(op.code)
    for _ in range(50):
        x, y, c, o = rng.normal(size=4) * 3
        got = op.partials(x, y, c, o)
        for name in "xyo":
            if name in op.partials_read:
                continue
            other = {"x": x, "y": y, "o": o, name: float(rng.normal() * 5)}
            moved = op.partials(other["x"], other["y"], c, other["o"])
            np.testing.assert_array_equal(moved, got)
            vmoved = op.vpartials(
                np.array([other["x"]]), np.array([other["y"]]), c, np.array([other["o"]])
            )
            np.testing.assert_array_equal(
                np.broadcast_arrays(*vmoved, np.zeros(1))[:2],
                np.broadcast_arrays(
                    *op.vpartials(np.array([x]), np.array([y]), c, np.array([o])), np.zeros(1)
                )[:2],
            )


def test_a_tape_with_where_is_swept_whole_with_the_same_numbers() -> None:
    base = random_tape(3)
    n = len(base)
    z = np.full(n + 1, -1, np.int32)
    z[n] = n - 2
    tape = Tape.from_arrays(
        np.append(base.code, ops.BY_NAME["where"].code),
        np.append(base.arg0, n - 1),
        np.append(base.arg1, n - 3),
        np.append(base.const, 0.0),
        None,
        z,
    )
    bindings = np.random.default_rng(4).normal(size=(40, len(tape.inputs)))
    selection = np.arange(n + 1, dtype=np.int64)
    expected = full(tape, bindings, selection, n, NATIVE)
    with np.errstate(all="ignore"):
        got = tape.evaluate_selected(bindings, selection, n, kernel=NATIVE, threads=2)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(4))
def test_tiles_agree_with_the_python_kernel(seed: int) -> None:
    tape = random_tape(seed + 50)
    rng = np.random.default_rng(seed)
    bindings = rng.normal(size=(20, len(tape.inputs)))
    selection = np.arange(len(tape), dtype=np.int64)
    expected_values, expected_grads = full(tape, bindings, selection, -1, PythonKernel())
    values, grads = tape.evaluate_selected(bindings, selection, kernel=NATIVE, threads=2)
    np.testing.assert_allclose(values, expected_values, rtol=1e-12, atol=0)
    np.testing.assert_allclose(grads, expected_grads, rtol=1e-12, atol=0)  # type: ignore[arg-type]


def test_python_kernel_takes_the_same_call() -> None:
    tape = random_tape(7)
    bindings = np.random.default_rng(7).normal(size=(10, len(tape.inputs)))
    selection = tape.inputs
    with np.errstate(all="ignore"):
        ref = tape.evaluate_selected(bindings, selection, kernel=PythonKernel())
    got = tape.evaluate_selected(bindings, selection, kernel=NATIVE)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-12, atol=0)  # type: ignore[arg-type]


def test_without_gradients_only_values_come_back() -> None:
    tape = random_tape(3)
    bindings = np.random.default_rng(3).normal(size=(16, len(tape.inputs)))
    values, grads = tape.evaluate_selected(bindings, [5, 6], gradients=False, kernel=NATIVE)
    assert grads is None
    np.testing.assert_array_equal(values, full(tape, bindings, np.array([5, 6]), -1, NATIVE)[0])


def test_nodes_the_output_does_not_reach_report_zero_gradients() -> None:
    # node 3 = x * y is not an argument of the output node 4 = -x
    tape = Tape.from_nodes(
        [
            ("input", (), 1.0),
            ("input", (), 2.0),
            ("const", (), 3.0),
            ("mul", (0, 1), 0.0),
            ("neg", (0,), 0.0),
        ]
    )
    bindings = np.tile([[1.5, -2.0]], (12, 1))
    values, grads = tape.evaluate_selected(bindings, [0, 1, 2, 3, 4], output=4, kernel=NATIVE)
    np.testing.assert_array_equal(grads, np.tile([[-1.0, 0.0, 0.0, 0.0, 1.0]], (12, 1)))
    np.testing.assert_array_equal(values[:, 3], np.full(12, -3.0))


def test_bad_requests_raise_graph_errors() -> None:
    tape = random_tape(1)
    bindings = np.zeros((9, len(tape.inputs)))
    with pytest.raises(GraphError, match="out of range"):
        tape.evaluate_selected(bindings, [len(tape)], kernel=NATIVE)
    with pytest.raises(GraphError, match="shape"):
        tape.evaluate_selected(np.zeros((9, 1)), [0], kernel=NATIVE)
    with pytest.raises(GraphError, match="output"):
        tape.evaluate_selected(bindings, [0], output=len(tape), kernel=NATIVE)


def test_the_c_entry_point_checks_what_it_is_given() -> None:
    from micrograd import _kernel

    tape = random_tape(2)
    k = len(tape.inputs)
    bindings = np.zeros((8, k))
    out = np.empty((8, 1))
    args = (tape.code, tape.arg0, tape.arg1, tape.const)
    not_leaf = np.full(k, len(tape) - 1, dtype=np.int64)
    with pytest.raises(ValueError, match="not a leaf"):
        _kernel.evaluate_tiles(*args, not_leaf, bindings, 5, np.array([0]), out)
    with pytest.raises(ValueError, match="selection"):
        _kernel.evaluate_tiles(*args, tape.inputs, bindings, 5, np.array([-1]), out)
    with pytest.raises(ValueError, match="shape"):
        _kernel.evaluate_tiles(*args, tape.inputs, bindings, 5, np.array([0]), np.empty((7, 1)))
    with pytest.raises(TypeError, match="int64"):
        _kernel.evaluate_tiles(*args, tape.inputs.astype(np.int32), bindings, 5, np.array([0]), out)


def test_a_batch_with_a_selection_through_the_server_is_tiled_and_exact(
    grpc_server_factory: Callable[..., Any],
) -> None:
    """1,200,000 node-bindings: the server sweeps them by tiles on 2 threads, unary and streamed."""
    from micrograd.client import Client

    tape = random_tape(11, n=300)
    rows = np.random.default_rng(11).normal(size=(4_000, len(tape.inputs)))
    expected_values, expected_grads = full(tape, rows, tape.inputs, -1, NATIVE)
    server = grpc_server_factory(kernel_threads=2)
    with Client(server.target) as client:
        for stream in (False, True):
            result = client.evaluate(tape, batch=rows, selection="inputs", stream=stream)
            np.testing.assert_array_equal(result.values, expected_values)
            np.testing.assert_array_equal(result.grads, expected_grads)
        listed = [int(tape.inputs[0]), 299, 150]
        result = client.evaluate(tape, batch=rows[:9], selection=listed, gradients=False)
        np.testing.assert_array_equal(result.values, full(tape, rows[:9], listed, -1, NATIVE)[0])
        assert result.grads is None


def test_a_stopped_tiled_sweep_says_so_and_the_next_call_is_whole() -> None:
    from micrograd import _kernel

    tape = mlp_like_tape(3, width=20, layers=4)
    bindings = np.random.default_rng(3).normal(size=(64, len(tape.inputs)))
    selection = tape.inputs.astype(np.int64)
    args = (tape.code, tape.arg0, tape.arg1, tape.const, selection, bindings, len(tape) - 1)
    values, grads = np.empty((64, selection.shape[0])), np.empty((64, selection.shape[0]))
    stop = np.ones(1, np.uint8)
    assert not _kernel.evaluate_tiles(*args, selection, values, grads, threads=2, stop=stop)
    assert not _kernel.evaluate_tiles(*args, selection, values, grads, expires=1e-9)
    expected = full(tape, bindings, selection, len(tape) - 1, NATIVE)
    np.testing.assert_array_equal(
        tiled(tape, bindings, selection, len(tape) - 1, 0, 2)[1], expected[1]
    )
