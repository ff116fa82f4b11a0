"""Bounded load on a real server: N client processes x M calls in flight for T seconds.

    .venv/bin/python bench/load.py --processes 2 --inflight 8 --seconds 20
    .venv/bin/python bench/load.py --seconds 600          # the soak of docs/RELIABILITY.md

It starts its own server on loopback (``--workers`` processes, ephemeral
ports) unless ``--target``/``--http`` name a running one on 127.0.0.1 or
::1. Each client process keeps ``--inflight`` calls going on one gRPC
channel and one HTTP session: the seed graph (checked against its numbers:
24.7041) and a ``--big-nodes`` graph (every ``--big-every``-th call), over
gRPC (graph in the call, or by ``graph_id``) and JSON-RPC. It stops by
itself after ``--seconds`` (every call has a deadline), then prints the
throughput, p50/p99 latency per kind of call, errors by code, and the
server's resident memory sampled every ``--rss-every`` seconds, with the
growth after ``--warmup`` seconds. Exit status 1 if any call failed or gave
a wrong answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEED_G = 24.7041
LOOPBACK = ("127.0.0.1", "[::1]", "localhost")


def seed_packed() -> Any:
    """The seed expression as a PackedGraph (its output is g)."""
    from micrograd import codec
    from micrograd.seed import seed_graph

    a, b, g = seed_graph()
    packed, _, _ = codec.encode_value(g, {"a": a, "b": b})
    return packed


def big_packed(n: int) -> Any:
    """A chain of ``n`` nodes mixing every binary arithmetic op, values kept near 1."""
    import numpy as np
    from micrograd import codec
    from micrograd.tape import Tape

    code = np.empty(n, dtype=np.int64)
    a0 = np.full(n, -1, dtype=np.int64)
    a1 = np.full(n, -1, dtype=np.int64)
    const = np.zeros(n)
    code[0], const[0] = 1, 0.5
    code[1::2], const[1::2] = 2, 1.0000001
    inner = np.arange(2, n, 2)
    code[inner] = np.where((inner // 2) % 2 == 0, 5, 3)  # mul, add
    a0[inner] = inner - 2
    a1[inner] = inner - 1
    return codec.pack(Tape.from_arrays(code, a0, a1, const, {"x": 0}))


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` (nearest rank), 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def client(index: int, args: argparse.Namespace, end: float) -> dict[str, Any]:
    """One client process's calls until ``end``: latencies by kind, errors by code."""
    import aiohttp
    import grpc
    from google.protobuf import json_format
    from micrograd.v1 import gradient_service_pb2 as pb
    from micrograd.v1 import gradient_service_pb2_grpc as pb_grpc

    seed = seed_packed()
    big = big_packed(args.big_nodes)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    latencies: dict[str, list[float]] = {}
    errors: Counter[str] = Counter()
    small_json = json.dumps(
        {
            "jsonrpc": "2.0",
            "method": "Evaluate",
            "params": {
                "packedGraph": json_format.MessageToDict(seed),
                "selection": "SELECTION_OUTPUT",
            },
            "id": index,
        }
    ).encode()
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        big_id = (await stub.RegisterGraph(pb.RegisterGraphRequest(packed_graph=big))).graph_id
        big_json = json.dumps(
            {
                "jsonrpc": "2.0",
                "method": "Evaluate",
                "params": {"graphId": big_id, "selection": "SELECTION_INPUTS"},
                "id": index,
            }
        ).encode()
        async with aiohttp.ClientSession() as http:

            async def one(kind: str) -> None:
                started = time.perf_counter()
                try:
                    if kind == "grpc small":
                        resp = await stub.Evaluate(
                            pb.EvaluateRequest(packed_graph=seed, selection=pb.SELECTION_OUTPUT),
                            timeout=args.timeout,
                        )
                        if round(resp.values[0], 4) != SEED_G:
                            errors["WRONG_ANSWER"] += 1
                            return
                    elif kind == "grpc big":
                        await stub.Evaluate(
                            pb.EvaluateRequest(packed_graph=big, selection=pb.SELECTION_INPUTS),
                            timeout=args.timeout,
                        )
                    elif kind == "grpc big by id":
                        await stub.Evaluate(
                            pb.EvaluateRequest(graph_id=big_id, selection=pb.SELECTION_INPUTS),
                            timeout=args.timeout,
                        )
                    else:
                        body = small_json if kind == "jsonrpc small" else big_json
                        async with http.post(
                            f"{args.http}/rpc",
                            data=body,
                            headers={"Content-Type": "application/json"},
                            timeout=aiohttp.ClientTimeout(total=args.timeout),
                        ) as reply:
                            answer = await reply.json()
                        if "error" in answer:
                            errors[f"JSONRPC {answer['error']['code']}"] += 1
                            return
                        if kind == "jsonrpc small" and round(
                            answer["result"]["values"][0], 4
                        ) != SEED_G:
                            errors["WRONG_ANSWER"] += 1
                            return
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    return
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[f"HTTP {type(exc).__name__}"] += 1
                    return
                latencies.setdefault(kind, []).append(time.perf_counter() - started)

            kinds = ["grpc small", "jsonrpc small"] * (args.big_every // 2) + [
                "grpc big",
                "grpc big by id",
                "jsonrpc big by id",
            ]

            async def lane(lane_index: int) -> None:
                step = lane_index
                while time.monotonic() < end:
                    await one(kinds[step % len(kinds)])
                    step += 1

            await asyncio.gather(*(lane(i * 3 + index) for i in range(args.inflight)))
    return {"latencies": latencies, "errors": dict(errors)}


def client_process(index: int, args: argparse.Namespace, end_wall: float) -> dict[str, Any]:
    """Entry of one client process (``end_wall`` is a ``time.time()``)."""
    end = time.monotonic() + max(0.0, end_wall - time.time())
    return asyncio.run(client(index, args, end))


def rss_of(pid: int) -> int:
    """Resident bytes of ``pid`` and its children (the workers), from /proc."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def start_server(args: argparse.Namespace, folder: Path) -> subprocess.Popen[bytes]:
    """A server on loopback with ephemeral ports (``--workers 1``) or fixed free ones."""
    port_file, http_file = folder / "port", folder / "http"
    argv = [
        sys.executable, "-m", "micrograd.server", "serve",
        "--host", "127.0.0.1", "--workers", str(args.workers),
        "--port", str(args.port), "--http-port", str(args.http_port),
        "--port-file", str(port_file), "--http-port-file", str(http_file),
        "--log-level", "WARNING",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROGRAD_RPC_")}
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while not (port_file.exists() and http_file.exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start:\n{(folder / 'server.log').read_text()}")
        time.sleep(0.05)
    args.target = f"127.0.0.1:{int(port_file.read_text())}"
    args.http = f"http://127.0.0.1:{int(http_file.read_text())}"
    return proc


def main(argv: list[str] | None = None) -> int:
    """Run the load, print the report; 1 if any call failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="client processes (N)")
    parser.add_argument("--inflight", type=int, default=8, help="calls in flight per process (M)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to load (T)")
    parser.add_argument("--big-nodes", type=int, default=100_000, help="nodes of the big graph")
    parser.add_argument("--big-every", type=int, default=20, help="one big call in this many")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call")
    parser.add_argument("--rss-every", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=5.0, help="RSS growth is after this")
    parser.add_argument("--workers", type=int, default=1, help="server processes (own server)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--target", help="host:port of a running server (loopback only)")
    parser.add_argument("--http", help="http://host:port of its JSON-RPC endpoint")
    parser.add_argument("--server-pid", type=int, help="pid of a running server, for its RSS")
    parser.add_argument("--json", help="also write the report to this file as JSON")
    args = parser.parse_args(argv)
    if args.workers > 1 and args.port == 0:
        parser.error("--workers > 1 needs fixed --port and --http-port")
    for address in (args.target or "", args.http or ""):
        host = address.split("//")[-1].rsplit(":", 1)[0]
        if address and host not in LOOPBACK:
            parser.error(f"{address}: this tool only loads servers on loopback")
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(args, Path(tmp)) if args.target is None else None
        pid = proc.pid if proc is not None else args.server_pid
        try:
            report = run_load(args, pid)
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(30)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if report["errors"] else 0


def run_load(args: argparse.Namespace, pid: int | None) -> dict[str, Any]:
    """Start the client processes, sample the server's RSS until they finish."""
    started = time.time()
    end_wall = started + args.seconds
    context = multiprocessing.get_context("spawn")
    rss: list[tuple[float, int]] = []
    with context.Pool(args.processes) as pool:
        pending = [
            pool.apply_async(client_process, (i, args, end_wall)) for i in range(args.processes)
        ]
        while not all(p.ready() for p in pending):
            if pid is not None:
                rss.append((round(time.time() - started, 1), rss_of(pid)))
            time.sleep(args.rss_every)
            if time.time() > end_wall + args.timeout + 60:
                raise SystemExit("the clients did not stop in time")
        results = [p.get() for p in pending]
    elapsed = time.time() - started
    latencies: dict[str, list[float]] = {}
    errors: Counter[str] = Counter()
    for result in results:
        for kind, values in result["latencies"].items():
            latencies.setdefault(kind, []).extend(values)
        errors.update(result["errors"])
    calls = sum(len(v) for v in latencies.values())
    after = [r for t, r in rss if t >= args.warmup and r > 0]
    growth = (after[-1] - after[0]) / after[0] if len(after) >= 2 else 0.0
    return {
        "seconds": round(elapsed, 1),
        "processes": args.processes,
        "inflight": args.inflight,
        "calls": calls,
        "throughput": round(calls / elapsed, 1),
        "kinds": {
            kind: {
                "calls": len(v),
                "p50_ms": round(1000 * statistics.median(v), 2),
                "p99_ms": round(1000 * percentile(v, 0.99), 2),
            }
            for kind, v in sorted(latencies.items())
        },
        "errors": dict(errors),
        "rss": rss,
        "rss_growth_after_warmup": round(growth, 4),
    }


def print_report(report: dict[str, Any]) -> None:
    """The report as tables."""
    print(
        f"{report['processes']} processes x {report['inflight']} in flight for "
        f"{report['seconds']} s: {report['calls']} calls, {report['throughput']} calls/s"
    )
    print(f"{'call':<20} {'calls':>8} {'p50 ms':>9} {'p99 ms':>9}")
    for kind, row in report["kinds"].items():
        print(f"{kind:<20} {row['calls']:>8} {row['p50_ms']:>9} {row['p99_ms']:>9}")
    errors = report["errors"]
    print("errors by code: " + (", ".join(f"{k} {v}" for k, v in errors.items()) or "none"))
    samples = report["rss"]
    if samples:
        step = max(1, len(samples) // 12)
        shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
        points = ", ".join(f"{t:g}s {r / 2**20:.0f}" for t, r in shown)
        print(f"server RSS (MiB) over time: {points}")
        print(f"RSS growth after warm-up: {100 * report['rss_growth_after_warmup']:.1f} %")


if __name__ == "__main__":
    sys.exit(main())
