"""Faults a real service meets: dying workers, shutdown under load, a port already taken,
idle clients, deadlines on big calls, and the log staying JSON through all of it.

Every server here is real (a subprocess for signals and workers), on loopback, and every
wait is bounded. Durations are asserted generously (the test machine may be busy); the
server-side measure is when the call slot was given back.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from micrograd import codec
from micrograd.seed import seed_graph
from micrograd.server.grpc_server import PID_METADATA, SERVICE_NAME
from micrograd.server.logs import JsonLines
from micrograd.tape import Tape
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc
from micrograd.v1 import graph_pb2

from tests.conftest import RunningServer

SEED = (24.7041, 138.8338, 645.5773)
"""The seed's g, dg/da and dg/db (the seed document)."""


def seed_request() -> pb.EvaluateRequest:
    """The seed expression as an Evaluate request reporting g's value and the inputs' gradients."""
    a, b, g = seed_graph()
    packed, _, _ = codec.encode_value(g, {"a": a, "b": b})
    return pb.EvaluateRequest(packed_graph=packed)


def assert_seed(stub: pb_grpc.GradientServiceStub) -> None:
    """The server answers the seed graph with the seed's numbers."""
    resp = stub.Evaluate(seed_request(), timeout=30)
    values, grads = np.array(resp.values), np.array(resp.grads)
    a, b = resp.names["a"], resp.names["b"]
    assert round(values[-1], 4) == SEED[0]
    assert (round(grads[a], 4), round(grads[b], 4)) == SEED[1:]


def free_port() -> int:
    """A free port below the ephemeral range (no port-0 server can be handed it)."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll ``condition`` every 20 ms until it holds or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def log_lines(server: RunningServer) -> list[dict[str, Any]]:
    """The server's stderr as parsed JSON lines (each line must be one JSON object)."""
    return [json.loads(line) for line in server.log().splitlines() if line.strip()]


def chain_packed(n: int) -> graph_pb2.PackedGraph:
    """``y = y * 1.0000001 + 1e-7`` from an input ``x``: ``n`` nodes, packed."""
    code = np.empty(n, dtype=np.int64)
    code[0] = 1
    code[1::2] = 2
    code[2::2] = 5
    a0 = np.full(n, -1, dtype=np.int64)
    a1 = np.full(n, -1, dtype=np.int64)
    const = np.zeros(n)
    const[0] = 0.5
    const[1::2] = 1.0000001
    idx = np.arange(n)
    mul = idx[2::2]
    a0[mul] = mul - 2
    a1[mul] = mul - 1
    tape = Tape.from_arrays(code, a0, a1, const, {"x": 0})
    return codec.pack(tape)


def pieces(packed: graph_pb2.PackedGraph, size: int = 4 << 20) -> Iterator[pb.UploadGraphRequest]:
    """The columns of ``packed`` in UploadGraph pieces of at most ``size`` bytes each."""
    for start in range(0, max(len(packed.ops), len(packed.args), len(packed.values)), size):
        yield pb.UploadGraphRequest(
            piece=graph_pb2.PackedGraph(
                ops=packed.ops[start : start + size],
                args=packed.args[start : start + size],
                values=packed.values[start : start + size],
            )
        )
    yield pb.UploadGraphRequest(piece=graph_pb2.PackedGraph(names=packed.names))


def worker_pids(server: RunningServer) -> list[int]:
    """The pids of the workers now listening, from the log (the latest line per worker)."""
    latest: dict[str, int] = {}
    for line in log_lines(server):
        msg = line["msg"]
        if msg.startswith("listening on"):
            worker = msg.split("worker ", 1)[1].split(" ", 1)[0]
            latest[worker] = int(line["pid"])
    return sorted(latest.values())


# -- the supervisor ---------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_is_restarted_while_the_other_keeps_serving(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(process=True, workers=2, port=free_port(), http_port=-1)
    assert wait_until(lambda: len(worker_pids(server)) == 2)
    victim, survivor = worker_pids(server)
    served: list[int] = []
    errors: list[grpc.StatusCode] = []
    stop = threading.Event()

    def call_forever() -> None:
        for _ in range(2000):  # bounded; stopped by the event long before
            if stop.is_set():
                return
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.GradientServiceStub(channel)
                try:
                    _, call = stub.GetServerInfo.with_call(
                        pb.GetServerInfoRequest(), timeout=5, wait_for_ready=True
                    )
                    served.append(int(dict(call.trailing_metadata())[PID_METADATA]))
                except grpc.RpcError as exc:
                    errors.append(exc.code())

    caller = threading.Thread(target=call_forever)
    caller.start()
    try:
        assert wait_until(lambda: len(served) >= 5)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: any(p not in (victim, survivor) for p in worker_pids(server)))
        restarted = next(p for p in worker_pids(server) if p not in (victim, survivor))
        assert wait_until(lambda: restarted in served)  # fresh connections reach it again
    finally:
        stop.set()
        caller.join(30)
    assert server.process is not None and server.process.poll() is None  # still up
    assert survivor in served  # the healthy worker never stopped
    # Only the one call that may have been in flight on the killed worker can fail, and then
    # as UNAVAILABLE (its connection reset); every later call found a live worker.
    assert len(errors) <= 1 and set(errors) <= {grpc.StatusCode.UNAVAILABLE}, errors
    messages = [line["msg"] for line in log_lines(server)]
    assert any(f"(pid {victim}) was killed by signal 9; restarting it in" in m for m in messages)
    channel = grpc.insecure_channel(server.target)
    with channel:
        assert_seed(pb_grpc.GradientServiceStub(channel))
    assert server.stop() == 0


@pytest.mark.slow
def test_workers_that_keep_dying_make_the_server_give_up_with_exit_1(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(
        process=True, workers=2, port=free_port(), http_port=-1, max_worker_deaths=3
    )
    assert server.process is not None
    killed: set[int] = set()
    for _ in range(20):  # bounded
        if server.process.poll() is not None:
            break
        live = [p for p in worker_pids(server) if p not in killed]
        for pid in live[:1]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            killed.add(pid)
        time.sleep(0.3)
    assert server.process.wait(30) == 1
    messages = [line["msg"] for line in log_lines(server)]
    assert any("3 worker deaths within 60 s (max_worker_deaths); giving up" in m for m in messages)


# -- ports ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_port_held_by_another_server_is_refused(
    grpc_server_factory: Callable[..., RunningServer], workers: int
) -> None:
    port, http_port = free_port(), free_port()
    first = grpc_server_factory(process=True, workers=2, port=port, http_port=http_port)
    with pytest.raises(RuntimeError) as err:
        grpc_server_factory(process=True, workers=workers, port=port, http_port=free_port())
    assert "server exited with 1" in str(err.value)
    assert f"the gRPC port {port} on 127.0.0.1 is already in use by another process" in str(
        err.value
    )
    with pytest.raises(RuntimeError) as err:
        grpc_server_factory(process=True, workers=workers, port=free_port(), http_port=http_port)
    assert f"the HTTP port {http_port} on 127.0.0.1 is already in use" in str(err.value)
    channel = grpc.insecure_channel(first.target)
    with channel:  # the first server alone answers, unharmed
        for _ in range(10):
            assert_seed(pb_grpc.GradientServiceStub(channel))


# -- shutdown ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_under_load_with_a_watch_open_exits_within_a_second_of_the_last_call(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(process=True, grace_period=20.0, http_port=-1)
    assert server.process is not None
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.GradientServiceStub(channel)
    graph_id = stub.UploadGraph(pieces(chain_packed(1_000_001)), timeout=60).graph_id
    big = pb.EvaluateRequest(
        graph_id=graph_id,
        selection=pb.SELECTION_OUTPUT,
        batch=pb.Batch(values=[0.5] * 20),
    )
    watch_seen: list[int] = []
    watch_end: list[grpc.StatusCode] = []

    def watch() -> None:
        health = health_pb2_grpc.HealthStub(channel)
        stream = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        try:
            for reply in stream:
                watch_seen.append(reply.status)
        except grpc.RpcError as exc:
            watch_end.append(exc.code())

    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    def load() -> None:
        for _ in range(200):  # bounded; ends when the server refuses
            try:
                stub.Evaluate(big, timeout=30)
                with lock:
                    outcomes.append(("OK", time.monotonic()))
            except grpc.RpcError as exc:
                with lock:
                    outcomes.append((exc.code().name, time.monotonic()))
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert wait_until(lambda: watch_seen == [health_pb2.HealthCheckResponse.SERVING])
    workers = [threading.Thread(target=load) for _ in range(3)]
    for t in workers:
        t.start()
    assert wait_until(lambda: len(outcomes) >= 3, timeout=60)
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(30)
    exited = time.monotonic()
    for t in [*workers, watcher]:
        t.join(30)
    channel.close()
    assert server.process.returncode == 0
    done = [when for status, when in outcomes if status == "OK"]
    refused = [status for status, _ in outcomes if status != "OK"]
    tail = "\n".join(f"{x['ts']} {x['msg']}" for x in log_lines(server)[-12:])
    # No accepted call was lost: each finished, or was refused as UNAVAILABLE.
    assert set(refused) <= {"UNAVAILABLE"}, (refused, tail)
    assert exited - max(done) < 1.0 + 0.5, tail  # 1 s, plus the poll of a busy machine
    assert watch_seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert watch_end == [grpc.StatusCode.UNAVAILABLE]
    messages = [line["msg"] for line in log_lines(server)]
    assert "ending 1 open health/reflection stream(s)" in messages


# -- idle clients -----------------------------------------------------------------------------


def test_idle_upload_is_ended_and_its_slot_released(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(upload_idle_timeout=0.5, max_concurrent_calls=2)
    assert server.server is not None
    service = server.server.service
    gate = threading.Event()

    def stalled() -> Iterator[pb.UploadGraphRequest]:
        yield pb.UploadGraphRequest(piece=graph_pb2.PackedGraph(ops=b"\x01", values=bytes(8)))
        gate.wait(30)  # then nothing: the client is idle, without a deadline

    channel = grpc.insecure_channel(server.target)
    with channel:
        stub = pb_grpc.GradientServiceStub(channel)
        uploads = [stub.UploadGraph.future(stalled()) for _ in range(2)]
        assert wait_until(lambda: service.in_flight == 2)
        for upload in uploads:
            with pytest.raises(grpc.RpcError) as err:
                upload.result(timeout=30)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no piece of the upload arrived for 0.5 s (upload_idle_timeout)" in (
                err.value.details() or ""
            )
        gate.set()
        assert wait_until(lambda: service.in_flight == 0)
        assert_seed(stub)


def test_slow_http_body_gets_408_and_the_connection_is_closed(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(http_idle_timeout=0.5)
    assert server.http_port is not None
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"jsonrpc\":"
        )
        started = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"\n"):  # the whole response
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408")
    assert b"(http_idle_timeout)" in reply and b"Connection: close" in reply
    assert 0.4 < waited < 10.0
    channel = grpc.insecure_channel(server.target)
    with channel:
        assert_seed(pb_grpc.GradientServiceStub(channel))


# -- deadlines inside a sweep -----------------------------------------------------------------


@pytest.mark.parametrize("rows", [0, 20])
def test_deadline_stops_a_million_node_sweep_and_frees_the_slot_at_once(
    grpc_server_factory: Callable[..., RunningServer], rows: int
) -> None:
    server = grpc_server_factory(kernel="native", inline_cells=0)
    assert server.server is not None
    service = server.server.service
    released: list[float] = []
    give_back = service.release

    def release() -> None:  # observe when the slot comes back (the real release runs)
        give_back()
        released.append(time.monotonic())

    service.release = release  # type: ignore[method-assign]
    channel = grpc.insecure_channel(server.target)
    with channel:
        stub = pb_grpc.GradientServiceStub(channel)
        graph_id = stub.UploadGraph(pieces(chain_packed(1_000_001)), timeout=60).graph_id
        request = pb.EvaluateRequest(graph_id=graph_id, selection=pb.SELECTION_OUTPUT)
        if rows:
            request.batch.values.extend([0.5] * rows)
        started = time.monotonic()
        stub.Evaluate(request, timeout=60)  # how long the whole call takes here
        full = time.monotonic() - started
        deadline = min(0.1, full / 4)
        released.clear()
        sent = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Evaluate(request, timeout=deadline)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: bool(released) and service.in_flight == 0)
        late = released[0] - (sent + deadline)
        # The sweep looks at the deadline every 16,384 cells (microseconds apart): the slot
        # comes back about as soon as the deadline passes, long before the work would end.
        assert late < 0.05 + 0.2, (late, full)
        assert released[0] - sent < full
        assert_seed(stub)


def test_cancelled_big_call_stops_mid_sweep(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(kernel="native", inline_cells=0)
    assert server.server is not None
    service = server.server.service
    channel = grpc.insecure_channel(server.target)
    with channel:
        stub = pb_grpc.GradientServiceStub(channel)
        graph_id = stub.UploadGraph(pieces(chain_packed(2_000_001)), timeout=60).graph_id
        request = pb.EvaluateRequest(
            graph_id=graph_id, selection=pb.SELECTION_OUTPUT, batch=pb.Batch(values=[0.5] * 20)
        )
        pending = stub.Evaluate.future(request)
        assert wait_until(lambda: service.in_flight == 1)
        cancelled = time.monotonic()
        assert pending.cancel()
        assert wait_until(lambda: service.in_flight == 0)
        assert time.monotonic() - cancelled < 2.0
        assert_seed(stub)


# -- logs -------------------------------------------------------------------------------------


def test_records_of_other_libraries_are_json_lines() -> None:
    import io
    import logging

    from micrograd.server import logs

    stream = io.StringIO()
    logs.configure("INFO", stream)
    try:
        try:
            raise ConnectionResetError("peer went away")
        except ConnectionResetError:
            logging.getLogger("aiohttp.server").exception("Error handling request")
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        logging.getLogger("micrograd.server").info("hello")
        logging.getLogger("aiohttp.access").info("below WARNING: not written")
    finally:
        logs.configure("INFO")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]  # each one JSON
    written = {line["logger"]: line for line in lines}
    assert {"aiohttp.server", "asyncio", "micrograd.server"} <= set(written)
    assert "aiohttp.access" not in written
    assert "ConnectionResetError: peer went away" in written["aiohttp.server"]["exc"]
    assert isinstance(JsonLines().format(logging.makeLogRecord({"msg": "x"})), str)


@pytest.mark.slow
def test_every_line_a_server_writes_is_json_even_under_abuse(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(process=True, http_idle_timeout=0.3, log_level="DEBUG")
    assert server.http_port is not None
    for raw in (
        b"GARBAGE\r\n\r\n",
        b"POST /rpc HTTP/1.1\r\nContent-Length: 5\r\n\r\n{",  # then hang up mid-body
        b"POST /rpc HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n[",
        b"\x16\x03\x01\x00\xa5\x01\x00",  # a TLS hello to a plain port
    ):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
            sock.sendall(raw)
            time.sleep(0.4 if raw.endswith(b"[") else 0.05)
    channel = grpc.insecure_channel(server.target)
    with channel:
        raw_call = channel.unary_unary("/micrograd.v1.GradientService/Evaluate")
        with pytest.raises(grpc.RpcError):
            raw_call(b"\xff\xff\xff", timeout=10)
        assert_seed(pb_grpc.GradientServiceStub(channel))
    assert server.stop() == 0
    lines = log_lines(server)  # raises if any line is not one JSON object
    assert any(line["msg"] == "stopped" for line in lines)
