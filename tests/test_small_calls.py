"""Repeated small calls reuse their serialized response header; it must never go stale."""

from __future__ import annotations

import numpy as np
from micrograd import codec
from micrograd.engine import Value
from micrograd.server.config import Settings
from micrograd.server.service import GradientService
from micrograd.v1 import gradient_service_pb2 as pb


def test_cached_headers_follow_output_selection_rows_and_names() -> None:
    a, b = Value(2.0), Value(-3.0)
    g = (a * b + b).tanh()
    service = GradientService(Settings(workers=1))
    for names in ({"a": a, "b": b}, {"a": a}, {"x": b}):
        packed, tape = codec.pack_value(g, names)[0], codec.encode_value(g, names)[1]
        requests = [
            pb.EvaluateRequest(packed_graph=packed),
            pb.EvaluateRequest(packed_graph=packed, output=2),
            pb.EvaluateRequest(packed_graph=packed, selection=pb.SELECTION_INPUTS),
            pb.EvaluateRequest(packed_graph=packed, nodes=[3, 0, 3]),
            pb.EvaluateRequest(packed_graph=packed, batch=pb.Batch(values=[1.0, 2.0, 3.0, 4.0])),
        ]
        for request in requests * 2:  # the second round answers from the cache
            got = service.evaluate(request)
            plan = service.plan(request)
            assert got.output == plan.output and got.rows == plan.rows
            assert list(got.nodes) == ([] if plan.selection is None else plan.selection.tolist())
            assert dict(got.names) == dict(service.header(plan).names)
            values = tape.forward(codec.bindings(tape, request))
            expected = values if values.ndim == 1 else values.reshape(plan.rows, -1)
            if plan.selection is not None:
                expected = expected[..., plan.selection]
            np.testing.assert_array_equal(np.asarray(got.values).reshape(expected.shape), expected)
