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


def _seed_like(rng: np.random.Generator) -> tuple[pb.EvaluateRequest, list[Value], Value]:
    """A random small graph of a few ops, its two inputs named, as an Evaluate request."""
    a, b = Value(float(rng.normal())), Value(float(rng.normal()))
    y = a * b + b.tanh() * a + (a * a + 1.5).log()
    request = pb.EvaluateRequest(
        packed_graph=codec.pack_value(y, {"a": a, "b": b})[0], binary_output=True
    )
    return request, [a, b], y


def test_small_calls_with_a_deadline_match_the_reference_kernel_bit_for_bit() -> None:
    from micrograd.kernels import PythonKernel
    from micrograd.server.service import Deadline

    rng = np.random.default_rng(14)
    service = GradientService(Settings(workers=1))
    for _ in range(20):
        request, _, y = _seed_like(rng)
        request.inputs["a"] = float(rng.normal())
        tape = codec.encode_value(y, None)[1]
        got = pb.EvaluateResponse.FromString(service.evaluate_wire(request, Deadline(30)).data)
        plan = service.plan(request)
        values = tape.leaf_values(plan.bindings)
        PythonKernel().forward(tape, values)
        grads = np.zeros_like(values)
        PythonKernel().backward(tape, values, grads, plan.output)
        np.testing.assert_array_equal(codec.f64_array(got.values_f64), values)
        np.testing.assert_array_equal(codec.f64_array(got.grads_f64), grads)


def test_small_calls_still_honour_an_expired_or_cancelled_deadline() -> None:
    import pytest
    from micrograd.server.service import Code, Deadline, ServiceError

    request = _seed_like(np.random.default_rng(1))[0]
    service = GradientService(Settings(workers=1))
    with pytest.raises(ServiceError) as expired:
        service.evaluate_wire(request, Deadline(0.0))
    assert expired.value.code is Code.DEADLINE_EXCEEDED
    cancelled = Deadline(30)
    cancelled.cancel()
    assert cancelled.flag[0] == 1
    with pytest.raises(ServiceError) as stopped:
        service.evaluate_wire(request, cancelled)
    assert stopped.value.code is Code.CANCELLED
