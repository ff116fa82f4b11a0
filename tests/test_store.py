"""The graph store: a graph registered through one process is found by every other.

The host store (files, the default) is tested with a real ``--workers 2``
server, where the kernel spreads fresh connections over both workers; the
Redis store with a real ``redis-server`` that each test starts on a free
loopback port and stops by its pid (``scripts/test`` installs it; without
the binary those tests skip and say so). Failure cases use real failures:
a stopped Redis, a port that accepts connections and never answers, entries
overwritten with damaged bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from micrograd import codec
from micrograd.server.grpc_server import PID_METADATA
from micrograd.server.store import HostStore, decode_entry, encode_entry
from micrograd.tape import Tape
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer
from tests.graphs import affine_chain_tape, seed_graph

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
)
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (scripts/test installs it)"
)

SEED_OUTPUT, SEED_DA, SEED_DB = "24.7041", "138.8338", "645.5773"


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed_tape() -> Tape:
    """The seed example's graph as a tape, inputs named ``a`` and ``b``."""
    a, b, g = seed_graph()
    return codec.encode_value(g, {"a": a, "b": b})[1]


def assert_seed(resp: pb.EvaluateResponse) -> None:
    """The response holds the seed document's numbers (value of g, dg/da, dg/db)."""
    names = dict(resp.names)
    got = (resp.values[-1], resp.grads[names["a"]], resp.grads[names["b"]])
    assert [f"{x:.4f}" for x in got] == [SEED_OUTPUT, SEED_DA, SEED_DB]


def jsonrpc(url: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One JSON-RPC call on a fresh HTTP connection; the decoded answer."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    request = urllib.request.Request(
        f"{url}/rpc", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def metric(url: str, name: str) -> float:
    """The sum of every sample of ``name`` on the server's ``/metrics``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def evaluate_by_id(target: str, graph_id: str, timeout: float = 10.0) -> pb.EvaluateResponse:
    """Evaluate ``graph_id`` over a fresh raw gRPC channel (no client library, no resend)."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        return stub.Evaluate(pb.EvaluateRequest(graph_id=graph_id), timeout=timeout)


def register(target: str, tape: Tape) -> str:
    """Register ``tape`` over a fresh raw gRPC channel; its graph id."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        reply = stub.RegisterGraph(
            pb.RegisterGraphRequest(packed_graph=codec.pack(tape)), timeout=10
        )
    return reply.graph_id


# -- the entry format --------------------------------------------------------------------


def test_an_entry_decodes_to_the_same_graph() -> None:
    tape = seed_tape()
    gid = codec.graph_id(tape)
    back = decode_entry(gid, b"".join(encode_entry(gid, tape)))
    assert back is not None and codec.graph_id(back) == gid and back.names == tape.names
    np.testing.assert_array_equal(back.forward(), tape.forward())


def test_a_damaged_or_misfiled_entry_is_rejected() -> None:
    tape = seed_tape()
    gid = codec.graph_id(tape)
    entry = bytearray(b"".join(encode_entry(gid, tape)))
    flipped = bytearray(entry)
    flipped[120] ^= 0x01  # one bit of a constant (the columns start after 112 header bytes)
    assert decode_entry(gid, bytes(flipped)) is None
    assert decode_entry(gid, bytes(entry[:-3])) is None  # truncated
    assert decode_entry(gid, b"") is None
    other = affine_chain_tape(11, 2.0, 1.0)  # a whole, valid entry under the wrong key
    assert decode_entry(gid, b"".join(encode_entry(codec.graph_id(other), other))) is None


def test_rehashing_rejects_even_a_forged_entry() -> None:
    """An entry claiming the seed's id, with a matching checksum, but another graph inside."""
    gid = codec.graph_id(seed_tape())
    forged = b"".join(encode_entry(gid, affine_chain_tape(11, 2.0, 1.0)))
    assert decode_entry(gid, forged) is not None  # the checksum only detects damage
    assert decode_entry(gid, forged, rehash=True) is None


# -- the host store ----------------------------------------------------------------------


def test_host_store_drops_least_recently_used_files(tmp_path: Path) -> None:
    store = HostStore(tmp_path / "graphs", max_bytes=1 << 20, max_entries=2)
    tapes = [affine_chain_tape(n, 1.5, 0.25) for n in (5, 7, 9)]
    ids = [codec.graph_id(t) for t in tapes]
    store.put(ids[0], tapes[0])
    store.put(ids[1], tapes[1])
    old = time.time() - 100
    os.utime(store.path(ids[0]), (old, old))  # type: ignore[arg-type]
    os.utime(store.path(ids[1]), (old, old + 1))  # type: ignore[arg-type]
    assert store.get(ids[0]) is not None  # now the most recently used
    store.put(ids[2], tapes[2])
    assert store.get(ids[1]) is None
    assert store.get(ids[0]) is not None and store.get(ids[2]) is not None
    small = HostStore(tmp_path / "small", max_bytes=300, max_entries=10)
    big = affine_chain_tape(101, 1.5, 0.25)  # 101 nodes take about 1.7 kB
    assert not small.put(codec.graph_id(big), big) and not list(small.directory.iterdir())


def test_host_store_treats_a_corrupt_file_as_missing(tmp_path: Path) -> None:
    store = HostStore(tmp_path / "graphs", max_bytes=1 << 20, max_entries=10)
    tape = seed_tape()
    gid = codec.graph_id(tape)
    store.put(gid, tape)
    path = store.path(gid)
    assert path is not None
    path.write_bytes(path.read_bytes()[:-5])  # truncated in place
    assert store.get(gid) is None
    assert store.counts.corrupt == 1 and not path.exists()


def test_host_store_never_turns_a_graph_id_into_a_path(tmp_path: Path) -> None:
    store = HostStore(tmp_path / "graphs", max_bytes=1 << 20, max_entries=10)
    (tmp_path / "secret.graph").write_bytes(b"x")
    for bad in ("../secret", "sha256:../../secret", "sha256:" + "0" * 63, "sha256:" + "G" * 64):
        assert store.path(bad) is None and store.get(bad) is None


def test_host_store_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "open"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(OSError, match="writable by other users"):
        HostStore(shared, max_bytes=1 << 20, max_entries=10)


def test_a_graph_evicted_from_the_cache_comes_back_from_the_host_store(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    server = grpc_server_factory(graph_cache_entries=1)
    first = register(server.target, seed_tape())
    register(server.target, affine_chain_tape(7, 1.5, 0.25))  # evicts the seed from the cache
    assert_seed(evaluate_by_id(server.target, first))


@pytest.mark.slow
def test_every_worker_finds_a_graph_registered_once(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    """The issue's "done when": with default settings and two workers, 40 of 40 fresh JSON-RPC
    connections and 40 of 40 fresh raw gRPC channels find a graph registered once."""
    server = grpc_server_factory(process=True, workers=2, port=free_port(), http_port=free_port())
    pids: set[str] = set()
    for _ in range(200):  # wait until both workers accept calls
        with grpc.insecure_channel(server.target) as channel:
            try:
                _, call = pb_grpc.GradientServiceStub(channel).GetServerInfo.with_call(
                    pb.GetServerInfoRequest(), timeout=5
                )
            except grpc.RpcError:
                time.sleep(0.05)
                continue
            pids.add(dict(call.trailing_metadata())[PID_METADATA])
        if len(pids) == 2:
            break
    assert len(pids) == 2
    params = {"packedGraph": json_format.MessageToDict(codec.pack(seed_tape()))}
    registered = jsonrpc(server.http_url, "RegisterGraph", params)["result"]
    gid = registered["graphId"]
    answered: set[str] = set()
    ok = 0
    for _ in range(40):
        answer = jsonrpc(server.http_url, "Evaluate", {"graphId": gid})
        assert "error" not in answer, answer
        r = answer["result"]
        assert f"{r['values'][-1]:.4f}" == SEED_OUTPUT
        ok += 1
    assert ok == 40
    for _ in range(40):
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            resp = stub.Evaluate(pb.EvaluateRequest(graph_id=gid), timeout=10)
            assert_seed(resp)
            _, call = stub.GetServerInfo.with_call(pb.GetServerInfoRequest(), timeout=5)
            answered.add(dict(call.trailing_metadata())[PID_METADATA])
        ok += 1
    assert ok == 80 and answered == pids  # both workers answered by id
    assert server.stop() == 0


# -- Redis -------------------------------------------------------------------------------


class Redis:
    """A ``redis-server`` on a free loopback port, in memory only, stopped by its pid."""

    def __init__(self, directory: Path) -> None:
        assert REDIS_SERVER is not None
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = directory / f"redis-{self.port}.log"
        argv = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
            "--maxmemory", "64mb",
            "--maxmemory-policy", "volatile-lru",
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        import redis

        self.client = redis.Redis(port=self.port, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self.log.read_text()
                    raise RuntimeError(f"redis-server did not start:\n{log}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    """A fresh Redis for one test."""
    server = Redis(tmp_path)
    yield server
    server.stop()


@needs_redis
@pytest.mark.slow
def test_two_server_processes_share_graphs_through_redis(
    grpc_server_factory: Callable[..., RunningServer], redis_server: Redis
) -> None:
    one = grpc_server_factory(process=True, graph_store=redis_server.url, graph_store_ttl=600)
    two = grpc_server_factory(process=True, graph_store=redis_server.url, graph_store_ttl=600)
    gid = register(one.target, seed_tape())
    assert_seed(evaluate_by_id(two.target, gid))
    ttl = redis_server.client.ttl(f"micrograd:graph:{gid}")
    assert 0 < ttl <= 600  # type: ignore[operator]
    assert metric(two.http_url, "micrograd_graph_store_hits_total") == 1
    assert metric(one.http_url, "micrograd_graph_store_writes_total") == 1
    assert one.stop() == 0 and two.stop() == 0


@needs_redis
def test_a_stopped_redis_means_not_found_with_the_reason(
    grpc_server_factory: Callable[..., RunningServer], redis_server: Redis
) -> None:
    one = grpc_server_factory(graph_store=redis_server.url)
    two = grpc_server_factory(graph_store=redis_server.url)
    gid = register(one.target, seed_tape())
    redis_server.stop()
    assert_seed(evaluate_by_id(one.target, gid))  # still in the process's own cache
    for _ in range(2):  # the first finds Redis gone, the second skips it during the backoff
        with pytest.raises(grpc.RpcError) as err:
            evaluate_by_id(two.target, gid, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
        assert redis_server.url in err.value.details()
        assert "unreachable" in err.value.details() and gid in err.value.details()
    assert metric(two.http_url, "micrograd_graph_store_errors_total") == 2
    assert register(two.target, seed_tape()) == gid  # registering still works, locally
    assert_seed(evaluate_by_id(two.target, gid))


def test_a_redis_that_never_answers_costs_one_timeout_not_a_hang(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    """A port that accepts connections and never replies: calls end within the deadline."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        server = grpc_server_factory(graph_store=url, graph_store_timeout=0.2)
        gid = codec.graph_id(seed_tape())
        with pytest.raises(grpc.RpcError) as err:
            evaluate_by_id(server.target, gid, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
        assert "Timeout" in err.value.details()
        assert register(server.target, seed_tape()) == gid
        assert_seed(evaluate_by_id(server.target, gid, timeout=5))


@needs_redis
def test_a_corrupt_redis_entry_is_treated_as_missing(
    grpc_server_factory: Callable[..., RunningServer], redis_server: Redis
) -> None:
    one = grpc_server_factory(graph_store=redis_server.url)
    gid = register(one.target, seed_tape())
    key = f"micrograd:graph:{gid}"
    entry = redis_server.client.get(key)
    assert isinstance(entry, bytes)
    other = affine_chain_tape(33, 2.0, 1.0)  # a valid entry of another graph under this key
    cases = [entry[:-7], entry[:120] + bytes([entry[120] ^ 1]) + entry[121:]]
    cases.append(b"".join(encode_entry(codec.graph_id(other), other)))
    cases.append(b"".join(encode_entry(gid, other)))  # forged: right id and checksum
    for damaged in cases:
        redis_server.client.set(key, damaged, ex=60)
        fresh = grpc_server_factory(graph_store=redis_server.url)
        with pytest.raises(grpc.RpcError) as err:
            evaluate_by_id(fresh.target, gid)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert redis_server.client.exists(key) == 0  # the bad entry was removed
        assert metric(fresh.http_url, "micrograd_graph_store_corrupt_total") == 1
        fresh.stop()
    assert_seed(evaluate_by_id(one.target, gid))


# -- settings ----------------------------------------------------------------------------


def test_graph_store_settings_are_checked_and_named() -> None:
    from micrograd.server import config

    env = {
        "MICROGRAD_RPC_GRAPH_STORE": "redis://10.0.0.9:6380/2",
        "MICROGRAD_RPC_GRAPH_STORE_TTL": "90",
    }
    settings = config.from_sources(None, env)
    assert settings.graph_store == "redis://10.0.0.9:6380/2" and settings.graph_store_ttl == 90
    assert config.Settings().graph_store == "host"
    for bad, words in [
        ({"graph_store": "memcached://x:1"}, "--graph-store (MICROGRAD_RPC_GRAPH_STORE) must be"),
        ({"graph_store_timeout": 0.0}, "--graph-store-timeout"),
        ({"graph_store_ttl": 0.5}, "--graph-store-ttl"),
        ({"graph_store_entries": -1}, "--graph-store-entries"),
    ]:
        with pytest.raises(config.SettingsError, match=re.escape(words)):
            config.Settings(**bad)  # type: ignore[arg-type]


def test_a_host_store_that_cannot_be_made_stops_the_server_with_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "micrograd.server", "serve", "--workers", "1", "--port", "0",
         "--http-port", "-1", "--graph-store-dir", str(blocker / "graphs")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "cannot create the graph store" in done.stderr and str(blocker) in done.stderr
