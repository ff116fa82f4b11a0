"""The committed ``micrograd.v1`` modules are what ``scripts/gen-proto`` makes from the .proto
files, and the wire's ``Op`` enum is exactly the engine's op table."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

from micrograd import ops
from micrograd.v1 import graph_pb2

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "proto" / "micrograd" / "v1"


def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen-proto"), str(tmp_path)],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh = tmp_path / "micrograd" / "v1"
    made = sorted(p.name for p in fresh.iterdir() if p.is_file())
    committed = sorted(p.name for p in GENERATED.glob("*_pb2*"))
    assert made == committed, "scripts/gen-proto makes a different set of modules"
    _, mismatch, errors = filecmp.cmpfiles(fresh, GENERATED, made, shallow=False)
    assert not mismatch and not errors, (
        f"stale generated modules {mismatch + errors}: run scripts/gen-proto"
    )


def test_op_enum_is_the_op_table() -> None:
    wire = {v.name: v.number for v in graph_pb2.Op.DESCRIPTOR.values}
    table = {f"OP_{op.name.upper()}": op.code for op in ops.OPS}
    assert wire == {"OP_UNSPECIFIED": 0, **table}
