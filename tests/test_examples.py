"""The local examples run as a user would run them: as scripts, in a fresh process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_train_moons_reaches_full_training_accuracy(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_moons.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert progress[0].startswith("step 0 loss ")
    assert all(re.fullmatch(r"step \d+ loss \d+\.\d{6} accuracy \d+%", line) for line in progress)
    assert re.fullmatch(r"final loss \d+\.\d{6} accuracy 100%", lines[-1])


def test_moons_data_is_seeded_and_balanced() -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        from train_moons import moons
    finally:
        sys.path.remove(str(EXAMPLES))
    points = moons()
    assert len(points) == 100 and moons() == points
    assert sum(1 for _, _, label in points if label > 0) == 50
    assert moons(seed=1) != points
    clean = moons(noise=0.0)
    # Without noise the upper moon lies on the unit circle, the lower on its shifted mirror.
    assert all(abs(x1 * x1 + x2 * x2 - 1.0) < 1e-12 for x1, x2, y in clean if y > 0)
    assert all(abs((x1 - 1) ** 2 + (x2 - 0.5) ** 2 - 1.0) < 1e-12 for x1, x2, y in clean if y < 0)
