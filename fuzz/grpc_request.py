"""Fuzz the gRPC request path: request bytes -> decoder -> validation -> tape -> kernel.

    .venv/bin/python fuzz/grpc_request.py -runs=1000000      # libFuzzer flags

Each input is either raw bytes or a mutation (byte flips, inserts, cuts,
splices, varint rewrites) of a valid ``Evaluate``/``EvaluateStream``/
``RegisterGraph`` request in either graph form, directed by the fuzzer's
bytes so that coverage guides the mutations too. The request is parsed the
way the server parses it (``codec.malformed.parse``) and answered by the
transport-free core. Anything but an answer, ``MalformedMessage`` or a
``ServiceError`` with a documented code (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED) and a short message is a crash.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["micrograd"]):
    from micrograd.codec.malformed import MalformedMessage, parse
    from micrograd.server.service import Code, GradientService, ServiceError
    from micrograd.v1 import gradient_service_pb2 as pb

from _seeds import SETTINGS, grpc_seeds

SERVICE = GradientService(SETTINGS)
SEEDS = grpc_seeds()
TYPES = (pb.EvaluateRequest, pb.EvaluateStreamRequest, pb.RegisterGraphRequest)
DOCUMENTED = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}
MESSAGE_LIMIT = 1100


def mutate(fdp: atheris.FuzzedDataProvider, data: bytes) -> bytes:
    """``data`` changed by up to 8 edits chosen by the fuzzer's bytes."""
    buf = bytearray(data)
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        if not buf:
            buf += fdp.ConsumeBytes(4)
            continue
        at = fdp.ConsumeIntInRange(0, len(buf) - 1)
        edit = fdp.ConsumeIntInRange(0, 5)
        if edit == 0:
            buf[at] = fdp.ConsumeInt(1) & 0xFF
        elif edit == 1:
            buf[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
        elif edit == 2:
            del buf[at : at + fdp.ConsumeIntInRange(1, 16)]
        elif edit == 3:
            del buf[at:]
        elif edit == 4:
            other = SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)][1]
            start = fdp.ConsumeIntInRange(0, len(other) - 1)
            buf[at:at] = other[start : start + fdp.ConsumeIntInRange(1, 64)]
        else:  # a varint of any size where a length or value was
            value = fdp.ConsumeIntInRange(0, (1 << 35) - 1)
            out = bytearray()
            while True:
                byte, value = value & 0x7F, value >> 7
                out.append(byte | (0x80 if value else 0))
                if not value:
                    break
            buf[at : at + 1] = out
    return bytes(buf)


def answer(kind: int, request: object) -> None:
    """Run the call the way the servicer does (every stream message drawn)."""
    if kind == 0:
        SERVICE.evaluate_wire(request)  # type: ignore[arg-type]
    elif kind == 1:
        for _ in SERVICE.evaluate_stream_wire(request):  # type: ignore[arg-type]
            pass
    else:
        SERVICE.register_graph(request)  # type: ignore[arg-type]


def TestOneInput(data: bytes) -> None:
    """One fuzz input: build request bytes, parse them, answer them; documented errors only."""
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 3) == 0:
        kind = fdp.ConsumeIntInRange(0, 2)
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
    else:
        kind, seed = SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)]
        body = mutate(fdp, seed)
    try:
        request = parse(TYPES[kind], body)
    except MalformedMessage as exc:
        if not isinstance(exc.reason, str) or len(str(exc)) > MESSAGE_LIMIT:
            raise AssertionError(f"undocumented decode error: {exc!r}") from None
        return
    try:
        answer(kind, request)
    except ServiceError as exc:
        if exc.code not in DOCUMENTED or len(exc.message) > MESSAGE_LIMIT:
            raise AssertionError(f"undocumented error {exc.code}: {exc.message[:300]}") from None


def main() -> None:
    """Run the fuzzer with libFuzzer's command line."""
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
