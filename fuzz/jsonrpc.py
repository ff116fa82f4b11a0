"""Fuzz the JSON-RPC endpoint: body bytes -> JSON parsing -> request objects -> params mapping.

    .venv/bin/python fuzz/jsonrpc.py -runs=1000000      # libFuzzer flags

Each input is raw bytes, a byte-level mutation of a valid request (or
batch), or a structural one: a member of a valid request replaced by a
JSON value of any type (deep nesting, huge and non-finite numbers, lone
surrogates, wrong types), all chosen by the fuzzer's bytes. The body goes
through ``JsonRpc.handle``, which must answer with valid JSON whose errors
carry a documented code (never -32603 or HTTP 500) and a short message.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

from micrograd.server.service import GradientService  # the core is the other target's

_MAPPING = ["micrograd.server.jsonrpc", "micrograd.server.proto_json"]
with atheris.instrument_imports(include=_MAPPING):
    from micrograd.server.jsonrpc import JsonRpc

from _seeds import SETTINGS, json_seeds  # noqa: E402

RPC = JsonRpc(
    GradientService(SETTINGS),
    max_batch=SETTINGS.jsonrpc_max_batch,
    max_depth=SETTINGS.jsonrpc_max_depth,
)
LOOP = asyncio.new_event_loop()
SEEDS = json_seeds()
SEED_BODIES = [json.dumps(s).encode() for s in SEEDS]
DOCUMENTED = {-32700, -32600, -32601, -32602, -32005, -32008}
"""Parse error, invalid request, no such method, invalid params, NOT_FOUND, RESOURCE_EXHAUSTED."""
MESSAGE_LIMIT = 1100
SPECIAL = [
    True, False, None, 0, -1, 1.5, 3.0, 1e308, -1e308, 2**64, "", "NaN", "Infinity", "\ud800",
    "x" * 300, [], {}, [[[]]], {"a": {"b": {}}}, "OP_ADD", "SELECTION_ALL", "AAAA", "!!",
]


def json_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """A JSON value of any type, chosen by the fuzzer's bytes (nesting below 40)."""
    kind = fdp.ConsumeIntInRange(0, 8)
    if kind == 0:
        return SPECIAL[fdp.ConsumeIntInRange(0, len(SPECIAL) - 1)]
    if kind == 1:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 9))
    if kind == 2:
        return fdp.ConsumeRegularFloat()
    if kind == 3:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12))
    if kind == 4:
        return fdp.ConsumeBool()
    if kind == 5 and depth < 40:
        return [json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    if kind == 6 and depth < 40:
        return {
            fdp.ConsumeUnicodeNoSurrogates(6): json_value(fdp, depth + 1)
            for _ in range(fdp.ConsumeIntInRange(0, 3))
        }
    if kind == 7:
        level = fdp.ConsumeIntInRange(1, 200)
        return json.loads("[" * level + "]" * level) if level < 900 else []
    return None


def structural(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A valid request with one member, somewhere inside it, replaced or added."""
    doc: Any = json.loads(SEED_BODIES[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)])
    node = doc
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        if isinstance(node, dict) and node:
            keys = list(node)
            child = node[keys[fdp.ConsumeIntInRange(0, len(keys) - 1)]]
        elif isinstance(node, list) and node:
            child = node[fdp.ConsumeIntInRange(0, len(node) - 1)]
        else:
            break
        if not isinstance(child, dict | list):
            break
        node = child
    value = json_value(fdp)
    if isinstance(node, dict):
        keys = [*node, "extra", "nodes", "op", "args", "id", "jsonrpc", "params"]
        node[keys[fdp.ConsumeIntInRange(0, len(keys) - 1)]] = value
    elif isinstance(node, list) and node:
        node[fdp.ConsumeIntInRange(0, len(node) - 1)] = value
    if fdp.ConsumeBool():
        doc = [doc, SEEDS[0]][: fdp.ConsumeIntInRange(1, 2)]
    return json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")


def mutated(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A valid body with up to 8 byte edits."""
    buf = bytearray(SEED_BODIES[fdp.ConsumeIntInRange(0, len(SEED_BODIES) - 1)])
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        at = fdp.ConsumeIntInRange(0, max(0, len(buf) - 1))
        edit = fdp.ConsumeIntInRange(0, 3)
        if edit == 0 and buf:
            buf[at] = fdp.ConsumeInt(1) & 0xFF
        elif edit == 1:
            buf[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
        elif edit == 2:
            del buf[at : at + fdp.ConsumeIntInRange(1, 8)]
        else:
            buf[at:at] = b"[{"[fdp.ConsumeIntInRange(0, 1) :][:1] * fdp.ConsumeIntInRange(1, 100)
    return bytes(buf)


def check(answer: bytes | None) -> None:
    """The answer is JSON; each error has a documented code and a short string message."""
    if answer is None:
        return
    document = json.loads(answer)
    for response in document if isinstance(document, list) else [document]:
        error = response.get("error")
        if error is None:
            continue
        if error["code"] not in DOCUMENTED:
            raise AssertionError(f"undocumented error code: {error}")
        if not isinstance(error["message"], str) or len(error["message"]) > MESSAGE_LIMIT:
            raise AssertionError(f"bad error message: {str(error)[:300]}")


def TestOneInput(data: bytes) -> None:
    """One fuzz input: build a body, answer it, check the answer."""
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0:
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
    elif mode == 1:
        body = mutated(fdp)
    else:
        body = structural(fdp)
    check(answered(body))


def answered(body: bytes) -> bytes | None:
    """``RPC.handle(body)``, driven without an event loop when it never waits (no pool: it
    does not), else on ``LOOP``."""
    call = RPC.handle(body)
    try:
        call.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    call.close()
    return LOOP.run_until_complete(RPC.handle(body))


def main() -> None:
    """Run the fuzzer with libFuzzer's command line."""
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
