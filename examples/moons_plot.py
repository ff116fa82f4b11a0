"""What the two-moons examples show besides numbers: a progress bar and the decision boundary.

``progress`` draws a one-line bar on standard error (standard output keeps
the plain step lines). ``score_graph`` is the model applied to one point
whose coordinates are the named inputs ``x`` and ``y``, so the scores of a
whole grid are one batch: ``plot_boundary`` takes a function from that
grid (``(rows, 2)`` points) to scores and saves the picture as PNG, with
matplotlib (``pip install -e '.[examples]'``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from micrograd.engine import Value
from micrograd.nn import MLP

Point = tuple[float, float, float]


def progress(step: int, total: int, text: str = "", width: int = 30) -> None:
    """Redraw the bar ``[#####.....] step/total text`` on standard error; newline at the end."""
    done = width * step // max(total, 1)
    end = "\n" if step >= total else ""
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {text}{end}")
    sys.stderr.flush()


def score_graph(model: MLP) -> tuple[Value, dict[str, Value]]:
    """The model's score of one point, with the point's coordinates as inputs ``x`` and ``y``."""
    x, y = Value(0.0), Value(0.0)
    score = model([x, y])
    assert isinstance(score, Value)
    return score, {"x": x, "y": y}


def grid(points: Sequence[Point], steps: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """A ``steps`` x ``steps`` mesh around the points: ``(xx, yy)``."""
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    pad = 0.5
    return np.meshgrid(
        np.linspace(xs.min() - pad, xs.max() + pad, steps),
        np.linspace(ys.min() - pad, ys.max() + pad, steps),
    )


def plot_boundary(
    scores_of: Callable[[np.ndarray], np.ndarray],
    points: Sequence[Point],
    path: Path,
    title: str,
) -> None:
    """Save the model's decision regions (score > 0 or not) with the data points as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xx, yy = grid(points)
    scores = np.asarray(scores_of(np.column_stack((xx.ravel(), yy.ravel())))).reshape(xx.shape)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.contourf(xx, yy, scores > 0, levels=[-0.5, 0.5, 1.5], colors=["#f4c7a1", "#a9c8ec"])
    ax.contour(xx, yy, scores, levels=[0.0], colors="k", linewidths=1)
    for label, color in ((1.0, "#1f5fa8"), (-1.0, "#c1580f")):
        chosen = [p for p in points if p[2] == label]
        ax.scatter([p[0] for p in chosen], [p[1] for p in chosen], s=14, c=color)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
