"""Pictures of expression graphs with their data and gradients, as micrograd's notebook draws.

``draw_dot(root)`` takes what micrograd's ``trace_graph`` notebook passes it
(a ``Value`` after ``backward()``) and returns a ``graphviz.Digraph``: one
record per value with its op, ``data`` and ``grad`` (4 decimals), an op node
between each value and its arguments, edges in data-flow order, inputs
filled and the output drawn with a double border. The same function draws a
``Tape`` or a ``micrograd.v1`` ``Graph``/``PackedGraph`` message, with the
values and gradients of a service result filled in by node.

Large graphs stay readable: above ``max_nodes`` (default 200) only the
neighbourhood of the output (or of the ``focus`` nodes) is drawn, found by a
breadth-first walk over arguments and users, and one note node says how many
nodes were left out. Nothing here recurses over graph depth, and the DOT
source never holds more than ``max_nodes`` value records.

Rendering to SVG or PNG needs Graphviz's ``dot`` program (Debian package
``graphviz``); building the ``Digraph`` and its DOT source does not.
"""

from __future__ import annotations

import base64
import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import ops as _ops
from .engine import Value, topological_order
from .ops import ARITY
from .tape import Tape

__all__ = ["DEFAULT_MAX_NODES", "Picture", "draw_dot", "draw_tape", "picture", "trace"]

DEFAULT_MAX_NODES = 200
"""Value records drawn at most, unless the caller says otherwise."""

_INPUT = _ops.BY_NAME["input"].code
_CONST = _ops.BY_NAME["const"].code
_POW = _ops.BY_NAME["pow"].code
_LABEL = {op.code: op.label or op.name for op in _ops.OPS}
_NAME = {op.code: op.name for op in _ops.OPS}
_MESSAGES = ("micrograd.v1.Graph", "micrograd.v1.PackedGraph")


def trace(root: Value) -> tuple[set[Value], set[tuple[Value, Value]]]:
    """micrograd's ``trace``: every node of ``root``'s graph and every (argument, user) edge."""
    nodes = set(topological_order(root))
    edges = {(child, v) for v in nodes for child in v._prev}
    return nodes, edges


@dataclass(frozen=True)
class Picture:
    """What one drawing shows: a tape, the drawn node indices, and who is left out."""

    tape: Tape
    values: np.ndarray | None
    grads: np.ndarray | None
    output: int
    drawn: list[int]
    """Indices of the drawn nodes, in topological order."""
    left_out: int
    """How many nodes of the graph are not drawn."""

    focused: bool = False
    """Whether the drawn part was chosen around ``focus`` nodes rather than the output."""


def _number(x: float) -> str:
    """A number with 4 decimals, as micrograd's ``%.4f``; ``nan``/``inf`` spelled out."""
    return f"{x:.4f}" if math.isfinite(x) else str(x)


def _tape_of(graph: Any) -> Tape:
    """A tape from a ``Tape`` or a ``Graph``/``PackedGraph`` message (recognised by name)."""
    if isinstance(graph, Tape):
        return graph
    full_name = getattr(getattr(graph, "DESCRIPTOR", None), "full_name", None)
    if full_name not in _MESSAGES:
        raise TypeError(
            "draw a Value, a Tape, or a micrograd.v1 Graph/PackedGraph message, "
            f"not {type(graph).__name__}"
        )
    try:
        from . import native
    except ImportError:  # pragma: no cover - without the C extension: per-node Python
        native = None  # type: ignore[assignment]
    if full_name == "micrograd.v1.Graph":
        if native is not None:
            code, a, b, z, c, named = native.decode_graph(graph.SerializeToString())
            return Tape.from_arrays(code, a, b, c, {name: i for i, name in named}, z)
        return Tape.from_nodes(  # pragma: no cover
            (node.op, list(node.args), node.value, node.name) for node in graph.nodes
        )
    names = {nn.name: int(nn.node) for nn in graph.names}
    code = np.frombuffer(graph.ops, dtype=np.uint8)
    if native is not None:
        a, b, z, c = native.unpack_columns(graph.ops, graph.args, graph.values)
        return Tape.from_arrays(code, a, b, c, names, z)
    args = iter(np.frombuffer(graph.args, dtype="<u4").tolist())  # pragma: no cover
    consts = iter(np.frombuffer(graph.values, dtype="<f8").tolist())
    nodes = []
    for k in code.tolist():
        op = _ops.BY_CODE.get(k)
        arity = op.arity if op is not None else 0
        value = next(consts, 0.0) if op is not None and op.uses_value else 0.0
        nodes.append((k, [next(args, 0) for _ in range(arity)], value))
    return Tape.from_arrays(
        [n[0] for n in nodes],
        [n[1][0] if n[1] else -1 for n in nodes],
        [n[1][1] if len(n[1]) > 1 else -1 for n in nodes],
        [n[2] for n in nodes],
        names,
    )


def _result_arrays(
    result: Any, n: int
) -> tuple[np.ndarray | None, np.ndarray | None, int | None]:
    """Per-node ``(values, grads, output)`` from a client ``Result`` or a JSON-RPC result dict.

    A result that reports only selected nodes fills those; the rest stay ``nan``.
    The first row of a batch is drawn.
    """
    if isinstance(result, Mapping):
        raw_values, raw_grads = result.get("values"), result.get("grads")
        raw_nodes, output = result.get("nodes"), result.get("output")
        # binaryOutput: the numbers as base64 little-endian float64 (proto3 JSON of bytes)
        if (raw_values is None or len(raw_values) == 0) and result.get("valuesF64"):
            raw_values = np.frombuffer(base64.b64decode(result["valuesF64"]), dtype="<f8")
        if (raw_grads is None or len(raw_grads) == 0) and result.get("gradsF64"):
            raw_grads = np.frombuffer(base64.b64decode(result["gradsF64"]), dtype="<f8")
    else:
        raw_values = getattr(result, "values", None)
        raw_grads = getattr(result, "grads", None)
        raw_nodes, output = getattr(result, "nodes", None), getattr(result, "output", None)

    def column(raw: Any) -> np.ndarray | None:
        if raw is None:
            return None
        got = np.asarray(raw, dtype=np.float64)
        if got.ndim == 2:
            got = got[0]
        nodes = np.arange(got.shape[0]) if raw_nodes is None or not len(raw_nodes) else raw_nodes
        at = np.asarray(nodes, dtype=np.int64)
        if at.shape != got.shape or (at.size and (at.min() < 0 or at.max() >= n)):
            raise ValueError(
                f"the result reports {got.shape[0]} numbers for nodes that do not fit "
                f"a graph of {n} nodes"
            )
        full = np.full(n, np.nan)
        full[at] = got
        return full

    return column(raw_values), column(raw_grads), None if output is None else int(output)


def _neighbourhood(tape: Tape, seeds: Sequence[int], budget: int) -> list[int]:
    """Up to ``budget`` nodes nearest to ``seeds`` (arguments and users), breadth first."""
    n = len(tape)
    if n <= budget:
        return list(range(n))
    arity = ARITY[tape.code]
    third = np.full(n, -1, dtype=np.int32) if tape.arg2 is None else tape.arg2
    users_of = np.concatenate(
        (np.flatnonzero(arity >= 1), np.flatnonzero(arity >= 2), np.flatnonzero(arity == 3))
    )  # user index, one per edge
    args_of = np.concatenate(
        (tape.arg0[arity >= 1], tape.arg1[arity >= 2], third[arity == 3])
    ).astype(np.int64)
    order = np.argsort(args_of, kind="stable")
    by_arg, users_sorted = args_of[order], users_of[order]
    start = np.searchsorted(by_arg, np.arange(n + 1))
    picked: dict[int, None] = {}
    queue = collections.deque(int(s) for s in seeds)
    while queue and len(picked) < budget:
        i = queue.popleft()
        if i in picked:
            continue
        picked[i] = None
        for j in _arguments(tape, i):
            if j >= 0 and j not in picked:
                queue.append(j)
        for j in users_sorted[start[i] : min(start[i + 1], start[i] + budget)].tolist():
            if j not in picked:
                queue.append(int(j))
    return sorted(picked)


def _arguments(tape: Tape, i: int) -> tuple[int, ...]:
    """Node ``i``'s argument indices, -1 where absent (three slots)."""
    third = -1 if tape.arg2 is None else int(tape.arg2[i])
    return int(tape.arg0[i]), int(tape.arg1[i]), third


def picture(
    graph: Any,
    result: Any = None,
    *,
    values: Sequence[float] | np.ndarray | None = None,
    grads: Sequence[float] | np.ndarray | None = None,
    output: int | None = None,
    max_nodes: int = DEFAULT_MAX_NODES,
    focus: Iterable[int] | None = None,
) -> Picture:
    """Decide what to draw of ``graph`` (a ``Tape`` or a message) with a result's numbers."""
    tape = _tape_of(graph)
    n = len(tape)
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be at least 1, got {max_nodes}")
    got_values, got_grads, got_output = (
        _result_arrays(result, n) if result is not None else (None, None, None)
    )
    if values is not None:
        got_values = _result_arrays({"values": values}, n)[0]
    if grads is not None:
        got_grads = _result_arrays({"values": grads}, n)[0]
    out = tape.check_output(output if output is not None else (got_output or -1))
    seeds = [out] if focus is None else [tape.check_output(int(i)) for i in focus]
    drawn = _neighbourhood(tape, seeds, max_nodes)
    return Picture(tape, got_values, got_grads, out, drawn, n - len(drawn), focus is not None)


def _digraph(format: str, rankdir: str) -> Any:
    """An empty ``graphviz.Digraph`` laid out as micrograd's (``rankdir`` LR or TB)."""
    if rankdir not in ("LR", "TB"):
        raise ValueError(f"rankdir must be 'LR' or 'TB', got {rankdir!r}")
    from graphviz import Digraph

    return Digraph(format=format, graph_attr={"rankdir": rankdir})


def _record(label: str, data: float | None, grad: float | None) -> str:
    """A record's label: ``{ label | data x | grad y }`` (record-special characters escaped)."""
    safe = "".join("\\" + ch if ch in "{}|<>\\\" " else ch for ch in label)
    data_s = "?" if data is None or math.isnan(data) else _number(data)
    grad_s = "?" if grad is None or math.isnan(grad) else _number(grad)
    return f"{{ {safe} | data {data_s} | grad {grad_s} }}"


def draw_tape(
    pic: Picture, format: str = "svg", rankdir: str = "LR"
) -> Any:
    """The ``graphviz.Digraph`` of a ``Picture``: records, op nodes, edges, the left-out note."""
    dot = _digraph(format, rankdir)
    tape = pic.tape
    drawn = set(pic.drawn)
    name_of = {j: name for name, j in tape.names.items() if j in drawn}
    for i in pic.drawn:
        k = int(tape.code[i])
        data = None if pic.values is None else float(pic.values[i])
        grad = None if pic.grads is None else float(pic.grads[i])
        if data is None and k in (_INPUT, _CONST):
            data = float(tape.const[i])
        attrs = {"shape": "record"}
        if k == _INPUT:
            attrs.update(style="filled", fillcolor="lightblue")
        if i == pic.output:
            attrs.update(peripheries="2", color="darkgreen", penwidth="2")
        dot.node(f"n{i}", _record(name_of.get(i, _NAME[k]), data, grad), **attrs)
        if ARITY[k] == 0:
            continue
        op_label = _LABEL[k]
        if k == _POW:
            c = float(tape.const[i])
            op_label = f"**{int(c) if c.is_integer() else c!r}"
        dot.node(f"n{i}op", op_label)
        dot.edge(f"n{i}op", f"n{i}")
        for j in _arguments(tape, i)[: int(ARITY[k])]:
            if j in drawn:
                dot.edge(f"n{j}", f"n{i}op")
    if pic.left_out:
        around = "chosen nodes" if pic.focused else "output"
        dot.node(
            "left_out",
            f"{pic.left_out} of {len(tape)} nodes not drawn\\n"
            f"(showing the {len(pic.drawn)} nearest the {around})",
            shape="note",
            style="dashed",
        )
    return dot


def draw_dot(
    root: Any,
    format: str = "svg",
    rankdir: str = "LR",
    *,
    result: Any = None,
    max_nodes: int = DEFAULT_MAX_NODES,
    focus: Iterable[Any] | None = None,
    names: Mapping[str, Value] | None = None,
) -> Any:
    """micrograd's ``draw_dot``: the ``graphviz.Digraph`` of ``root``'s graph with data and grad.

    ``root`` is a ``Value`` (its ``data``/``grad`` are drawn), a ``Tape`` or a
    ``Graph``/``PackedGraph`` message (numbers from ``result``: a client
    ``Result`` or a JSON-RPC result dict). Above ``max_nodes`` only the
    neighbourhood of the output, or of the ``focus`` nodes (indices, or
    ``Value`` objects of ``root``'s graph), is drawn. ``names`` labels
    ``Value`` nodes (``{"a": a}``) in their records.
    """
    if isinstance(root, Value):
        tape, order = Tape.from_value(root, names)
        seeds: list[int] | None = None
        if focus is not None:
            index = {id(v): i for i, v in enumerate(order)}
            seeds = [index[id(f)] if isinstance(f, Value) else int(f) for f in focus]
        pic = picture(tape, max_nodes=max_nodes, focus=seeds)
        chosen = pic.drawn
        data = np.full(len(tape), np.nan)
        grad = np.full(len(tape), np.nan)
        data[chosen] = [order[i].data for i in chosen]
        grad[chosen] = [order[i].grad for i in chosen]
        pic = Picture(tape, data, grad, pic.output, chosen, pic.left_out, pic.focused)
    else:
        pic = picture(root, result, max_nodes=max_nodes, focus=focus)
    return draw_tape(pic, format=format, rankdir=rankdir)
