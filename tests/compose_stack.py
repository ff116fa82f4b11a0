"""Checks of a running compose stack, through its nginx: run by ``scripts/test-containers``.

``python -m tests.compose_stack --grpc HOST:PORT --http URL --nginx CONTAINER
--replica C1 --replica C2 --replica C3 [--ca PEM --token-file FILE]`` runs,
in order: the seed over gRPC and JSON-RPC; calls spread over the replicas
(none serves more than half);
a graph registered through one replica evaluated through the others (the
replicas share a Redis registry); a large streamed response;
a replica stopped with SIGTERM under load (it drains: 0 failed calls); a
replica killed under load (0 failed calls for the Python client with its
default retries). Which replica served a call is read from nginx's access
log (``upstream=`` names the replica's address). Every load loop is bounded
in count and time. Exits 1 on the first failed check, printing what failed.
"""

from __future__ import annotations

import argparse
import json
import random
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from micrograd import codec
from micrograd.client import Client
from micrograd.v1 import gradient_service_pb2 as pb
from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc

from tests.graphs import affine_chain_tape, seed_graph

SEED = ("24.7041", "138.8338", "645.5773")
GRPC_PATH = "/micrograd.v1.GradientService/"


class CheckFailed(AssertionError):
    """One check of the stack did not hold; the message says what was seen."""


def check(condition: bool, message: str) -> None:
    """Raise ``CheckFailed(message)`` unless ``condition``."""
    if not condition:
        raise CheckFailed(message)


def podman(*args: str, timeout: float = 60) -> str:
    """Run ``podman ARGS``; return its stdout (raise with its stderr if it fails)."""
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise CheckFailed(f"podman {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Stack:
    """Where the stack answers and what it is made of."""

    grpc_target: str
    http_url: str
    nginx: str
    replicas: list[str]
    ca: bytes | None = None
    token: str | None = None
    addresses: dict[str, str] = field(default_factory=dict)
    """Replica IP address -> container name."""

    def channel(self) -> grpc.Channel:
        """A fresh gRPC channel to nginx (TLS when the stack has a CA)."""
        options = [("grpc.max_receive_message_length", 256 << 20)]
        if self.ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.ca)
            return grpc.secure_channel(self.grpc_target, creds, options=options)
        return grpc.insecure_channel(self.grpc_target, options=options)

    def metadata(self) -> list[tuple[str, str]]:
        """Call metadata: the bearer token, when the stack has one."""
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def client(self, **kwargs: Any) -> Client:
        """The Python client pointed at nginx, with its default retry policy."""
        extra: dict[str, Any] = dict(kwargs)
        if self.ca is not None:
            extra["credentials"] = grpc.ssl_channel_credentials(root_certificates=self.ca)
        if self.token:
            extra["token"] = self.token
        return Client(self.grpc_target, **extra)

    def post(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One JSON-RPC call through nginx; returns the whole reply object."""
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            f"{self.http_url}/rpc", data=body.encode(), headers=headers
        )
        context = ssl.create_default_context(cadata=self.ca.decode()) if self.ca else None
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return dict(json.loads(response.read()))

    def served(self) -> Counter[tuple[str, str]]:
        """Calls nginx has logged so far: (gRPC method or HTTP path, replica container)."""
        seen: Counter[tuple[str, str]] = Counter()
        for line in podman("logs", self.nginx).splitlines():
            if "upstream=" not in line or '"' not in line:
                continue
            request = line.split('"')[1].split()
            upstream = line.split("upstream=", 1)[1].split()[0]
            last = upstream.split(",")[-1].strip()  # retried calls list every replica tried
            if len(request) < 2 or last in ("", "-"):
                continue
            path = request[1].removeprefix(GRPC_PATH)
            seen[(path, self.addresses.get(last.rsplit(":", 1)[0], last))] += 1
        return seen


def replica_addresses(replicas: Sequence[str]) -> dict[str, str]:
    """Each replica container's IP address on the compose network."""
    found = {}
    for name in replicas:
        text = podman(
            "inspect", name, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
        )
        for address in text.split():
            found[address] = name
    return found


def by_replica(delta: Counter[tuple[str, str]], path: str) -> Counter[str]:
    """How many calls of ``path`` each replica served in ``delta``."""
    return Counter({replica: n for (p, replica), n in delta.items() if p == path})


def seed_request() -> tuple[pb.EvaluateRequest, dict[str, int]]:
    """The seed graph as an EvaluateRequest with binary output, plus its input positions."""
    a, b, g = seed_graph()
    packed, tape, _ = codec.encode_value(g, {"a": a, "b": b})
    return pb.EvaluateRequest(packed_graph=packed, binary_output=True), dict(tape.names)


def check_seed(stack: Stack) -> None:
    """The seed's value and gradients over raw gRPC, the Python client and JSON-RPC."""
    request, names = seed_request()
    with stack.channel() as channel:
        reply = pb_grpc.GradientServiceStub(channel).Evaluate(
            request, timeout=30, metadata=stack.metadata()
        )
    values, grads = codec.response_arrays(reply)
    got = (f"{values[-1]:.4f}", f"{grads[names['a']]:.4f}", f"{grads[names['b']]:.4f}")
    check(got == SEED, f"gRPC through nginx: seed gave {got}, expected {SEED}")
    a, b, g = seed_graph()
    with stack.client() as client:
        client.backward(g)
    got = (f"{g.data:.4f}", f"{a.grad:.4f}", f"{b.grad:.4f}")
    check(got == SEED, f"Python client through nginx: seed gave {got}, expected {SEED}")
    a, b, g = seed_graph()
    _, tape, _ = codec.encode_value(g, {"a": a, "b": b})
    params = {
        "graph": json_format.MessageToDict(codec.to_graph(tape)),
        "selection": "SELECTION_NAMED",
    }
    result = stack.post("Evaluate", params)["result"]
    grads_by_name = {name: result["grads"][pos] for name, pos in result["names"].items()}
    named = (f"{grads_by_name['a']:.4f}", f"{grads_by_name['b']:.4f}")
    check(named == SEED[1:], f"JSON-RPC through nginx: seed gradients {named}, expected {SEED[1:]}")
    print("ok  seed over gRPC (raw and Python client) and JSON-RPC through nginx")


def check_spread(stack: Stack, calls: int = 60) -> None:
    """``calls`` GetServerInfo calls on one channel reach every replica, none more than half."""
    before = stack.served()
    with stack.channel() as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        for _ in range(calls):
            stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10, metadata=stack.metadata())
    spread = by_replica(stack.served() - before, "GetServerInfo")
    check(sum(spread.values()) == calls, f"nginx logged {sum(spread.values())} of {calls} calls")
    check(
        set(spread) == set(stack.replicas),
        f"calls reached {sorted(spread)}, not every replica of {stack.replicas}",
    )
    most = max(spread.values())
    check(most <= calls // 2, f"one replica served {most} of {calls} calls: {dict(spread)}")
    print(f"ok  {calls} calls on one channel spread over 3 replicas: {dict(spread)}")


def check_shared_registry(stack: Stack, calls: int = 12) -> None:
    """A graph registered through one replica evaluates by id through the others (raw calls).

    The graph is new to every replica (a random constant), and each call uses
    a fresh channel and no client-side resend, so only the shared registry
    can answer it.
    """
    a, b, g = seed_graph(-4.0, 2.0 + random.random())
    packed, tape, _ = codec.encode_value(g, {"a": a, "b": b})
    expected, _ = tape.evaluate()
    before = stack.served()
    with stack.channel() as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        registered = stub.RegisterGraph(
            pb.RegisterGraphRequest(packed_graph=packed), timeout=30, metadata=stack.metadata()
        )
    failures = []
    for i in range(calls):
        with stack.channel() as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            try:
                reply = stub.Evaluate(
                    pb.EvaluateRequest(graph_id=registered.graph_id, binary_output=True),
                    timeout=30,
                    metadata=stack.metadata(),
                )
                values, _ = codec.response_arrays(reply)
                if values[-1] != expected[-1]:
                    failures.append(f"call {i}: value {values[-1]} != {expected[-1]}")
            except grpc.RpcError as error:
                failures.append(f"call {i}: {error.code().name} {error.details()}")
    for i in range(calls):
        reply = stack.post("Evaluate", {"graphId": registered.graph_id})
        if "error" in reply:
            failures.append(f"JSON-RPC call {i}: {reply['error']}")
    delta = stack.served() - before
    register_at = by_replica(delta, "RegisterGraph")
    evaluated_at = by_replica(delta, "Evaluate") + by_replica(delta, "/rpc")
    check(not failures, f"evaluating a registered graph by id failed: {failures[:5]}")
    others = set(evaluated_at) - set(register_at)
    check(
        bool(others),
        f"registered at {dict(register_at)}, evaluated only at {dict(evaluated_at)}",
    )
    print(
        f"ok  graph registered at {sorted(register_at)} evaluated by id {2 * calls} times "
        f"(gRPC and JSON-RPC) at {dict(evaluated_at)}"
    )


def check_large_stream(stack: Stack, nodes: int = 1_500_001) -> None:
    """A streamed response of ``nodes`` values and gradients (24 MB) passes through nginx."""
    tape = affine_chain_tape(nodes, 1.0000001, 1e-7)
    values, grads = tape.evaluate()
    with stack.client() as client:
        result = client.evaluate(tape, stream=True, timeout=120)
    check(
        result.values.shape == (nodes,) and result.grads is not None,
        f"streamed result has shape {result.values.shape}",
    )
    assert result.grads is not None
    check(
        bool(np.array_equal(result.values, values) and np.array_equal(result.grads, grads)),
        "streamed values or gradients differ from the local evaluation",
    )
    size = 16 * nodes / 1e6
    print(f"ok  streamed response of {nodes} nodes ({size:.0f} MB) through nginx matches")


@dataclass
class Load:
    """Calls made by a bounded load: successes, failures (with their messages)."""

    ok: int = 0
    failed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def load(
    call: Callable[[], None], threads: int = 6, most_calls: int = 3000, most_seconds: float = 60
) -> Iterator[Load]:
    """Run ``call`` in ``threads`` loops until the block ends (bounded in count and time)."""
    seen = Load()
    stop = threading.Event()
    deadline = time.monotonic() + most_seconds

    def loop() -> None:
        for _ in range(most_calls):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                call()
                with seen.lock:
                    seen.ok += 1
            except Exception as exc:
                with seen.lock:
                    seen.failed.append(f"{type(exc).__name__}: {exc}"[:300])

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    try:
        yield seen
    finally:
        stop.set()
        for w in workers:
            w.join(most_seconds)


def busy_call(stack: Stack) -> Callable[[], None]:
    """A call that keeps a replica busy for a while (a 300k-node graph), checked on return."""
    tape = affine_chain_tape(300_001, 1.0000001, 1e-7)
    expected = tape.evaluate()[0][-1]
    client = stack.client()

    def call() -> None:
        result = client.evaluate(tape, selection="output", timeout=60)
        if result.values[-1] != expected:
            raise CheckFailed(f"wrong value {result.values[-1]} != {expected}")

    return call


def check_drain(stack: Stack, replica: str) -> None:
    """``replica`` stopped with SIGTERM while calls are in flight: none fails, it exits 0."""
    before = stack.served()
    with load(busy_call(stack)) as seen:
        time.sleep(2.0)
        started = time.monotonic()
        podman("stop", "--time", "30", replica, timeout=60)
        took = time.monotonic() - started
        time.sleep(2.0)
    delta = stack.served() - before
    served_there = sum(n for (_, r), n in delta.items() if r == replica)
    code = podman("inspect", replica, "--format", "{{.State.ExitCode}}").strip()
    check(served_there > 0, f"{replica} served no call before it was stopped")
    check(not seen.failed, f"{len(seen.failed)} calls failed while draining: {seen.failed[:3]}")
    check(code == "0", f"{replica} exited with status {code} after SIGTERM, not 0")
    print(
        f"ok  {replica} stopped with SIGTERM under load: {seen.ok} calls, 0 failed, "
        f"exit 0 after {took:.1f} s ({served_there} calls served there first)"
    )


def check_kill(stack: Stack, replica: str) -> None:
    """``replica`` killed (SIGKILL) under load: 0 failed calls for the default Python client."""
    before = stack.served()
    with load(busy_call(stack)) as seen:
        time.sleep(2.0)
        podman("kill", "--signal", "KILL", replica)
        time.sleep(4.0)
    delta = stack.served() - before
    served_there = sum(n for (_, r), n in delta.items() if r == replica)
    check(served_there > 0, f"{replica} served no call before it was killed")
    check(seen.ok > 0, "no call succeeded under load")
    check(not seen.failed, f"{len(seen.failed)} calls failed after a kill: {seen.failed[:3]}")
    print(f"ok  {replica} killed under load: {seen.ok} calls, 0 failed")


def main(argv: Sequence[str] | None = None) -> int:
    """Run every check against the stack described by the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--grpc", required=True, help="nginx's gRPC address, HOST:PORT")
    parser.add_argument("--http", required=True, help="nginx's HTTP base URL")
    parser.add_argument("--nginx", required=True, help="the nginx container")
    parser.add_argument("--replica", action="append", required=True, help="a replica container")
    parser.add_argument("--ca", help="CA certificate (PEM) nginx's certificate is signed by")
    parser.add_argument("--token-file", help="file whose first token the calls carry")
    args = parser.parse_args(argv)
    ca = open(args.ca, "rb").read() if args.ca else None
    token = None
    if args.token_file:
        lines = open(args.token_file).read().splitlines()
        token = next(t.strip() for t in lines if t.strip() and not t.startswith("#"))
    stack = Stack(args.grpc, args.http, args.nginx, args.replica, ca, token)
    stack.addresses = replica_addresses(stack.replicas)
    try:
        check_seed(stack)
        check_spread(stack)
        check_shared_registry(stack)
        check_large_stream(stack)
        check_drain(stack, stack.replicas[1])
        check_kill(stack, stack.replicas[2])
    except CheckFailed as failure:
        print(f"FAIL {failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
