"""The C kernel's portable build (``-DMG_PORTABLE_SWITCH``: a ``switch`` per node instead of
computed gotos) compiled once here and held bit-equal to the installed build.

Compilers without GNU C's label addresses get the portable sweeps; no
installed build ever does, so without this test they would never run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "engine").glob("_kernel*.c"))

COMPARE = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import _kernel as portable
from micrograd import _kernel as threaded
from tests.graphs import random_dag

checked = 0
for seed in range(20):
    graph = random_dag(seed, size=60)
    tape = graph.tape()
    columns = (tape.code, tape.arg0, tape.arg1, tape.const)
    third = {"arg2": tape.arg2}
    for leaves in (tape.leaf_values(graph.bindings[0]), tape.leaf_values(graph.bindings)):
        results = []
        for kernel in (threaded, portable):
            values = np.ascontiguousarray(leaves.copy())
            grads = np.zeros_like(values)
            kernel.forward(*columns, values, **third)
            kernel.backward(*columns, values, grads, len(tape) - 1, **third)
            results.append((values, grads))
        (v1, g1), (v2, g2) = results
        assert v1.tobytes() == v2.tobytes(), f"forward differs for random_dag({seed})"
        assert g1.tobytes() == g2.tobytes(), f"backward differs for random_dag({seed})"
        checked += 1
    # the compiled program of each build against the installed one-binding sweeps
    values = np.ascontiguousarray(tape.leaf_values(graph.bindings[0]))
    grads = np.zeros_like(values)
    threaded.forward(*columns, values, **third)
    threaded.backward(*columns, values, grads, len(tape) - 1, **third)
    everything = np.arange(len(tape), dtype=np.int64)
    for kernel in (threaded, portable):
        program = kernel.compile_program(*columns, tape.inputs, len(tape) - 1, **third)
        picked, picked_grads = np.empty((1, len(tape))), np.empty((1, len(tape)))
        kernel.run_program(program, np.asarray(graph.bindings[:1], dtype=np.float64),
                           everything, picked, picked_grads)
        assert picked[0].tobytes() == values.tobytes(), f"program differs for random_dag({seed})"
        assert picked_grads[0].tobytes() == grads.tobytes(), f"program grads, random_dag({seed})"
        checked += 1
print(checked)
"""


@pytest.fixture(scope="module")
def portable_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernel built with ``-DMG_PORTABLE_SWITCH`` as a top-level module ``_kernel``."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    pytest.importorskip("micrograd._kernel", reason="the installed build is the reference")
    out = tmp_path_factory.mktemp("portable")
    target = out / ("_kernel" + str(sysconfig.get_config_var("EXT_SUFFIX")))
    command = [
        compiler,
        "-shared",
        "-fPIC",
        "-O1",
        "-std=c11",
        "-ffp-contract=off",
        "-DMG_PORTABLE_SWITCH",
        f"-I{sysconfig.get_paths()['include']}",
        *map(str, SOURCES),
        "-o",
        str(target),
        "-lm",
        "-lpthread",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def test_the_portable_sweeps_equal_the_installed_ones_bit_for_bit(portable_kernel: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", COMPARE, str(portable_kernel)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) == 80  # 20 graphs: one binding, a batch, two programs
