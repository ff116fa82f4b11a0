"""The gradient service against bare gRPC, side by side in one run: one table.

Two server processes run on 127.0.0.1 ephemeral ports, both ``grpc.aio``
servers in one process each: the real one (``python -m micrograd.server
serve --workers 1``) and a generic echo server started from this file
(``grpc.method_handlers_generic_handler``, no protobuf at all). The echo is
the floor: what gRPC in Python costs for the same bytes. Rows:

1. seed-graph ``Evaluate`` latency (p50/p90, prebuilt request bytes) vs the
   echo of the same request bytes; target <= 1.3x.
2. a 1,000,000-node graph through ``Client.evaluate`` (upload in pieces,
   streamed values and gradients into numpy) vs one echo call moving the
   same number of bytes each way; target <= 3x.
3. decode + validate of a 1M-node graph in this process (the codec the
   server runs), ns/node, repeated-``Node`` form and packed form; target
   <= 100 ns/node.
4. ``Evaluate`` calls per second with 8 calls in flight against one server
   process vs the echo; target >= 3,000/s.
5. seed ``Evaluate`` p50 with TLS and a bearer token (a third server, its
   certificate made by ``trustme``) vs the plaintext server; target <= 1.3x.

Every figure is a median over the stated repeats. Each measure is a
function returning ``Row``s listed in ``MEASURES``, so adding a row (say,
JSON-RPC over HTTP) is one more function.

    python bench/service.py            # everything (about a minute)
    python bench/service.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
from micrograd import codec
from micrograd import ops as _ops
from micrograd.client import Client
from micrograd.client.result import apply_backward
from micrograd.codec.wire import with_arrays
from micrograd.engine import Value
from micrograd.seed import seed_graph
from micrograd.tape import Tape
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import graph_pb2

MiB = 1 << 20
MAX_MESSAGE = 256 * MiB
EVALUATE = "/micrograd.v1.GradientService/Evaluate"
ECHO = "/bench.Echo/Echo"
SIZED = "/bench.Echo/Sized"
"""Echo methods: ``Echo`` returns the request bytes; ``Sized`` returns as many zero bytes
as the request's first 8 bytes say (little-endian), whatever else it carries."""

BIG_NODES = 1_000_000


@dataclass(frozen=True)
class Row:
    """One line of the table: a measured figure, its baseline, and the target on their ratio."""

    measure: str
    ours: float
    baseline: float | None
    unit: str
    target: str = ""
    """``"<= 1.3x"`` (on ours/baseline), ``"<= 100"`` or ``">= 3000"`` (on ``ours``), or empty."""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """``ours / baseline`` when there is a baseline."""
        return None if not self.baseline else self.ours / self.baseline

    def verdict(self) -> str:
        """``ok`` / ``MISSED`` against the target, or empty without one."""
        if not self.target:
            return ""
        op, number = self.target.split()
        on_ratio = number.endswith("x")
        value = self.ratio if on_ratio else self.ours
        limit = float(number.rstrip("x").replace(",", ""))
        if value is None:
            return ""
        met = value <= limit if op == "<=" else value >= limit
        return "ok" if met else "MISSED"


@dataclass
class Servers:
    """Where the two servers listen, and the sizes of the runs."""

    ours: str
    echo: str
    repeats: int
    quick: bool
    load_processes: int = 2
    http: str = ""
    """``host:port`` of our server's HTTP (JSON-RPC) endpoint."""
    argv: Sequence[str] = ()
    """How our server was started, for measures that start a differently configured one."""


# -- the echo server -----------------------------------------------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


_ZEROS: dict[int, bytes] = {}


async def _sized(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    size = int.from_bytes(request[:8], "little")
    if size not in _ZEROS:
        _ZEROS[size] = bytes(size)
    return _ZEROS[size]


async def serve_echo(port_file: Path) -> None:
    """Run the bare gRPC echo server (raw bytes, no protobuf) until killed."""
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),  # type: ignore[arg-type]
            "Sized": grpc.unary_unary_rpc_method_handler(_sized),  # type: ignore[arg-type]
        },
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


# -- processes -----------------------------------------------------------------------


@contextmanager
def server_process(argv: Sequence[str], directory: Path, name: str) -> Iterator[str]:
    """Start ``argv`` (which must write its port to ``{port_file}``); yield ``127.0.0.1:PORT``."""
    port_file = directory / f"{name}.port"
    log = open(directory / f"{name}.log", "wb")
    proc = subprocess.Popen(
        [a.replace("{port_file}", str(port_file)) for a in argv], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} server did not start:\n{(directory / f'{name}.log').read_text()}"
                )
            time.sleep(0.02)
        yield f"127.0.0.1:{int(port_file.read_text())}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )


# -- graphs --------------------------------------------------------------------------


def seed_tape() -> Tape:
    """The seed document's graph, inputs named ``a`` and ``b``."""
    a, b, g = seed_graph()
    tape, _ = Tape.from_value(g, {"a": a, "b": b})
    return tape


def big_tape(n: int = BIG_NODES, seed: int = 0) -> Tape:
    """A seeded ``n``-node DAG built from arrays: ``y = tanh(y * w + skip)`` with random skips.

    Node 0 is an input, node 1 a constant; then triples (mul by the
    constant, add a random earlier node, tanh), so every value stays in
    (-1, 1) and the graph is deep and wide at once.
    """
    rng = np.random.default_rng(seed)
    code = np.empty(n, dtype=np.uint8)
    arg0 = np.full(n, -1, dtype=np.int32)
    arg1 = np.full(n, -1, dtype=np.int32)
    const = np.zeros(n, dtype=np.float64)
    code[0], const[0] = _ops.INPUT.code, 0.5
    code[1], const[1] = _ops.CONST.code, 0.9
    i = np.arange(2, n)
    phase = (i - 2) % 3
    code[2:] = np.choose(
        phase, [_ops.BY_NAME["mul"].code, _ops.BY_NAME["add"].code, _ops.BY_NAME["tanh"].code]
    )
    prev = i - 1
    arg0[2:] = np.where(phase == 0, np.where(i == 2, 0, prev), prev)
    arg1[2:] = np.where(phase == 0, 1, -1)
    adds = i[phase == 1]
    arg1[adds] = (rng.random(adds.shape[0]) * (adds - 1)).astype(np.int32)
    return Tape.from_arrays(code, arg0, arg1, const, {"x": 0})


# -- timing --------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples``."""
    return float(np.percentile(np.asarray(samples), q))


def latencies(call: Callable[[], object], count: int, budget: float) -> list[float]:
    """Seconds of up to ``count`` sequential calls, stopping after ``budget`` seconds."""
    out: list[float] = []
    end = time.perf_counter() + budget
    for _ in range(count):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
        if t0 > end:
            break
    return out


# -- the measures --------------------------------------------------------------------


def seed_request() -> bytes:
    """The seed graph's ``EvaluateRequest`` (packed, binary output), serialized."""
    return pb.EvaluateRequest(
        packed_graph=codec.pack(seed_tape()), binary_output=True
    ).SerializeToString()


def measure_latency(servers: Servers) -> list[Row]:
    """Row 1: seed ``Evaluate`` p50/p90 vs the echo of the same request bytes, interleaved."""
    request = seed_request()
    count = 250 if servers.quick else 500
    blocks = max(servers.repeats, 2)
    ours: list[float] = []
    echo: list[float] = []
    client_side: list[float] = []
    tape = seed_tape()
    with _channel(servers.ours) as real, _channel(servers.echo) as bare, Client(servers.ours) as c:
        evaluate = real.unary_unary(EVALUATE)
        reflect = bare.unary_unary(ECHO)
        reply = pb.EvaluateResponse.FromString(evaluate(request))
        assert f"{codec.f64_array(reply.values_f64)[-1]:.4f}" == "24.7041"
        latencies(lambda: evaluate(request), 200, 5)
        latencies(lambda: reflect(request), 200, 5)
        for _ in range(blocks):
            ours += latencies(lambda: evaluate(request), count, 10)
            echo += latencies(lambda: reflect(request), count, 10)
            client_side += latencies(lambda: c.evaluate(tape), count // 2, 10)
    note = f"{len(ours)} calls each, {blocks} interleaved blocks, {len(request)} B request"
    return [
        Row("seed Evaluate p50", percentile(ours, 50) * 1e6, percentile(echo, 50) * 1e6, "us",
            "<= 1.3x", note),
        Row("seed Evaluate p90", percentile(ours, 90) * 1e6, percentile(echo, 90) * 1e6, "us",
            "<= 1.3x"),
        Row("seed Client.evaluate(tape) p50", percentile(client_side, 50) * 1e6,
            percentile(echo, 50) * 1e6, "us", "",
            "whole Python client: pack, call, numpy result"),
    ]


def measure_big_graph(servers: Servers) -> list[Row]:
    """Row 2: a 1M-node graph through ``Client.evaluate`` vs the same bytes through echo."""
    tape = big_tape()
    packed = codec.pack(tape)
    values, grads = tape.evaluate()
    up = packed.ByteSize()
    down = 2 * 8 * len(tape)
    e2e: list[float] = []
    bare: list[float] = []
    with Client(servers.ours) as client, _channel(servers.echo) as channel:
        sized = channel.unary_unary(SIZED)
        payload = down.to_bytes(8, "little") + bytes(up - 8)
        client.evaluate(packed)  # warm both connections
        sized(payload)
        for _ in range(servers.repeats):
            t0 = time.perf_counter()
            result = client.evaluate(packed)
            e2e.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reply = sized(payload)
            bare.append(time.perf_counter() - t0)
            assert len(reply) == down
    assert np.array_equal(result.values, values) and np.array_equal(result.grads, grads)
    note = (
        f"{len(tape):,} nodes, {up / MiB:.1f} MiB up, {down / MiB:.1f} MiB down, "
        f"{servers.repeats} repeats"
    )
    return [
        Row("1M-node graph, Client.evaluate end to end", statistics.median(e2e) * 1e3,
            statistics.median(bare) * 1e3, "ms", "<= 2x", note),
    ]


def _ns_per_node(fn: Callable[[], object], n: int, repeats: int) -> float:
    """Median ns/node of ``fn`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e9 / n


def measure_decode(servers: Servers) -> list[Row]:
    """Row 3: decode + validate ns/node in this process (the server's codec), both forms."""
    tape = big_tape()
    n = len(tape)
    graph = codec.to_graph(tape)
    data = graph.SerializeToString()
    parsed = graph_pb2.Graph.FromString(data)
    packed = codec.pack(tape)
    reps = servers.repeats
    assert codec.graph_id(codec.from_graph(parsed)) == codec.graph_id(tape)
    assert codec.graph_id(codec.unpack(packed)) == codec.graph_id(tape)
    note = f"{n:,} nodes, {reps} repeats, in process"
    return [
        Row("decode+validate Graph (repeated Node)",
            _ns_per_node(lambda: codec.from_graph(parsed), n, reps), None, "ns/node",
            "<= 100", note + "; codec.from_graph on the parsed message"),
        Row("decode+validate Graph from wire bytes",
            _ns_per_node(lambda: codec.from_graph_bytes(data), n, reps), None, "ns/node",
            "<= 100", "codec.from_graph_bytes"),
        Row("decode+validate PackedGraph",
            _ns_per_node(lambda: codec.unpack(packed), n, reps), None, "ns/node",
            "<= 100", "codec.unpack"),
        Row("(protobuf parse of the Graph, by gRPC)",
            _ns_per_node(lambda: graph_pb2.Graph.FromString(data), n, reps), None,
            "ns/node", "", f"{len(data) / MiB:.1f} MiB message"),
    ]


async def _load(
    target: str, method: str, request: bytes, in_flight: int, total: int, start_at: float,
    budget: float,
) -> int:
    """Calls completed by ``in_flight`` concurrent loops from ``start_at`` (wall clock) for
    ``budget`` seconds or ``total`` calls, whichever ends first."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        for _ in range(20):
            await call(request)
        await asyncio.sleep(max(start_at - time.time(), 0.0))
        done = 0
        end = start_at + budget

        async def loop() -> None:
            nonlocal done
            while done < total and time.time() < end:
                done += 1
                await call(request)

        await asyncio.gather(*(loop() for _ in range(in_flight)))
        return done


def _load_process(job: tuple[str, str, bytes, int, int, float, float]) -> tuple[int, float]:
    """One load-generating process: ``(calls done, seconds taken)``."""
    target, method, request, in_flight, total, start_at, budget = job
    done = asyncio.run(_load(target, method, request, in_flight, total, start_at, budget))
    return done, time.time() - start_at


def calls_per_second(
    target: str, method: str, request: bytes, in_flight: int, processes: int, total: int,
    budget: float,
) -> float:
    """Rate of ``in_flight`` calls kept in flight by ``processes`` client processes together."""
    start_at = time.time() + 2.0  # after every process has imported and connected
    share = in_flight // processes
    jobs = [
        (target, method, request, share, total // processes, start_at, budget)
        for _ in range(processes)
    ]
    with concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        results = list(pool.map(_load_process, jobs))
    return sum(done for done, _ in results) / max(elapsed for _, elapsed in results)


def measure_throughput(servers: Servers) -> list[Row]:
    """Row 4: seed ``Evaluate`` calls per second with 8 in flight, vs echo."""
    request = seed_request()
    total = 6000 if servers.quick else 20_000
    budget = 3.0 if servers.quick else 5.0
    p = servers.load_processes
    ours: list[float] = []
    echo: list[float] = []
    for _ in range(servers.repeats):
        ours.append(calls_per_second(servers.ours, EVALUATE, request, 8, p, total, budget))
        echo.append(calls_per_second(servers.echo, ECHO, request, 8, p, total, budget))
    return [
        Row("seed Evaluate calls/s, 8 in flight", statistics.median(ours),
            statistics.median(echo), "calls/s", ">= 3000",
            f"one server process; {p} client process(es) x {8 // p} in flight, up to "
            f"{total:,} calls or {budget:.0f} s, {servers.repeats} repeats"),
    ]


# -- JSON-RPC over HTTP ----------------------------------------------------------------


def measure_jsonrpc(servers: Servers) -> list[Row]:
    """Seed ``Evaluate`` over JSON-RPC (one keep-alive HTTP connection) vs over gRPC, p50.

    Both send the one-message-per-node ``Graph`` a JSON caller writes and get
    repeated doubles back, so the ratio is the cost of HTTP/1.1 + JSON over
    HTTP/2 + protobuf for the same call on the same server process.
    """
    import http.client
    import json

    from google.protobuf import json_format

    params = {"graph": json_format.MessageToDict(codec.to_graph(seed_tape()))}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "Evaluate", "params": params})
    request = json_format.ParseDict(params, pb.EvaluateRequest()).SerializeToString()
    host, port = servers.http.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json"}

    def over_http() -> bytes:
        connection.request("POST", "/rpc", body, headers)
        reply = connection.getresponse()
        data = reply.read()
        assert reply.status == 200
        return data

    count = 250 if servers.quick else 500
    blocks = max(servers.repeats, 2)
    ours: list[float] = []
    grpc_side: list[float] = []
    with _channel(servers.ours) as channel:
        evaluate = channel.unary_unary(EVALUATE)
        result = json.loads(over_http())["result"]
        assert f"{result['values'][-1]:.4f}" == "24.7041"
        assert list(pb.EvaluateResponse.FromString(evaluate(request)).values) == result["values"]
        latencies(over_http, 200, 5)
        latencies(lambda: evaluate(request), 200, 5)
        for _ in range(blocks):
            ours += latencies(over_http, count, 10)
            grpc_side += latencies(lambda: evaluate(request), count, 10)
    connection.close()
    return [
        Row("seed Evaluate over JSON-RPC p50", percentile(ours, 50) * 1e6,
            percentile(grpc_side, 50) * 1e6, "us", "<= 2x",
            f"baseline: the same Evaluate over gRPC (not echo); {len(ours)} calls each, "
            f"{blocks} interleaved blocks, {len(body)} B JSON body"),
        Row("seed Evaluate over JSON-RPC p90", percentile(ours, 90) * 1e6,
            percentile(grpc_side, 90) * 1e6, "us", ""),
    ]


@contextmanager
def secured_server(directory: Path) -> Iterator[tuple[str, str, bytes, str]]:
    """A server like ours, with TLS and a bearer token on both ports (certificates made now,
    by ``trustme``); yields its gRPC and HTTP ``host:port``, the CA (PEM) and the token."""
    import secrets

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    (directory / "server.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(directory / "server.key"))
    token = secrets.token_hex(32)
    (directory / "tokens").write_text(token + "\n")
    argv = [sys.executable, "-m", "micrograd.server", "serve", "--host", "127.0.0.1",
            "--port", "0", "--http-port", "0", "--workers", "1",
            "--port-file", "{port_file}", "--http-port-file", "{port_file}.http",
            "--log-level", "WARNING", "--tls-cert", str(directory / "server.pem"),
            "--tls-key", str(directory / "server.key"),
            "--auth-token-file", str(directory / "tokens")]
    with server_process(argv, directory, "secured") as target:
        http_port = int((directory / "secured.port.http").read_text())
        yield target, f"127.0.0.1:{http_port}", ca.cert_pem.bytes(), token


def measure_tls(servers: Servers) -> list[Row]:
    """Seed ``Evaluate`` p50 with TLS + a bearer token vs the same server in plaintext, both
    ports, interleaved in one run: what the edge security costs a small call."""
    import http.client
    import json
    import ssl

    from google.protobuf import json_format

    request = seed_request()
    params = {"graph": json_format.MessageToDict(codec.to_graph(seed_tape()))}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "Evaluate", "params": params})
    count = 250 if servers.quick else 500
    blocks = max(servers.repeats, 2)
    secure: list[float] = []
    plain: list[float] = []
    secure_http: list[float] = []
    plain_http: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, secured_server(Path(tmp)) as (
        target, http_target, ca, token
    ):
        credentials = grpc.ssl_channel_credentials(ca)
        metadata = (("authorization", f"Bearer {token}"),)
        context = ssl.create_default_context(cadata=ca.decode())
        host, port = http_target.rsplit(":", 1)
        https = http.client.HTTPSConnection(host, int(port), timeout=30, context=context)
        plain_host, plain_port = servers.http.rsplit(":", 1)
        http_plain = http.client.HTTPConnection(plain_host, int(plain_port), timeout=30)

        def post(connection: http.client.HTTPConnection, headers: dict[str, str]) -> bytes:
            connection.request("POST", "/rpc", body, headers)
            reply = connection.getresponse()
            data = reply.read()
            assert reply.status == 200, data
            return data

        json_headers = {"Content-Type": "application/json"}
        token_headers = {**json_headers, "Authorization": f"Bearer {token}"}
        with grpc.secure_channel(target, credentials) as tls_channel, \
                _channel(servers.ours) as channel:
            evaluate_tls = tls_channel.unary_unary(EVALUATE)
            evaluate = channel.unary_unary(EVALUATE)
            reply = pb.EvaluateResponse.FromString(evaluate_tls(request, metadata=metadata))
            assert f"{codec.f64_array(reply.values_f64)[-1]:.4f}" == "24.7041"
            latencies(lambda: evaluate_tls(request, metadata=metadata), 200, 5)
            latencies(lambda: evaluate(request), 200, 5)
            latencies(lambda: post(https, token_headers), 100, 5)
            latencies(lambda: post(http_plain, json_headers), 100, 5)
            for _ in range(blocks):
                secure += latencies(lambda: evaluate_tls(request, metadata=metadata), count, 10)
                plain += latencies(lambda: evaluate(request), count, 10)
                secure_http += latencies(lambda: post(https, token_headers), count // 2, 10)
                plain_http += latencies(lambda: post(http_plain, json_headers), count // 2, 10)
        https.close()
        http_plain.close()
    return [
        Row("seed Evaluate p50, TLS + token", percentile(secure, 50) * 1e6,
            percentile(plain, 50) * 1e6, "us", "<= 1.3x",
            f"baseline: the same server in plaintext without a token (not echo); {len(secure)} "
            f"calls each, {blocks} interleaved blocks; one channel kept open"),
        Row("seed Evaluate over HTTPS + token p50", percentile(secure_http, 50) * 1e6,
            percentile(plain_http, 50) * 1e6, "us", "",
            "baseline: JSON-RPC over plain HTTP to the plaintext server; one keep-alive "
            "connection each"),
    ]


def measure_batch(servers: Servers) -> list[Row]:
    """Per-sample gradients: 1,000 bindings of the MLP loss graph, ``selection="inputs"``,
    through ``Client.evaluate`` (default threads and a one-thread server) vs CasADi's
    ``map(1000, "serial")`` of output + input gradients in this process; the three take turns,
    call by call, so that all see the same load."""
    import kernels as bench_kernels  # the same tape, bindings and CasADi graph as bench/kernels.py

    tape = bench_kernels.mlp_tape()
    width = 100 if servers.quick else 1000
    rows = bench_kernels.batch_bindings(tape, width)
    expected = tape.evaluate_selected(rows, tape.inputs)
    calls: dict[str, Callable[[], object]] = {}
    casadi_note = ""
    try:
        import casadi as ca

        x, everything = bench_kernels.casadi_graph(ca, tape)
        out = everything[len(tape) - 1]
        mapped = ca.Function("f", [x], [out, ca.gradient(out, x)]).map(width, "serial")
        columns = ca.DM(rows.T)
        calls["casadi"] = lambda: mapped(columns)
        version = getattr(ca, "__version__", "")
        casadi_note = f"; CasADi {version} map({width}, serial), in this process"
    except (ImportError, NotImplementedError) as exc:
        casadi_note = f"; CasADi not measured: {exc}"

    def checked(client: Client, graph_id: str) -> Callable[[], object]:
        def call() -> object:
            result = client.evaluate(graph_id, batch=rows, selection="inputs")
            assert np.array_equal(result.values, expected[0])
            assert np.array_equal(result.grads, expected[1])
            return result

        return call

    times: dict[str, list[float]] = {"default": [], "single": [], "casadi": []}
    with tempfile.TemporaryDirectory() as tmp:
        argv = [*servers.argv, "--kernel-threads", "1"]
        with (
            server_process(argv, Path(tmp), "one-thread") as one,
            Client(servers.ours) as ours,
            Client(one) as single,
        ):
            calls["default"] = checked(ours, ours.register(tape))
            calls["single"] = checked(single, single.register(tape))
            for name in ("default", "single"):
                calls[name]()  # the first call warms the connection
            for _ in range(servers.repeats):
                for name, call in calls.items():
                    times[name] += _timed_calls(call, 1)
    default = statistics.median(times["default"]) * 1e3
    single = statistics.median(times["single"]) * 1e3
    casadi = statistics.median(times["casadi"]) * 1e3 if times["casadi"] else None
    note = (
        f"{len(tape):,} nodes x {width:,} bindings, {servers.repeats} repeats taking turns, "
        f"graph registered{casadi_note}"
    )
    return [
        Row(
            f"per-sample grads, {width:,} bindings, service",
            default,
            casadi,
            "ms",
            "<= 0.25x",
            note,
        ),
        Row(
            "same, default threads vs one thread",
            default,
            single,
            "ms",
            "<= 0.59x",
            f"server defaults ({os.cpu_count()} CPUs) vs --kernel-threads 1",
        ),
    ]


def _timed_calls(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure_value_backward(servers: Servers) -> list[Row]:
    """``client.backward(g)`` of a 1,000,001-node ``Value`` graph vs ``g.backward()`` here."""
    import micrograd.engine as engine

    x = Value(0.5)
    y = x
    for _ in range(250_000 if not servers.quick else 25_000):
        y = y * 1.0001 + 0.001
    n = 4 * (250_000 if not servers.quick else 25_000) + 1
    remote: list[float] = []
    local: list[float] = []
    with Client(servers.ours) as client:
        client.backward(y)  # warm the connection
        for _ in range(servers.repeats):  # interleaved, so that both see the same load
            remote += _timed_calls(lambda: client.backward(y), 1)
            local += _timed_calls(y.backward, 1)
    native = engine._native_backward
    engine._native_backward = None
    try:
        python = _timed_calls(y.backward, servers.repeats)
    finally:
        engine._native_backward = native
    _, order = codec.pack_value(y)  # the client's two steps on its side, alone
    values = np.array([v.data for v in order])
    grads = np.ones(len(order))
    pack = _timed_calls(lambda: codec.pack_value(y), servers.repeats)
    write_back = _timed_calls(lambda: apply_backward(order, values, grads), servers.repeats)
    note = f"{n:,} nodes (y = y * 1.0001 + 0.001), {servers.repeats} repeats"
    return [
        Row(
            "client.backward vs local backward()",
            statistics.median(remote) * 1e3,
            statistics.median(local) * 1e3,
            "ms",
            "<= 1.5x",
            note + "; local: native reverse sweep",
        ),
        Row(
            "client.backward vs Python backward()",
            statistics.median(remote) * 1e3,
            statistics.median(python) * 1e3,
            "ms",
            "",
            "local backward() on the pure-Python path (as before the native walk)",
        ),
        Row(
            "client.backward: pack the Value graph",
            statistics.median(pack) * 1e9 / n,
            None,
            "ns/node",
            "<= 100",
            "codec.pack_value: the walk into a PackedGraph and the node order",
        ),
        Row(
            "client.backward: write values and gradients back",
            statistics.median(write_back) * 1e9 / n,
            None,
            "ns/node",
            "<= 100",
            "apply_backward onto every Value of the order",
        ),
    ]


def _us_per_call(fn: Callable[[], object], count: int, repeats: int) -> float:
    """Best-of-``repeats`` microseconds per call of ``fn`` over ``count`` calls."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(count):
            fn()
        best = min(best, (time.perf_counter() - t0) / count)
    return best * 1e6


class _StandInContext:
    """What the handlers ask of a ``grpc.aio`` servicer context, answered without a call."""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def code(self) -> None:
        return None


def _evaluate_handler(core: object) -> grpc.RpcMethodHandler:
    """The Evaluate method handler exactly as a default server registers it (metrics, error
    and parser wrappers), captured instead of served."""
    from micrograd.server.config import Settings
    from micrograd.server.grpc_server import GrpcServer
    from micrograd.server.handlers import MetricsInterceptor, Registrar
    from micrograd.server.metrics import Metrics

    found: dict[str, grpc.RpcMethodHandler] = {}

    class Capture:
        def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
            class Details:
                method = EVALUATE

            for h in handlers:
                got = h.service(Details())  # type: ignore[arg-type]
                if got is not None:
                    found[EVALUATE] = got

        def add_registered_method_handlers(
            self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
        ) -> None:
            for method, h in handlers.items():
                found[f"/{service}/{method}"] = h

    server = GrpcServer(Settings(workers=1), core, [MetricsInterceptor(Metrics())])  # type: ignore[arg-type]
    server.register(Registrar(Capture(), server.wrappers()))  # type: ignore[arg-type]
    return found[EVALUATE]


def _us_per_await(make: Callable[[], object], count: int, repeats: int) -> float:
    """Best-of-``repeats`` microseconds per ``await make()`` over ``count`` awaits."""

    async def run() -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(count):
                await make()  # type: ignore[misc]
            best = min(best, (time.perf_counter() - t0) / count)
        return best

    return asyncio.run(run()) * 1e6


def measure_breakdown(servers: Servers) -> list[Row]:
    """Where a seed ``Evaluate`` spends its time beside the echo: over the wire (p50, both,
    interleaved), the whole method handler in this process (as registered, with a stand-in
    context) beside the echo's, what is left for grpc.aio itself, and the core step by step
    (best of the repeats)."""
    from micrograd.server.config import Settings
    from micrograd.server.service import GradientService

    core = GradientService(Settings(workers=1))
    raw = seed_request()
    request = pb.EvaluateRequest.FromString(raw)
    plan = core.plan(request)
    values = core.forward(plan)
    grads = core.backward(plan, values)
    arrays = [
        ("values_f64", core.reported(plan, values)),
        ("grads_f64", core.reported(plan, grads)),
    ]
    count = 2_000 if servers.quick else 10_000
    reps = max(servers.repeats, 3)
    steps = [
        ("parse the request (protobuf)", lambda: pb.EvaluateRequest.FromString(raw)),
        ("plan: decode (recent graphs), output, selection", lambda: core.plan(request)),
        ("forward sweep (leaf values + kernel)", lambda: core.forward(plan)),
        ("reverse sweep (zeroed grads + kernel)", lambda: core.backward(plan, values)),
        ("response: header + arrays, serialized", lambda: with_arrays(core.header(plan), arrays)),
        ("the whole core: evaluate_wire", lambda: core.evaluate_wire(request)),
    ]
    rows = [
        Row(f"seed core: {label}", _us_per_call(fn, count, reps), None, "us", "", "")
        for label, fn in steps
    ]
    rows[0] = Row(
        rows[0].measure,
        rows[0].ours,
        None,
        "us",
        "",
        f"in this process, best of {reps} x {count:,} calls",
    )
    handler = _evaluate_handler(core)
    context = _StandInContext()
    behavior = handler.unary_unary
    parse, serialize = handler.request_deserializer, handler.response_serializer

    async def ours() -> bytes:
        request = parse(raw) if parse is not None else raw
        response = await behavior(request, context)  # type: ignore[misc]
        return serialize(response) if serialize is not None else response  # type: ignore[no-any-return]

    async def echo() -> bytes:
        return await _echo(raw, context)  # type: ignore[arg-type]

    in_ours = _us_per_await(ours, count, reps)
    in_echo = _us_per_await(echo, count, reps)
    wire_ours: list[float] = []
    wire_echo: list[float] = []
    with _channel(servers.ours) as real, _channel(servers.echo) as bare:
        evaluate, reflect = real.unary_unary(EVALUATE), bare.unary_unary(ECHO)
        latencies(lambda: evaluate(raw), 100, 5)
        latencies(lambda: reflect(raw), 100, 5)
        for _ in range(reps):
            wire_ours += latencies(lambda: evaluate(raw), count // 10, 10)
            wire_echo += latencies(lambda: reflect(raw), count // 10, 10)
    p50_ours, p50_echo = percentile(wire_ours, 50) * 1e6, percentile(wire_echo, 50) * 1e6
    side = [
        Row("seed vs echo: over the wire, p50", p50_ours, p50_echo, "us", "",
            f"{len(wire_ours)} calls each, {reps} interleaved blocks"),
        Row("seed vs echo: method handler in process", in_ours, in_echo, "us", "",
            "as registered (parse, metrics, errors, call runner, core, bytes out) vs the echo "
            "coroutine; stand-in context, no network"),
        Row("seed vs echo: the rest (grpc.aio, HTTP/2, client)", p50_ours - in_ours,
            p50_echo - in_echo, "us", "", "p50 over the wire minus the handler in process"),
    ]
    return side + rows


MEASURES: dict[str, Callable[[Servers], list[Row]]] = {
    "latency": measure_latency,
    "breakdown": measure_breakdown,
    "big": measure_big_graph,
    "decode": measure_decode,
    "throughput": measure_throughput,
    "jsonrpc": measure_jsonrpc,
    "batch": measure_batch,
    "backward": measure_value_backward,
    "tls": measure_tls,
}
"""Every measure, in table order; each returns its rows."""


# -- the table -----------------------------------------------------------------------


def _figure(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def render(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table, notes beneath."""
    head = ("measure", "ours", "bare gRPC", "unit", "ratio", "target", "")
    cells = [head] + [
        (
            r.measure,
            _figure(r.ours),
            _figure(r.baseline),
            r.unit,
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            r.target or "-",
            r.verdict(),
        )
        for r in rows
    ]
    widths = [max(len(row[c]) for row in cells) for c in range(len(head))]
    lines = []
    for k, row in enumerate(cells):
        lines.append(
            "  ".join(
                cell.ljust(w) if c == 0 else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(row, widths))
            ).rstrip()
        )
        if k == 0:
            lines.append("-" * len(lines[0]))
    notes = [f"  {r.measure}: {r.note}" for r in rows if r.note]
    return "\n".join([*lines, "", "notes:", *notes])


def main(argv: Sequence[str] | None = None) -> int:
    """Start both servers, run the measures, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    parser.add_argument("--only", nargs="*", choices=list(MEASURES), help="run only these")
    parser.add_argument(
        "--load-processes", type=int, default=2, choices=(1, 2, 4, 8),
        help="client processes generating the 8 calls in flight (default 2)",
    )
    parser.add_argument("--echo-server", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        asyncio.run(serve_echo(Path(args.echo_server)))
        return 0
    repeats = 3 if args.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ours_argv = [sys.executable, "-m", "micrograd.server", "serve", "--host", "127.0.0.1",
                     "--port", "0", "--http-port", "0", "--workers", "1",
                     "--port-file", "{port_file}", "--http-port-file", "{port_file}.http",
                     "--log-level", "WARNING",
                     "--max-batch-cells", "100000000"]  # 1,000 MLP bindings: 68.8M
        echo_argv = [sys.executable, os.path.abspath(__file__), "--echo-server", "{port_file}"]
        with server_process(ours_argv, directory, "ours") as ours, \
                server_process(echo_argv, directory, "echo") as echo:
            http_port = int((directory / "ours.port.http").read_text())
            servers = Servers(ours, echo, repeats, args.quick, args.load_processes,
                              f"127.0.0.1:{http_port}", ours_argv)
            with Client(ours) as client:
                info = client.server_info()
            rows: list[Row] = []
            for name, measure in MEASURES.items():
                if args.only and name not in args.only:
                    continue
                rows += measure(servers)
    print(f"micrograd-rpc {info.version}, kernel {info.kernel}, {info.workers} worker; "
          f"Python {sys.version.split()[0]}, grpcio {grpc.__version__}")
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
