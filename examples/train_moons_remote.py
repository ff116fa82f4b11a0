"""Train micrograd's two-moons MLP with every gradient computed by a gradient server.

The loss graph (an ``MLP(2, [16, 16, 1])`` on 100 points, max-margin loss
plus L2) is built once from ``Value`` objects whose parameters and data
points are named inputs, and registered on the server. Each step then sends
only the graph_id and the current parameters by name, gets back their
gradients (and the scores, for the accuracy), and takes an SGD step locally.
A progress bar runs on standard error; ``--plot moons_remote.png`` saves the
decision boundary, its scores computed by the server as one batch.

    ./scripts/serve &
    python examples/train_moons_remote.py --target 127.0.0.1:50051 --plot moons_remote.png
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from micrograd.client import Client
from micrograd.engine import Value
from micrograd.nn import MLP
from micrograd.tape import Tape

Point = tuple[float, float, float]


sys.path.insert(0, str(Path(__file__).resolve().parent))
from moons_plot import plot_boundary, progress, score_graph  # noqa: E402


def local_recipe() -> tuple[Callable[[int], list[Point]], int]:
    """The data generator and weight seed of ``examples/train_moons.py``, the local twin of
    this script beside it, so both train on the same points from the same weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import train_moons  # type: ignore[import-not-found,unused-ignore]
    finally:
        sys.path.pop(0)
    return train_moons.moons, int(train_moons.WEIGHT_SEED)


def loss_graph(
    model: MLP, points: list[Point], alpha: float = 1e-4
) -> tuple[Value, dict[str, Value]]:
    """micrograd's demo loss over named inputs: parameters ``p{j}``, data ``x{i}_{k}``/``y{i}``.

    Scores are named ``score{i}`` so a step can read them for the accuracy.
    """
    names: dict[str, Value] = {f"p{j}": p for j, p in enumerate(model.parameters())}
    margins = []
    for i, (x1, x2, label) in enumerate(points):
        x = [Value(x1), Value(x2)]
        y = Value(label)
        names.update({f"x{i}_0": x[0], f"x{i}_1": x[1], f"y{i}": y})
        score = model(x)
        assert isinstance(score, Value)
        names[f"score{i}"] = score
        margins.append((1 + -y * score).relu())
    data_loss = sum(margins, Value(0.0)) * (1.0 / len(points))
    reg = alpha * sum((p * p for p in model.parameters()), Value(0.0))
    return data_loss + reg, names


def main() -> int:
    """Parse flags, register the loss graph, train, report; exit 0 once accuracy reaches 100 %."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--steps", type=int, default=100, help="SGD steps (default 100)")
    moons, weight_seed = local_recipe()
    parser.add_argument(
        "--seed", type=int, default=weight_seed, help="seed of the initial weights"
    )
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="save the decision boundary")
    args = parser.parse_args()

    points = moons(100)
    model = MLP(2, [16, 16, 1], rng=random.Random(args.seed))
    loss, names = loss_graph(model, points)
    tape, _ = Tape.from_value(loss, names)
    params = [f"p{j}" for j in range(len(model.parameters()))]
    scores = [f"score{i}" for i in range(len(points))]
    selection = [tape.names[name] for name in params + scores] + [len(tape) - 1]
    labels = np.array([label for _, _, label in points])
    theta = np.array([p.data for p in model.parameters()])
    k = len(params)

    with Client(args.target) as client:
        graph_id = client.register(tape)
        print(f"registered the loss graph: {len(tape)} nodes, {k} parameters, id {graph_id}")
        accuracy = 0.0
        for step in range(args.steps):
            result = client.evaluate(
                graph_id, inputs=dict(zip(params, theta.tolist())), selection=selection
            )
            assert result.grads is not None
            accuracy = float(np.mean((result.values[k:-1] > 0) == (labels > 0)))
            lr = 1.0 - 0.9 * step / args.steps
            theta -= lr * result.grads[:k]
            if step % 10 == 0:
                print(f"step {step:3d}  loss {result.values[-1]:.6f}  accuracy {accuracy:.0%}",
                      flush=True)
            progress(step + 1, args.steps, f"loss {result.values[-1]:.4f}")
        final = client.evaluate(
            graph_id, inputs=dict(zip(params, theta.tolist())), selection=selection,
            gradients=False,
        )
        accuracy = float(np.mean((final.values[k:-1] > 0) == (labels > 0)))
        if args.plot is not None:
            for p, value in zip(model.parameters(), theta.tolist()):
                p.data = value
            score, point = score_graph(model)

            def remote_scores(xy: np.ndarray) -> np.ndarray:
                r = client.evaluate(
                    score, names=point, batch={"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist()},
                    selection="output", gradients=False,
                )
                return np.asarray(r.values).reshape(-1)

            plot_boundary(remote_scores, points, args.plot,
                          f"trained through the service: accuracy {accuracy:.0%}")
    print(f"after {args.steps} steps: loss {final.values[-1]:.6f}  accuracy {accuracy:.0%}")
    return 0 if accuracy == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
