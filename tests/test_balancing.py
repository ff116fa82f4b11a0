"""Client-side balancing: one client, several servers, calls spread by gRPC's round_robin.

Three real server processes on loopback; who answered a call is read from
the ``micrograd-pid`` trailing metadata of GetServerInfo (on the very channel
the client built) and from each server's own ``/metrics``. Killing one
server with SIGKILL under a stream of calls costs no failed call with the
client's default retry policy. ``dns:///`` targets are resolved by gRPC
itself; the test points its resolver at a small DNS responder on loopback
that answers the name with three loopback addresses, one server on each.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from micrograd.client import AsyncClient, Client
from micrograd.client.channel import channel_target
from micrograd.server.grpc_server import PID_METADATA
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer, start_process
from tests.graphs import seed_graph


def answered_by(channel: grpc.Channel, calls: int) -> Counter[str]:
    """How many of ``calls`` GetServerInfo calls each server process answered."""
    stub = pb_grpc.GradientServiceStub(channel)
    seen: Counter[str] = Counter()
    for _ in range(calls):
        _, call = stub.GetServerInfo.with_call(pb.GetServerInfoRequest(), timeout=10)
        seen[dict(call.trailing_metadata())[PID_METADATA]] += 1
    return seen


def evaluations(server: RunningServer) -> float:
    """Successful Evaluate calls the server counted (from its ``/metrics``)."""
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("micrograd_requests_total{") and 'method="Evaluate"' in line:
            if 'code="OK"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def seed_backward(client: Client) -> float:
    """The seed example's output, computed remotely: 24.7041."""
    a, b, g = seed_graph()
    client.backward(g)
    assert f"{a.grad:.4f}" == "138.8338" and f"{b.grad:.4f}" == "645.5773"
    return g.data


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningServer]]:
    """Three server processes (one worker each) on loopback ports."""
    where = tmp_path_factory.mktemp("three")
    servers = [start_process(where, graph_store="none") for _ in range(3)]
    yield servers
    for server in servers:
        server.stop()


def test_several_addresses_become_one_balanced_target() -> None:
    assert channel_target("127.0.0.1:5000") == ("127.0.0.1:5000", False)
    assert channel_target(["127.0.0.1:5000", "127.0.0.2:5001"]) == (
        "ipv4:127.0.0.1:5000,127.0.0.2:5001",
        True,
    )
    assert channel_target("127.0.0.1:1, localhost:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", True)
    assert channel_target(["[::1]:7", "[::1]:8"]) == ("ipv6:[::1]:7,[::1]:8", True)
    assert channel_target("dns:///gradient:50051") == ("dns:///gradient:50051", True)
    bad_targets = (
        [],
        ["127.0.0.1", "127.0.0.2:1"],  # no port
        ["127.0.0.1:1", "[::1]:2"],  # IPv4 and IPv6 mixed
        ["127.0.0.1:1", "x:99999"],  # no such port
    )
    for bad in bad_targets:
        with pytest.raises(ValueError):
            channel_target(bad)


@pytest.mark.slow
def test_calls_spread_over_three_servers(three: list[RunningServer]) -> None:
    targets = [server.target for server in three]
    with Client(targets) as client:
        seen = answered_by(client.channel, 30)
        before = [evaluations(server) for server in three]
        for _ in range(30):
            assert f"{seed_backward(client):.4f}" == "24.7041"
        after = [evaluations(server) for server in three]
    assert set(seen) == {str(server.pid) for server in three}, seen
    assert max(seen.values()) <= 15, seen  # none serves more than half
    spread = [a - b for a, b in zip(after, before)]
    assert sum(spread) == 30 and min(spread) >= 5, spread


@pytest.mark.slow
def test_the_async_client_spreads_its_calls_too(three: list[RunningServer]) -> None:
    async def run() -> None:
        async with AsyncClient(",".join(server.target for server in three)) as client:
            for _ in range(30):
                a, b, g = seed_graph()
                await client.backward(g)
                assert f"{g.data:.4f}" == "24.7041"
                assert f"{a.grad:.4f}" == "138.8338" and f"{b.grad:.4f}" == "645.5773"

    before = [evaluations(server) for server in three]
    asyncio.run(run())
    spread = [evaluations(server) - b for server, b in zip(three, before)]
    assert sum(spread) == 30 and min(spread) >= 5, spread


@pytest.mark.slow
def test_a_killed_server_costs_no_failed_call(
    grpc_server_factory: Callable[..., RunningServer],
) -> None:
    servers = [grpc_server_factory(process=True, graph_store="none") for _ in range(3)]
    victim = servers[1]
    assert victim.process is not None
    failures = 0
    with Client([server.target for server in servers]) as client:
        for i in range(60):
            if i == 20:
                victim.process.kill()  # SIGKILL: no drain, connections cut
                victim.process.wait(10)
            try:
                assert f"{seed_backward(client):.4f}" == "24.7041"
            except Exception:
                failures += 1
        seen = answered_by(client.channel, 20)
    assert failures == 0
    assert set(seen) == {str(servers[0].pid), str(servers[2].pid)}, seen


# -- dns:/// -----------------------------------------------------------------------------


class DnsResponder:
    """A minimal DNS server on loopback UDP: every A query for ``name`` gets ``addresses``,
    every other question an empty answer. Enough for gRPC's resolver, nothing more."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name.lower().rstrip(".")
        self.addresses = addresses
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                query, peer = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self.answer(query)
            if answer is not None:
                self.sock.sendto(answer, peer)

    def answer(self, query: bytes) -> bytes | None:
        """The response to one query message (``None`` if it cannot be parsed)."""
        if len(query) < 12:
            return None
        ident, _, qdcount = struct.unpack("!HHH", query[:6])
        if qdcount != 1:
            return None
        labels, at = [], 12
        while at < len(query) and query[at]:
            length = query[at]
            labels.append(query[at + 1 : at + 1 + length].decode(errors="replace"))
            at += 1 + length
        if at + 5 > len(query):
            return None
        qtype, _ = struct.unpack("!HH", query[at + 1 : at + 5])
        question = query[12 : at + 5]
        records = b""
        count = 0
        if ".".join(labels).lower() == self.name and qtype == 1:
            for address in self.addresses:
                # name as a pointer to the question (offset 12), A, IN, TTL 1 s, 4 bytes
                records += struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(address)
                count += 1
        header = struct.pack("!HHHHHH", ident, 0x8180, 1, count, 0, 0)
        return header + question + records

    def stop(self) -> None:
        """Stop answering and close the socket."""
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.mark.slow
def test_a_dns_name_with_three_addresses_is_balanced(tmp_path: Path) -> None:
    port = _free_port_on_all(["127.0.0.1", "127.0.0.2", "127.0.0.3"])
    servers = [
        start_process(tmp_path, host=host, port=port, graph_store="none")
        for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3")
    ]
    dns = DnsResponder("replicas.test", ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
    try:
        with Client(f"dns://127.0.0.1:{dns.port}/replicas.test:{port}") as client:
            assert f"{seed_backward(client):.4f}" == "24.7041"
            seen = answered_by(client.channel, 30)
        assert set(seen) == {str(server.pid) for server in servers}, seen
        assert max(seen.values()) <= 15, seen
    finally:
        dns.stop()
        for server in servers:
            server.stop()


def _free_port_on_all(hosts: list[str]) -> int:
    """A port free on every one of ``hosts`` a moment ago."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every loopback address")
