"""The Python client against real servers on loopback (the conftest fixtures).

Expected numbers come from the local engine: ``Value.backward`` and
``Tape.evaluate`` on the same graph, compared bit for bit (the server's
kernels compute the op table's formulas in the same order), and from the
seed document (24.7041, 138.8338, 645.5773).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from micrograd import codec
from micrograd.client import (
    AsyncClient,
    Client,
    InvalidGraph,
    NotFound,
    ResourceExhausted,
    Result,
    Retry,
    Unavailable,
)
from micrograd.engine import Value
from micrograd.tape import Tape
from micrograd.v1 import graph_pb2

from tests.graphs import deep_chain, random_dag, seed_graph, to_values

ROOT = Path(__file__).resolve().parent.parent


def seed_tape() -> Tape:
    """The seed graph compiled, inputs named ``a`` and ``b``, output named ``g``."""
    a, b, g = seed_graph()
    tape, _ = Tape.from_value(g, {"a": a, "b": b, "g": g})
    return tape


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- backward: the remote twin of Value.backward ----------------------------------


def test_backward_gives_the_seed_numbers(grpc_server: str) -> None:
    a, b, g = seed_graph()
    with Client(grpc_server) as client:
        client.backward(g)
    printed = (f"{g.data:.4f}", f"{a.grad:.4f}", f"{b.grad:.4f}")
    assert printed == ("24.7041", "138.8338", "645.5773")


def test_backward_equals_local_backward_bit_for_bit_on_every_node(grpc_server: str) -> None:
    *_, local = seed_graph()
    local.backward()
    *_, remote = seed_graph()
    with Client(grpc_server) as client:
        client.backward(remote)
    from micrograd.engine import topological_order

    pairs = list(zip(topological_order(local), topological_order(remote)))
    assert len(pairs) == 33
    for lv, rv in pairs:
        assert (rv.data, rv.grad) == (lv.data, lv.grad)


def test_backward_accumulates_into_leaves_like_value_backward(grpc_server: str) -> None:
    """Twice in a row: leaves hold the sum (2 x 138.8338...), interior nodes this pass's."""
    *_, local = seed_graph()
    local.backward()
    local.backward()
    a, b, remote = seed_graph()
    with Client(grpc_server) as client:
        client.backward(remote)
        client.backward(remote)
    assert a.grad == 2 * 138.83381924198252 and b.grad == 2 * 645.5772594752186
    assert remote.grad == local.grad == 1.0


@pytest.mark.parametrize("seed", range(8))
def test_remote_gradients_equal_local_ones_on_random_graphs(grpc_server: str, seed: int) -> None:
    dag = random_dag(seed, size=60)
    local = to_values(dag.nodes)
    remote = to_values(dag.nodes)
    out_local, out_remote = local[-1], remote[-1]
    assert isinstance(out_local, Value) and isinstance(out_remote, Value)
    out_local.backward()
    with Client(grpc_server) as client:
        client.backward(out_remote)
    for lv, rv in zip(local, remote):
        if isinstance(lv, Value) and isinstance(rv, Value):
            assert (rv.data, rv.grad) == (lv.data, lv.grad)


# -- evaluate ----------------------------------------------------------------------


def test_every_graph_form_gives_the_same_result(grpc_server: str) -> None:
    tape = seed_tape()
    values, grads = tape.evaluate()
    *_, g = seed_graph()
    forms: list[Any] = [tape, codec.pack(tape), codec.to_graph(tape), g]
    with Client(grpc_server) as client:
        for form in forms:
            result = client.evaluate(form)
            assert np.array_equal(result.values, values)
            assert np.array_equal(result.grads, grads)
            assert result.output == 32 and result.node_count == 33
            assert result.nodes.tolist() == list(range(33))


def test_selection_reports_the_chosen_nodes(grpc_server: str) -> None:
    tape = seed_tape()
    values, grads = tape.evaluate()
    with Client(grpc_server) as client:
        inputs = client.evaluate(tape, selection="inputs")
        named = client.evaluate(tape, selection="named")
        output = client.evaluate(tape, selection="output")
        listed = client.evaluate(tape, selection=[32, 0, 27])
    assert inputs.nodes.tolist() == [0, 1] and named.nodes.tolist() == [0, 1, 32]
    assert output.nodes.tolist() == [32]
    assert output.values.tolist() == [values[32]] and output.grads is not None
    assert listed.values.tolist() == values[[32, 0, 27]].tolist()
    assert listed.grads is not None and listed.grads.tolist() == grads[[32, 0, 27]].tolist()
    assert inputs.by_name == {"a": (-4.0, 138.83381924198252), "b": (2.0, 645.5772594752186)}
    assert named["g"][0] == values[32] and named["g"][1] == 1.0


def test_inputs_bind_by_name_like_a_fresh_local_graph(grpc_server: str) -> None:
    a, b, g = seed_graph(1.5, -0.5)
    g.backward()
    with Client(grpc_server) as client:
        result = client.evaluate(seed_tape(), inputs={"a": 1.5, "b": -0.5}, selection=[0, 1, 32])
    assert result.values.tolist() == [1.5, -0.5, g.data]
    assert result.grads is not None and result.grads.tolist() == [a.grad, b.grad, 1.0]


def test_output_chooses_the_node_differentiated(grpc_server: str) -> None:
    tape = seed_tape()
    values = tape.forward()
    grads = tape.backward(values, output=27)
    with Client(grpc_server) as client:
        result = client.evaluate(tape, output=27)
    assert result.output == 27 and np.array_equal(result.grads, grads)


def test_a_batch_gives_one_row_per_binding(grpc_server: str) -> None:
    tape = seed_tape()
    rows = np.array([[-4.0, 2.0], [1.0, 2.0], [0.5, -3.0]])
    values, grads = tape.evaluate(rows)
    with Client(grpc_server) as client:
        by_array = client.evaluate(tape, batch=rows)
        by_name = client.evaluate(tape, batch={"b": rows[:, 1], "a": rows[:, 0]}, selection="named")
    assert by_array.values.shape == (3, 33) and by_array.rows == 3
    assert np.array_equal(by_array.values, values) and np.array_equal(by_array.grads, grads)
    assert np.array_equal(by_name.values, values[:, [0, 1, 32]])
    assert np.array_equal(by_name["a"][1], grads[:, 0])
    assert by_name["g"][0].tolist() == values[:, 32].tolist()


def test_values_only_when_gradients_are_not_wanted(grpc_server: str) -> None:
    with Client(grpc_server) as client:
        result = client.evaluate(seed_tape(), gradients=False, selection="output")
    assert result.grads is None and f"{result.values[0]:.4f}" == "24.7041"
    assert result.by_name == {"g": (result.values[0], None)}


def test_a_registered_graph_is_evaluated_by_id(grpc_server: str) -> None:
    tape = seed_tape()
    with Client(grpc_server) as client:
        graph_id = client.register(tape)
        result = client.evaluate(graph_id, inputs={"a": -4.0}, selection="inputs")
    assert graph_id == codec.graph_id(tape) == result.graph_id
    assert result.by_name["a"] == (-4.0, 138.83381924198252)


def test_a_streamed_result_equals_the_unary_one(grpc_server: str) -> None:
    tape = seed_tape()
    rows = np.array([[-4.0, 2.0], [1.0, 2.0]])
    with Client(grpc_server) as client:
        unary = client.evaluate(tape, batch=rows, selection=[32, 1], stream=False)
        streamed = client.evaluate(tape, batch=rows, selection=[32, 1], stream=True)
    assert np.array_equal(unary.values, streamed.values)
    assert np.array_equal(unary.grads, streamed.grads)
    assert streamed.nodes.tolist() == [32, 1] and streamed.names == {"g": 0, "b": 1}


def test_a_graph_over_4_mib_is_streamed_and_then_usable_by_id(grpc_server: str) -> None:
    """Sent inline (not registered), its result streamed; by id later, the client resends it."""
    x, y = deep_chain(200_000)
    tape, _ = Tape.from_value(y, {"x": x})
    packed = codec.pack(tape)
    assert packed.ByteSize() > 4 * 2**20  # 800,001 nodes, about 7 MB
    values, grads = tape.evaluate()
    with Client(grpc_server) as client:
        result = client.evaluate(packed)
        by_id = client.evaluate(result.graph_id, inputs={"x": 0.25}, selection=[0, 800_000])
    assert result.values.shape == (800_001,)
    assert np.array_equal(result.values, values) and np.array_equal(result.grads, grads)
    local = tape.evaluate(np.array([0.25]))
    assert by_id.values.tolist() == local[0][[0, 800_000]].tolist()


def test_a_graph_over_the_upload_threshold_is_uploaded_in_pieces(grpc_server: str) -> None:
    x, y = deep_chain(20_000)
    tape, _ = Tape.from_value(y, {"x": x})
    packed = codec.pack(tape)
    values, grads = tape.evaluate()
    with Client(grpc_server, upload_threshold=64 * 1024, piece_bytes=16 * 1024) as client:
        result = client.evaluate(packed)
        info = client.server_info()
    assert np.array_equal(result.values, values) and np.array_equal(result.grads, grads)
    assert result.graph_id == codec.graph_id(tape)
    assert info.limits.graph_cache_entries >= 1
    with Client(grpc_server) as other:  # registered by the upload: another client can use the id
        by_id = other.evaluate(result.graph_id, selection="output")
    assert by_id.values.tolist() == [values[-1]]


def test_an_evicted_graph_is_registered_again(grpc_server_factory: Callable[..., Any]) -> None:
    """With a cache of one graph and no shared store, registering a second evicts the first;
    the client resends it."""
    server = grpc_server_factory(graph_cache_entries=1, graph_store="none")
    seed, (_, chain) = seed_tape(), deep_chain(3)
    with Client(server.target) as client, Client(server.target) as stranger:
        seed_id = client.register(seed)
        client.register(chain)
        with pytest.raises(NotFound) as lost:
            stranger.evaluate(seed_id)
        assert seed_id in str(lost.value) and "does not hold it" in str(lost.value)
        result = client.evaluate(seed_id, selection="output")
        assert f"{result.values[0]:.4f}" == "24.7041"
        assert stranger.evaluate(seed_id, selection="output").values[0] == result.values[0]


def test_an_unknown_graph_id_raises_not_found(grpc_server: str) -> None:
    with Client(grpc_server) as client, pytest.raises(NotFound, match="sha256:0000"):
        client.evaluate("sha256:0000")


# -- errors ------------------------------------------------------------------------


def test_a_bad_argument_reference_is_an_invalid_graph_naming_the_node(grpc_server: str) -> None:
    graph = graph_pb2.Graph(
        nodes=[
            graph_pb2.Node(op=graph_pb2.OP_INPUT, value=1.0, name="x"),
            graph_pb2.Node(op=graph_pb2.OP_ADD, args=[0, 5]),
        ]
    )
    with Client(grpc_server) as client, pytest.raises(InvalidGraph) as caught:
        client.evaluate(graph)
    fields = [v.field for v in caught.value.violations]
    assert fields == ["graph.nodes[1].args[1]"]
    assert "node 5" in caught.value.violations[0].description
    assert "graph.nodes[1].args[1]" in str(caught.value)


def test_an_unknown_input_name_is_an_invalid_graph(grpc_server: str) -> None:
    with Client(grpc_server) as client, pytest.raises(InvalidGraph) as caught:
        client.evaluate(seed_tape(), inputs={"zz": 1.0})
    assert [v.field for v in caught.value.violations] == ["inputs[zz]"]


def test_a_graph_over_the_node_limit_is_resource_exhausted(
    grpc_server_factory: Callable[..., Any],
) -> None:
    server = grpc_server_factory(max_nodes=10)
    with Client(server.target) as client, pytest.raises(ResourceExhausted, match="max_nodes"):
        client.evaluate(seed_tape())


def test_a_closed_port_is_given_up_after_the_configured_attempts() -> None:
    target = f"127.0.0.1:{closed_port()}"
    retry = Retry(attempts=3, initial=0.02, maximum=0.05)
    with Client(target, retry=retry, timeout=30) as client, pytest.raises(Unavailable) as caught:
        client.health()
    assert caught.value.attempts == 3
    assert target in str(caught.value) and "micrograd-rpc serve" in str(caught.value)


def test_a_server_starting_during_the_retry_window_is_reached(
    grpc_server_factory: Callable[..., Any],
) -> None:
    port = closed_port()
    retry = Retry(attempts=40, initial=0.05, maximum=0.25)  # a window of about 8 s
    with Client(f"127.0.0.1:{port}", retry=retry, timeout=30) as client:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.evaluate, seed_tape(), selection="output")
            # The first tries meet a closed port; then the server comes up on it.
            with pytest.raises(concurrent.futures.TimeoutError):
                pending.result(timeout=0.3)
            grpc_server_factory(port=port)
            result = pending.result(timeout=30)
    assert f"{result.values[0]:.4f}" == "24.7041"


def test_health_and_server_info(grpc_server: str) -> None:
    from micrograd import ops

    with Client(grpc_server) as client:
        assert client.health() == "SERVING"
        assert client.health("micrograd.v1.GradientService") == "SERVING"
        info = client.server_info()
    assert [op.name for op in info.ops] == [op.name for op in ops.OPS]
    assert info.limits.max_nodes > 0


# -- asyncio -----------------------------------------------------------------------


def test_async_client_backward_evaluate_register_and_errors(grpc_server: str) -> None:
    async def session() -> tuple[Result, Result, str]:
        async with AsyncClient(grpc_server) as client:
            assert await client.health() == "SERVING"
            a, b, g = seed_graph()
            await client.backward(g)
            assert (f"{a.grad:.4f}", f"{b.grad:.4f}") == ("138.8338", "645.5773")
            graph_id = await client.register(seed_tape())
            batch = await client.evaluate(graph_id, batch={"a": [-4.0, 1.0]}, selection="inputs")
            streamed = await client.evaluate(seed_tape(), selection="output", stream=True)
            with pytest.raises(NotFound):
                await client.evaluate("sha256:0000")
            return batch, streamed, graph_id

    batch, streamed, graph_id = asyncio.run(session())
    values, grads = seed_tape().evaluate(np.array([[-4.0, 2.0], [1.0, 2.0]]))
    assert np.array_equal(batch.values, values[:, :2]) and np.array_equal(batch.grads, grads[:, :2])
    assert f"{streamed.values[0]:.4f}" == "24.7041" and graph_id == codec.graph_id(seed_tape())


def test_async_client_gives_up_on_a_closed_port() -> None:
    async def call() -> None:
        retry = Retry(attempts=2, initial=0.02, maximum=0.05)
        async with AsyncClient(f"127.0.0.1:{closed_port()}", retry=retry) as client:
            await client.server_info()

    with pytest.raises(Unavailable) as caught:
        asyncio.run(call())
    assert caught.value.attempts == 2


# -- the examples ------------------------------------------------------------------


def run_example(name: str, target: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>`` against ``target``; fails the test on a non-zero exit."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--target", target],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_seed_remote_example_prints_the_seed_numbers(grpc_server: str) -> None:
    done = run_example("seed_remote.py", grpc_server)
    assert done.stdout.split() == ["24.7041", "138.8338", "645.5773"]


def test_train_moons_remote_reaches_full_accuracy(grpc_server: str) -> None:
    done = run_example("train_moons_remote.py", grpc_server)
    assert done.stdout.rstrip().endswith("accuracy 100%")


@pytest.mark.parametrize(
    "code, details",
    [
        ("CANCELLED", ""),  # a stopping server, or nginx, cutting a call off
        ("INTERNAL", "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"),
    ],
)
def test_a_call_cut_off_by_a_stopping_or_dying_server_is_tried_again(
    grpc_server: str, code: str, details: str
) -> None:
    """A proxy in front of a real server cuts the first two calls off as a stopping server or
    nginx does (CANCELLED), or as nginx resets a stream whose replica was killed mid-answer
    (INTERNAL, in the words gRPC gives it); the client tries again and gets the seed's numbers."""
    import threading

    import grpc

    upstream = grpc.insecure_channel(grpc_server)
    seen: list[str] = []
    lock = threading.Lock()

    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        method = context._rpc_event.call_details.method.decode()  # type: ignore[attr-defined]
        with lock:
            seen.append(method)
            cut = len(seen) <= 2
        if cut:
            context.abort(grpc.StatusCode[code], details)
        forward = upstream.unary_unary(method)
        return forward(request, timeout=10)  # type: ignore[no-any-return]

    class Proxy(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            return grpc.unary_unary_rpc_method_handler(handle)

    proxy = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    proxy.add_generic_rpc_handlers((Proxy(),))
    port = proxy.add_insecure_port("127.0.0.1:0")
    proxy.start()
    try:
        retry = Retry(attempts=4, initial=0.01, maximum=0.02)
        with Client(f"127.0.0.1:{port}", retry=retry, timeout=30) as client:
            a, b, g = seed_graph()
            client.backward(g)
    finally:
        proxy.stop(None)
        upstream.close()
    assert (f"{a.grad:.4f}", f"{b.grad:.4f}") == ("138.8338", "645.5773")
    assert seen == ["/micrograd.v1.GradientService/Evaluate"] * 3


def test_an_internal_error_of_the_service_is_not_tried_again(grpc_server: str) -> None:
    """Only a reset stream makes INTERNAL worth another try; any other INTERNAL is final."""
    import grpc
    from micrograd.client import RemoteError

    calls: list[int] = []

    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls.append(1)
        context.abort(grpc.StatusCode.INTERNAL, "the kernel failed")
        return b""

    class Failing(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            return grpc.unary_unary_rpc_method_handler(handle)

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((Failing(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        retry = Retry(attempts=4, initial=0.01, maximum=0.02)
        with Client(f"127.0.0.1:{port}", retry=retry, timeout=30) as client:
            with pytest.raises(RemoteError, match="the kernel failed"):
                client.evaluate(seed_tape(), selection="output")
    finally:
        server.stop(None)
    assert len(calls) == 1
