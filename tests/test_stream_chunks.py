"""The client's reading of EvaluateStream messages, and the server's heap setting.

``stream_message`` reads a binary chunk's three fields in place instead of
letting protobuf copy its numbers; every other message (the header, chunks
of doubles, anything unexpected) must still come out exactly as protobuf
parses it.
"""

from __future__ import annotations

import numpy as np
import pytest
from micrograd import codec
from micrograd import ops as _ops
from micrograd.client import Client
from micrograd.client.result import Chunk, StreamAssembly, stream_message
from micrograd.codec.wire import varint
from micrograd.server.config import Settings
from micrograd.server.heap import retain_freed_memory
from micrograd.server.service import GradientService
from micrograd.tape import Tape
from micrograd.v1 import gradient_service_pb2 as pb


def random_tape(seed: int, n: int) -> Tape:
    """A seeded ``n``-node graph of adds, muls and tanhs over random earlier nodes."""
    rng = np.random.default_rng(seed)
    names = ["add", "mul", "tanh"]
    code = np.array(
        [_ops.INPUT.code, _ops.CONST.code]
        + [_ops.BY_NAME[names[k]].code for k in rng.integers(0, 3, n - 2)],
        dtype=np.uint8,
    )
    i = np.arange(n)
    arg0 = np.where(i >= 2, (rng.random(n) * np.maximum(i, 1)).astype(np.int32), -1)
    arg1 = np.where(i >= 2, (rng.random(n) * np.maximum(i, 1)).astype(np.int32), -1)
    arg1[code == _ops.BY_NAME["tanh"].code] = -1
    const = np.zeros(n)
    const[0], const[1] = 0.3, 0.7
    return Tape.from_arrays(code, arg0.astype(np.int32), arg1.astype(np.int32), const, {"x": 0})


def _stream(tape: Tape, binary: bool, chunk_size: int) -> list[bytes]:
    service = GradientService(Settings(workers=1))
    request = pb.EvaluateStreamRequest(
        request=pb.EvaluateRequest(packed_graph=codec.pack(tape), binary_output=binary),
        chunk_size=chunk_size,
    )
    return [answer.data for answer in service.evaluate_stream_wire(request)]


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunks_read_in_place_equal_protobuf_parsing(seed: int, binary: bool) -> None:
    tape = random_tape(seed, 300)
    messages = _stream(tape, binary, 37 + seed)
    assembly = StreamAssembly(False, True)
    chunks = 0
    for data in messages:
        expected = pb.EvaluateStreamResponse.FromString(data)
        got = stream_message(data)
        if isinstance(got, Chunk):
            chunks += 1
            assert binary and got.part == expected.part and got.offset == expected.offset
            assert got.data.tobytes() == expected.data_f64
        else:
            assert got == expected
        assembly.add(got)
    assert chunks == (len(messages) - 1 if binary else 0)
    values, grads = tape.evaluate()
    result = assembly.result()
    assert result.values.tobytes() == values.tobytes()
    assert result.grads is not None and result.grads.tobytes() == grads.tobytes()


def test_odd_messages_are_left_to_protobuf() -> None:
    numbers = np.arange(3, dtype="<f8").tobytes()
    field5 = b"\x2a" + varint(len(numbers)) + numbers
    values = b"\x08" + varint(pb.PART_VALUES)
    unknown = values + field5 + b"\x30\x07"  # field 6, unknown to the reader
    for data in (
        unknown,
        b"\x08\x00" + field5,  # PART_UNSPECIFIED
        b"\x08" + varint(pb.PART_HEADER) + field5,
        values + b"\x18\x05",  # no numbers
        values + b"\x2a\x03abc",  # not whole float64s
    ):
        assert stream_message(data) == pb.EvaluateStreamResponse.FromString(data)
    wide = stream_message(b"\x08" + varint(pb.PART_GRADIENTS) + b"\x18" + varint(300) + field5)
    assert isinstance(wide, Chunk) and (wide.part, wide.offset) == (pb.PART_GRADIENTS, 300)
    assert wide.data.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError, as before
        stream_message(values + b"\x2a\x10abc")  # truncated


def test_a_big_graph_streams_back_bit_identical(grpc_server: str) -> None:
    tape = random_tape(5, 60_000)
    values, grads = tape.evaluate()
    with Client(grpc_server) as client:
        result = client.evaluate(tape, stream=True)
    assert result.values.tobytes() == values.tobytes()
    assert result.grads is not None and result.grads.tobytes() == grads.tobytes()
    assert result.values.flags.writeable


def test_the_heap_setting() -> None:
    assert Settings(retained_heap_bytes=0).retained_heap_bytes == 0
    with pytest.raises(ValueError, match="retained"):
        Settings(retained_heap_bytes=-1)
    assert retain_freed_memory(0) is False
    assert isinstance(retain_freed_memory(64 * 1024 * 1024), bool)
