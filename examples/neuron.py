"""One neuron, seen: its output, the gradient of every weight, and the picture of its graph.

A ``Neuron(2)`` from ``micrograd.nn`` (ReLU of ``w . x + b``, weights drawn
from a seeded generator) is applied to the point ``(1.0, -2.0)``;
``backward()`` fills in each weight's gradient, which for a neuron that
fires is just the matching input. ``--draw neuron.svg`` (or ``.png``,
``.dot``) writes the graph with data and grad on every node, as micrograd's
``trace_graph`` notebook draws it (SVG and PNG need Graphviz's ``dot``).

    python examples/neuron.py --draw neuron.svg
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from micrograd.engine import Value
from micrograd.nn import Neuron
from micrograd.viz import draw_dot


def main() -> int:
    """Build, differentiate and print one neuron; optionally draw it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draw", type=Path, metavar="FILE", help="write the picture here")
    parser.add_argument("--seed", type=int, default=4, help="seed of the weights (default 4)")
    args = parser.parse_args()

    neuron = Neuron(2, rng=random.Random(args.seed))
    x = [Value(1.0), Value(-2.0)]
    y = neuron(x)
    y.backward()
    *w, b = neuron.parameters()
    print(f"output {y.data:.4f}")
    for i, (wi, xi) in enumerate(zip(w, x)):
        print(f"w{i} {wi.data:.4f}  grad {wi.grad:.4f}  (x{i} = {xi.data:.4f})")
    print(f"b  {b.data:.4f}  grad {b.grad:.4f}")
    if args.draw is not None:
        labels = {f"w{i}": wi for i, wi in enumerate(w)} | {"b": b, "x0": x[0], "x1": x[1]}
        dot = draw_dot(y, names=labels)
        fmt = args.draw.suffix.lstrip(".") or "svg"
        if fmt == "dot":
            args.draw.write_text(dot.source)
        else:
            args.draw.write_bytes(dot.pipe(format=fmt))
        print(f"wrote {args.draw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
