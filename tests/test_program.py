"""The compiled one-binding program (``NativeKernel.program``) against the reference sweeps.

The program reorders the forward sweep (by level, then op) and keeps the
reverse sweep's order, so every value and gradient must be bit-identical to
``forward`` + ``backward`` on one binding (NaN payloads aside): on random
graphs of every op including ``where``, with NaN and infinities, nodes the
output does not reach, outputs in the middle of the tape, and a stop flag or
deadline still honoured.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from micrograd import ops
from micrograd.tape import Tape

from tests.graphs import affine_chain_tape, random_dag

native = pytest.importorskip("micrograd.native", reason="the C extension is not built")
from micrograd import _kernel  # noqa: E402

NATIVE = native.NativeKernel()
EDGE = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 2.0, 0.5, 1e-300, 710.0)
EXPONENTS = (0.0, 1.0, 2.0, 3.0, -1.0, 0.5, -0.5, 1.5)


def wild_tape(seed: int, n: int = 400, leaves: int = 14, ternary: bool = True) -> Tape:
    """A seeded random DAG over every op (``where`` too when ``ternary``), with edge-case
    leaves and exponents, arguments both near and anywhere earlier, some used twice."""
    rng = np.random.default_rng(seed)
    inner = [op for op in ops.OPS if op.arity and (ternary or op.arity < 3)]
    code = np.empty(n, np.uint8)
    a = np.full(n, -1, np.int32)
    b = np.full(n, -1, np.int32)
    z = np.full(n, -1, np.int32)
    c = np.zeros(n)
    for i in range(n):
        if i < leaves:
            code[i] = ops.INPUT.code if i % 3 else ops.CONST.code
            c[i] = EDGE[rng.integers(len(EDGE))] if rng.random() < 0.3 else rng.normal()
            continue
        op = inner[(i - leaves) % len(inner)] if i - leaves < len(inner) else rng.choice(inner)
        code[i] = op.code

        a[i] = _arg(rng, i)
        if op.arity >= 2:
            b[i] = a[i] if rng.random() < 0.1 else _arg(rng, i)
        if op.arity == 3:
            z[i] = b[i] if rng.random() < 0.1 else _arg(rng, i)
        if op.uses_value:
            c[i] = EXPONENTS[rng.integers(len(EXPONENTS))]
    return Tape.from_arrays(code, a, b, c, arg2=z if ternary else None)


def _arg(rng: np.random.Generator, i: int) -> int:
    """An argument of node ``i``: one of the three before it, or any earlier node."""
    return int(rng.integers(max(0, i - 3), i) if rng.random() < 0.5 else rng.integers(i))


def reference(tape: Tape, row: np.ndarray, output: int) -> tuple[np.ndarray, np.ndarray]:
    """Every node's value and gradient from the one-binding sweeps."""
    values = tape.leaf_values(row)
    grads = np.zeros_like(values)
    with np.errstate(all="ignore"):
        NATIVE.forward(tape, values)
        NATIVE.backward(tape, values, grads, output)
    return values, grads


def kept(tape: Tape, output: int) -> bool:
    """Whether ``NativeKernel.program`` holds a built program for ``(tape, output)``."""
    entry = native._PROGRAMS.get((id(tape), output))
    return entry is not None and entry[0]() is tape and entry[2] is not None


def check(tape: Tape, bindings: np.ndarray, output: int, selection: np.ndarray) -> None:
    """The first call sweeps the tape itself, the second runs the program built then: both
    bit-identical to the reference sweeps."""
    for _ in range(2):
        with np.errstate(all="ignore"):
            values, grads = NATIVE.evaluate_selected(
                tape, tape.inputs, bindings, output, selection
            )
        assert grads is not None
        for r, row in enumerate(bindings):
            want_values, want_grads = reference(tape, row, output)
            np.testing.assert_array_equal(values[r], want_values[selection])
            np.testing.assert_array_equal(grads[r], want_grads[selection])
    assert kept(tape, output)


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("seed", range(10))
def test_the_program_is_bit_identical_to_the_sweeps(seed: int, ternary: bool) -> None:
    tape = wild_tape(seed, ternary=ternary)
    rng = np.random.default_rng(seed + 100)
    n = len(tape)
    rows = 1 + seed % (native.TILE - 1)
    bindings = rng.normal(size=(rows, len(tape.inputs))) * 3
    bindings[0, 0] = (math.nan, math.inf, -0.0)[seed % 3]
    everything = np.arange(n, dtype=np.int64)
    for output in (n - 1, int(rng.integers(n // 3, n - 1))):  # later nodes: gradient 0
        check(tape, bindings, output, everything)


@pytest.mark.parametrize("seed", range(12))
def test_well_conditioned_graphs_of_every_op_match(seed: int) -> None:
    graph = random_dag(seed, size=80)
    tape = graph.tape()
    selection = np.append(tape.inputs, len(tape) - 1).astype(np.int64)
    check(tape, np.asarray(graph.bindings, dtype=np.float64)[:1], len(tape) - 1, selection)


def test_a_wide_graph_sorted_into_long_runs_matches() -> None:
    """Thousands of independent nodes per level: the forward runs are long."""
    rng = np.random.default_rng(7)
    k, width, depth = 50, 2000, 4
    code = [ops.INPUT.code] * k
    a, b = [-1] * k, [-1] * k
    for level in range(depth):
        lo, hi = (0, k) if level == 0 else (len(code) - width, len(code))
        for _ in range(width):
            op = ops.BY_NAME[str(rng.choice(["add", "mul", "tanh", "sigmoid", "sub", "neg"]))]
            code.append(op.code)
            a.append(int(rng.integers(lo, hi)))
            b.append(int(rng.integers(lo, hi)) if op.arity == 2 else -1)
    for _ in range(width - 1):  # sum the last level into one output
        code.append(ops.BY_NAME["add"].code)
        a.append(len(code) - 2 if _ else len(code) - width - 1)
        b.append(len(code) - width - 1 - _ - 1)
    tape = Tape.from_arrays(code, a, b, np.zeros(len(code)))
    bindings = rng.normal(size=(2, k))
    check(tape, bindings, len(tape) - 1, np.arange(len(tape), dtype=np.int64))


def test_without_gradients_only_values_come_back() -> None:
    tape = wild_tape(3)
    bindings = np.random.default_rng(1).normal(size=(2, len(tape.inputs)))
    selection = np.arange(len(tape), dtype=np.int64)
    NATIVE.program(tape, tape.inputs, len(tape) - 1)  # the program, not the sweeps
    with np.errstate(all="ignore"):
        values, grads = NATIVE.evaluate_selected(
            tape, tape.inputs, bindings, len(tape) - 1, selection, gradients=False
        )
    assert grads is None
    for r, row in enumerate(bindings):
        np.testing.assert_array_equal(values[r], reference(tape, row, len(tape) - 1)[0])


def test_the_program_is_kept_per_tape_and_output() -> None:
    tape = wild_tape(4, ternary=False)
    n = len(tape)
    first = NATIVE.program(tape, tape.inputs, n - 1)
    assert NATIVE.program(tape, tape.inputs, n - 1) is first
    assert NATIVE.program(tape, tape.inputs, n - 2) is not first
    other = wild_tape(4, ternary=False)  # same columns, another tape: its own program
    assert NATIVE.program(other, other.inputs, n - 1) is not first


def test_a_stop_flag_or_a_passed_deadline_stops_the_program() -> None:
    tape = affine_chain_tape(60_000, 0.5, 0.25)
    bindings = np.ones((1, len(tape.inputs)))
    selection = tape.inputs.astype(np.int64)
    NATIVE.program(tape, tape.inputs, len(tape) - 1)  # built now: the calls below run it
    assert kept(tape, len(tape) - 1)
    with pytest.raises(native.SweepStopped):
        NATIVE.evaluate_selected(
            tape, tape.inputs, bindings, len(tape) - 1, selection, stop=np.ones(1, np.uint8)
        )
    with pytest.raises(native.SweepStopped):
        NATIVE.evaluate_selected(
            tape, tape.inputs, bindings, len(tape) - 1, selection,
            expires=time.monotonic() - 1.0,
        )
    values, grads = NATIVE.evaluate_selected(
        tape, tape.inputs, bindings, len(tape) - 1, selection, stop=np.zeros(1, np.uint8),
        expires=time.monotonic() + 60.0,
    )
    want_values, want_grads = reference(tape, bindings[0], len(tape) - 1)
    np.testing.assert_array_equal(values[0], want_values[selection])
    np.testing.assert_array_equal(grads[0], want_grads[selection])  # type: ignore[index]


def test_the_c_entry_points_check_what_they_are_given() -> None:
    tape = wild_tape(5, ternary=False)
    n = len(tape)
    columns = (tape.code, tape.arg0, tape.arg1, tape.const)
    with pytest.raises(ValueError, match="out of range"):
        _kernel.compile_program(*columns, tape.inputs, n)
    with pytest.raises(ValueError, match="not a leaf"):
        _kernel.compile_program(*columns, np.array([n - 1], np.int64), n - 1)
    bad = tape.arg0.copy()
    bad[n - 1] = n - 1  # not an earlier node
    with pytest.raises(ValueError):
        _kernel.compile_program(tape.code, bad, tape.arg1, tape.const, tape.inputs, n - 1)
    program = _kernel.compile_program(*columns, tape.inputs, n - 1)
    k = len(tape.inputs)
    bindings = np.zeros((1, k))
    with pytest.raises(ValueError, match="not a node"):
        _kernel.run_program(program, bindings, np.array([n], np.int64), np.empty((1, 1)))
    with pytest.raises(ValueError, match="shape"):
        _kernel.run_program(program, np.zeros((1, k + 1)), np.array([0], np.int64),
                            np.empty((1, 1)))
    with pytest.raises(ValueError, match="shape"):
        _kernel.run_program(program, bindings, np.array([0], np.int64), np.empty((2, 1)))
    with pytest.raises(ValueError):
        _kernel.run_program(object(), bindings, np.array([0], np.int64), np.empty((1, 1)))
    # the program keeps its own copy: changing the tape's arrays afterwards changes nothing
    values = np.empty((1, 1))
    tape.arg0.setflags(write=True)
    saved = tape.arg0.copy()
    try:
        tape.arg0[:] = -7
        with np.errstate(all="ignore"):
            _kernel.run_program(program, bindings, np.array([n - 1], np.int64), values)
    finally:
        tape.arg0[:] = saved
    np.testing.assert_array_equal(values[0], reference(tape, bindings[0], n - 1)[0][[n - 1]])


def test_a_graph_past_the_look_ahead_size_matches() -> None:
    """Above PROG_AHEAD_NODES the sweeps ask for arguments ahead of time; same numbers."""
    rng = np.random.default_rng(11)
    k, m = 100, 150_000
    names = ["add", "sub", "mul", "neg", "tanh", "sigmoid", "relu"]
    kinds = rng.integers(len(names), size=m)
    code = np.concatenate([np.full(k, ops.INPUT.code), [ops.BY_NAME[x].code for x in names]])
    code = np.concatenate([code[:k], code[k:][kinds]]).astype(np.uint8)
    idx = np.arange(k, k + m)
    a = np.concatenate([np.full(k, -1), np.floor(rng.random(m) * idx)]).astype(np.int32)
    b = np.concatenate([np.full(k, -1), np.floor(rng.random(m) * idx)]).astype(np.int32)
    unary = np.isin(code, [ops.BY_NAME[x].code for x in ("neg", "tanh", "sigmoid", "relu")])
    b[unary] = -1
    tape = Tape.from_arrays(code, a, b, np.concatenate([rng.uniform(-1, 1, k), np.zeros(m)]))
    n = len(tape)
    selection = np.concatenate([tape.inputs, rng.integers(0, n, 500), [n - 1]]).astype(np.int64)
    check(tape, np.tanh(rng.normal(size=(1, k))), n - 1, selection)
    check(tape, np.tanh(rng.normal(size=(1, k))), n // 2, selection)


def test_a_leaf_as_the_output_has_gradient_one_and_nothing_else() -> None:
    tape = wild_tape(6, ternary=False)
    everything = np.arange(len(tape), dtype=np.int64)
    bindings = np.random.default_rng(2).normal(size=(1, len(tape.inputs)))
    for output in (int(tape.inputs[-1]), 0):
        check(tape, bindings, output, everything)


def test_a_program_is_built_on_the_second_call_not_the_first() -> None:
    """Building costs several sweeps: a graph evaluated once (a one-off request) never pays it."""
    tape = wild_tape(8, ternary=False)
    n = len(tape)
    bindings = np.random.default_rng(3).normal(size=(1, len(tape.inputs)))
    selection = np.arange(n, dtype=np.int64)
    with np.errstate(all="ignore"):
        first = NATIVE.evaluate_selected(tape, tape.inputs, bindings, n - 1, selection)
        assert not kept(tape, n - 1)
        second = NATIVE.evaluate_selected(tape, tape.inputs, bindings, n - 1, selection)
    assert kept(tape, n - 1)
    for one, other in zip(first, second):
        np.testing.assert_array_equal(one, other)


def test_programs_past_the_memory_budget_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    tape = wild_tape(9, ternary=False)
    n = len(tape)
    monkeypatch.setattr(native, "PROGRAM_BYTES_KEPT", native.PROGRAM_BYTES_PER_NODE * n - 1)
    bindings = np.zeros((1, len(tape.inputs)))
    selection = np.arange(n, dtype=np.int64)
    with np.errstate(all="ignore"):
        for _ in range(3):
            values, _grads = NATIVE.evaluate_selected(tape, tape.inputs, bindings, n - 1, selection)
            np.testing.assert_array_equal(values[0], reference(tape, bindings[0], n - 1)[0])
    assert not kept(tape, n - 1)
    assert NATIVE.program(tape, tape.inputs, n - 1) is not NATIVE.program(tape, tape.inputs, n - 1)


def test_a_tapes_columns_are_read_only() -> None:
    tape = wild_tape(10)
    for column in (tape.code, tape.arg0, tape.arg1, tape.const, tape.arg2, tape.inputs):
        assert column is not None
        with pytest.raises(ValueError, match="read-only"):
            column[0] = column[0]
