"""Scaling out, side by side in one run: nginx vs a replica, the graph store vs the cache.

Real processes on 127.0.0.1: two server replicas (``--workers 1`` each),
nginx started from ``deploy/nginx.conf`` with only its addresses moved onto
loopback (as ``tests/test_deploy.py`` does), and, when ``redis-server`` is
installed, a Redis with the server's ``--graph-store redis://``. Rows:

1. seed ``Evaluate`` p50 through nginx (HTTP/2 ``grpc_pass`` to the two
   replicas) vs one replica directly, interleaved; target <= 1.5x.
2. seed ``Evaluate`` by ``graph_id`` read from the host store on every call
   (a server run with ``--graph-cache-entries 0``) vs a hit in the
   in-process cache (a default server); target <= 1.2x. The same from Redis
   when it is installed (no target: a network store pays its round trip).
3. a 1,000,000-node graph loaded from the host store (read, verify the
   content hash, columns in place) vs decoding and validating its
   ``PackedGraph`` (the codec the server runs); target < 2x. Both in this
   process, medians over the repeats; Redis again when installed.

    python bench/scale.py            # everything (under a minute)
    python bench/scale.py --quick    # fewer calls and repeats
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from micrograd import codec
from micrograd.server.store import HostStore, RedisStore
from micrograd.v1 import gradient_service_pb2 as pb
from service import Row, big_tape, latencies, percentile, seed_tape, server_process

ROOT = Path(__file__).resolve().parent.parent
EVALUATE = "/micrograd.v1.GradientService/Evaluate"
REGISTER = "/micrograd.v1.GradientService/RegisterGraph"
MiB = 1 << 20


@dataclass
class Run:
    """The sizes of this run."""

    calls: int
    blocks: int
    repeats: int


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", 256 * MiB),
        ("grpc.max_send_message_length", 256 * MiB),
    ]
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def replica(directory: Path, name: str, *flags: str) -> AbstractContextManager[str]:
    """A server process with ``flags``; yields its gRPC target (HTTP port in ``name.port.http``)."""
    argv = [sys.executable, "-m", "micrograd.server", "serve", "--host", "127.0.0.1",
            "--port", "0", "--http-port", "0", "--workers", "1",
            "--port-file", "{port_file}", "--http-port-file", "{port_file}.http",
            "--log-level", "WARNING", *flags]  # fmt: skip
    return server_process(argv, directory, name)


# -- nginx ---------------------------------------------------------------------------


def nginx_config(replicas: Sequence[str], http: Sequence[str], port: int, where: Path) -> str:
    """``deploy/nginx.conf`` with its upstreams, listeners and files moved onto loopback (its
    TLS files, if it names any, are expected in ``where``, as ``scripts/gen-certs`` makes them)."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    text = re.sub(r"\n\s*resolver [^;]*;", "", text)
    grpc_servers = "\n" + " ".join(f"server {r};" for r in replicas)
    http_servers = "\n" + " ".join(f"server {h};" for h in http)
    text, n_grpc = re.subn(r"(\s*server\s+[\w.-]+:50051[^;]*;)+", grpc_servers, text, count=1)
    text, _ = re.subn(r"(\s*server\s+[\w.-]+:8080[^;]*;)+", http_servers, text, count=1)
    text, n_listen = re.subn(r"listen\s+(?:[\w.\[\]:]*:)?50051\b", f"listen 127.0.0.1:{port}", text)
    text = re.sub(r"listen\s+(?:[\w.\[\]:]*:)?8080\b", f"listen 127.0.0.1:{free_port()}", text)
    if not (n_grpc and n_listen):
        raise RuntimeError("deploy/nginx.conf no longer has a gRPC upstream on :50051")
    text = re.sub(r"\n\s*(error_log|access_log|pid) [^;]*;", "", text)
    text = text.replace(" /etc/nginx/tls/", f" {where}/")
    temp = "".join(
        f"    {name}_temp_path {where}/{name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = re.sub(r"http\s*\{\n", f"http {{\n    access_log off;\n{temp}", text, count=1)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"{user}pid {where}/nginx.pid;\nerror_log {where}/error.log warn;\n" + text


def uses_tls() -> bool:
    """Whether ``deploy/nginx.conf`` speaks TLS to callers and replicas (as shipped)."""
    return "ssl_certificate" in (ROOT / "deploy" / "nginx.conf").read_text()


@dataclass(frozen=True)
class Secrets:
    """What ``scripts/gen-certs`` made: server flags, and the credentials of a caller."""

    flags: tuple[str, ...]
    ca: bytes
    client: tuple[bytes, bytes]
    token: str


def make_secrets(where: Path) -> Secrets:
    """Certificates and a token in ``where``, as the compose stack uses them."""
    subprocess.run([str(ROOT / "scripts" / "gen-certs"), str(where)], check=True,
                   capture_output=True)  # fmt: skip
    flags = ("--tls-cert", str(where / "server.pem"), "--tls-key", str(where / "server.key"),
             "--tls-client-ca", str(where / "ca.pem"),
             "--auth-token-file", str(where / "tokens"))  # fmt: skip
    return Secrets(
        flags,
        (where / "ca.pem").read_bytes(),
        ((where / "client.key").read_bytes(), (where / "client.pem").read_bytes()),
        (where / "token").read_text().strip(),
    )


@contextmanager
def nginx(replicas: Sequence[str], http: Sequence[str], where: Path) -> Iterator[str]:
    """nginx in front of ``replicas``; yields its gRPC target."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    conf = where / "nginx.conf"
    conf.write_text(nginx_config(replicas, http, port, where))
    proc = subprocess.Popen([binary, "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"nginx did not start: {err}") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


# -- Redis ---------------------------------------------------------------------------


@contextmanager
def redis_server(where: Path) -> Iterator[str]:
    """A memory-only ``redis-server`` on a free loopback port; yields its URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(where), "--maxmemory", "256mb", "--maxmemory-policy", "volatile-lru"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


# -- the measures --------------------------------------------------------------------


def interleaved(calls: dict[str, Callable[[], object]], run: Run) -> dict[str, list[float]]:
    """Latencies of each call, measured in alternating blocks so that drift hits all alike."""
    for call in calls.values():
        latencies(call, 100, 3)  # warm up connections and caches
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(run.blocks):
        for name, call in calls.items():
            out[name] += latencies(call, run.calls, 10)
    return out


def seed_evaluate_request() -> bytes:
    """The seed graph's ``EvaluateRequest`` (packed graph, binary output), serialized."""
    return pb.EvaluateRequest(
        packed_graph=codec.pack(seed_tape()), binary_output=True
    ).SerializeToString()


def check_seed(reply: bytes) -> None:
    """The reply carries the seed's output value, 24.7041."""
    values = codec.f64_array(pb.EvaluateResponse.FromString(reply).values_f64)
    assert f"{values[-1]:.4f}" == "24.7041", values[-1]


def measure_nginx(direct: str, proxied: str, secrets: Secrets | None, run: Run) -> list[Row]:
    """Row 1: seed Evaluate through nginx vs one replica directly (both secured alike)."""
    request = seed_evaluate_request()
    to_nginx = to_replica = None
    metadata: tuple[tuple[str, str], ...] = ()
    if secrets is not None:
        to_nginx = grpc.ssl_channel_credentials(root_certificates=secrets.ca)
        to_replica = grpc.ssl_channel_credentials(secrets.ca, *secrets.client)
        metadata = (("authorization", f"Bearer {secrets.token}"),)
    with _channel(direct, to_replica) as one, _channel(proxied, to_nginx) as lb:
        at_replica = one.unary_unary(EVALUATE)
        at_nginx = lb.unary_unary(EVALUATE)
        check_seed(at_nginx(request, metadata=metadata))
        got = interleaved({"nginx": lambda: at_nginx(request, metadata=metadata),
                           "direct": lambda: at_replica(request, metadata=metadata)},
                          run)  # fmt: skip
    how = "TLS, mTLS to the replicas, tokens" if secrets is not None else "plaintext"
    note = (f"{len(got['nginx'])} calls each, {run.blocks} interleaved blocks; nginx -> 2 "
            f"replicas; {how}, as deploy/nginx.conf says")  # fmt: skip
    return [
        Row("seed Evaluate p50, through nginx | one replica", percentile(got["nginx"], 50) * 1e6,
            percentile(got["direct"], 50) * 1e6, "us", "<= 1.5x", note),
        Row("seed Evaluate p90, through nginx | one replica", percentile(got["nginx"], 90) * 1e6,
            percentile(got["direct"], 90) * 1e6, "us"),
    ]  # fmt: skip


def _register(target: str) -> str:
    with _channel(target) as channel:
        reply = channel.unary_unary(REGISTER)(
            pb.RegisterGraphRequest(packed_graph=codec.pack(seed_tape())).SerializeToString()
        )
    return pb.RegisterGraphResponse.FromString(reply).graph_id


def measure_by_id(cached: str, stores: dict[str, str], run: Run) -> list[Row]:
    """Row 2: Evaluate by graph_id read from a store on every call vs an in-process cache hit."""
    gid = _register(cached)
    for target in stores.values():
        assert _register(target) == gid
    request = pb.EvaluateRequest(graph_id=gid, binary_output=True).SerializeToString()
    with ExitStack() as stack:
        calls: dict[str, Callable[[], object]] = {}
        for name, target in {"cache": cached, **stores}.items():
            channel = stack.enter_context(_channel(target))
            call = channel.unary_unary(EVALUATE)
            check_seed(call(request))
            calls[name] = lambda call=call: call(request)  # type: ignore[misc]
        got = interleaved(calls, run)
    base = percentile(got["cache"], 50) * 1e6
    rows = []
    for name in stores:
        target = "<= 1.2x" if name == "host store" else ""
        note = ("every call reads the store (--graph-cache-entries 0) | a default server's "
                f"cache hit; {len(got[name])} calls each")  # fmt: skip
        rows.append(Row(f"seed Evaluate by id p50, {name} | in-process cache",
                        percentile(got[name], 50) * 1e6, base, "us", target,
                        note if name == "host store" else ""))  # fmt: skip
    return rows


def measure_big_load(directory: Path, redis_url: str | None, run: Run) -> list[Row]:
    """Row 3: a 1M-node graph loaded from the host store vs decoding its PackedGraph."""
    tape = big_tape()
    gid = codec.graph_id(tape)
    packed = codec.pack(tape)
    host = HostStore(directory / "big-store", max_bytes=1 << 30, max_entries=8)
    host.put(gid, tape)
    redis = RedisStore(redis_url, ttl=600, timeout=5.0, backoff=1.0) if redis_url else None
    if redis is not None:
        redis.put(gid, tape)

    def median_ms(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(run.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    loaded = host.get(gid)
    assert loaded is not None and codec.graph_id(loaded) == gid
    decode = median_ms(lambda: codec.unpack(packed))
    from_host = median_ms(lambda: host.get(gid))
    size = (host.path(gid) or Path()).stat().st_size
    rows = [Row("1M-node graph, host store load | PackedGraph decode", from_host, decode, "ms",
                "<= 2x", f"{len(tape):,} nodes, {size / MiB:.1f} MiB entry, id and checksum "
                f"verified on load; {run.repeats} repeats")]  # fmt: skip
    if redis is not None:
        from_redis = median_ms(lambda: redis.get(gid))
        rows.append(Row("1M-node graph, Redis store load | PackedGraph decode", from_redis,
                        decode, "ms"))  # fmt: skip
        redis.close()
    return rows


# -- the table -----------------------------------------------------------------------


def _figure(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def render(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table (measured | baseline, as each row's name says)."""
    head = ("measure (ours | baseline)", "ours", "baseline", "unit", "ratio", "target", "")
    cells = [head] + [
        (r.measure, _figure(r.ours), _figure(r.baseline), r.unit,
         "-" if r.ratio is None else f"{r.ratio:.2f}x", r.target or "-", r.verdict())
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[c]) for row in cells) for c in range(len(head))]
    lines = []
    for k, row in enumerate(cells):
        padded = [cell.ljust(w) if c == 0 else cell.rjust(w)
                  for c, (cell, w) in enumerate(zip(row, widths))]  # fmt: skip
        lines.append("  ".join(padded).rstrip())
        if k == 0:
            lines.append("-" * len(lines[0]))
    notes = [f"  {r.measure}: {r.note}" for r in rows if r.note]
    return "\n".join([*lines, "", "notes:", *notes])


def main(argv: Sequence[str] | None = None) -> int:
    """Start the replicas, nginx and Redis, run the measures, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    args = parser.parse_args(argv)
    run = Run(calls=150, blocks=3, repeats=3) if args.quick else Run(calls=400, blocks=5, repeats=7)
    has_nginx = bool(shutil.which("nginx") or Path("/usr/sbin/nginx").exists())
    has_redis = bool(shutil.which("redis-server") or Path("/usr/bin/redis-server").exists())
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        where = Path(tmp)
        store = where / "host-store"
        flags = ("--graph-store-dir", str(store))
        one = stack.enter_context(replica(where, "one", *flags))
        no_cache = stack.enter_context(
            replica(where, "store", *flags, "--graph-cache-entries", "0")
        )
        stores = {"host store": no_cache}
        redis_url = None
        if has_redis:
            redis_url = stack.enter_context(redis_server(where))
            stores["Redis store"] = stack.enter_context(replica(
                where, "redis", "--graph-store", redis_url, "--graph-cache-entries", "0"
            ))  # fmt: skip
        if has_nginx:
            secrets = make_secrets(where) if uses_tls() else None
            extra = secrets.flags if secrets is not None else ()
            edge = [stack.enter_context(replica(where, name, *flags, *extra))
                    for name in ("edge1", "edge2")]  # fmt: skip
            http = [f"127.0.0.1:{int((where / f'{n}.port.http').read_text())}"
                    for n in ("edge1", "edge2")]  # fmt: skip
            proxied = stack.enter_context(nginx(edge, http, where))
            rows += measure_nginx(edge[0], proxied, secrets, run)
        rows += measure_by_id(one, stores, run)
        rows += measure_big_load(where, redis_url, run)
    print(f"Python {sys.version.split()[0]}, grpcio {grpc.__version__}, {os.cpu_count()} CPUs; "
          f"nginx {'yes' if has_nginx else 'not installed'}, "
          f"redis-server {'yes' if has_redis else 'not installed'}")  # fmt: skip
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
