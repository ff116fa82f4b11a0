"""The Kubernetes manifests in deploy/kubernetes/: valid for Kubernetes 1.32, and production-shaped.

``kubernetes-validate --strict`` checks every manifest offline against the
bundled 1.32 schemas (an unknown or misspelt field fails, as a mutated copy
proves). The rest reads the manifests: probes, resources, the security
context, graceful termination longer than the server's grace period, both
Services, the autoscaler, the disruption budget, Redis, and the TLS and
token secrets wired into the server.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from micrograd.server.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
VALIDATE = shutil.which("kubernetes-validate") or str(
    Path(sys.executable).with_name("kubernetes-validate")
)
needs_validator = pytest.mark.skipif(
    not Path(VALIDATE).exists(), reason="kubernetes-validate is not installed (test extra)"
)


def resource_files() -> list[Path]:
    """Every manifest kustomization.yaml lists, in its order."""
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return [MANIFESTS / name for name in kustomization["resources"]]


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource of the manifests by (kind, name)."""
    found = {}
    for path in resource_files():
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def validate(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    """Run ``kubernetes-validate --strict`` for Kubernetes 1.32 on ``paths``."""
    command = [VALIDATE, "--strict", "--kubernetes-version", "1.32.0", *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_every_manifest_file_is_listed_in_the_kustomization() -> None:
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == {p.name for p in resource_files()}


@needs_validator
def test_manifests_validate_strictly_against_kubernetes_1_32() -> None:
    done = validate(resource_files())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(resources())


@needs_validator
def test_the_validator_rejects_a_misspelt_field(tmp_path: Path) -> None:
    broken = tmp_path / "deployment.yaml"
    text = (MANIFESTS / "deployment.yaml").read_text()
    broken.write_text(text.replace("readinessProbe:", "readynessProbe:", 1))
    done = validate([broken])
    assert done.returncode != 0 and "readynessProbe" in done.stdout + done.stderr


def test_the_deployment_is_production_shaped() -> None:
    found = resources()
    deployment = found[("Deployment", "micrograd-rpc")]
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    defaults = Settings(workers=1)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": defaults.port, "http": defaults.http_port}
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("requests", "limits"):
        assert set(server["resources"][kind]) == {"cpu", "memory"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    pause = float(server["lifecycle"]["preStop"]["exec"]["command"][-1])
    settings = found[("ConfigMap", "micrograd-rpc")]["data"]
    grace = float(settings.get(f"{ENV_PREFIX}GRACE_PERIOD", defaults.grace_period))
    assert pod["terminationGracePeriodSeconds"] > pause + grace
    for variable in settings:
        assert variable.startswith(ENV_PREFIX)
        assert variable.removeprefix(ENV_PREFIX).lower() in Settings.__dataclass_fields__, (
            f"configmap.yaml sets {variable}, which is no server setting"
        )
    assert settings[f"{ENV_PREFIX}GRAPH_STORE"].startswith("redis://micrograd-rpc-redis:6379/")


def test_tls_and_token_secrets_are_wired_into_the_server() -> None:
    found = resources()
    pod = found[("Deployment", "micrograd-rpc")]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    settings = found[("ConfigMap", "micrograd-rpc")]["data"]
    assert secrets == {"tls": "micrograd-rpc-tls", "token": "micrograd-rpc-token"}
    assert settings[f"{ENV_PREFIX}TLS_CERT"] == f"{mounts['tls']}/tls.crt"
    assert settings[f"{ENV_PREFIX}TLS_KEY"] == f"{mounts['tls']}/tls.key"
    assert settings[f"{ENV_PREFIX}AUTH_TOKEN_FILE"].startswith(mounts["token"] + "/")
    assert server["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_services_autoscaler_budget_and_redis() -> None:
    found = resources()
    selector = found[("Deployment", "micrograd-rpc")]["spec"]["selector"]["matchLabels"]
    headless = found[("Service", "micrograd-rpc-headless")]["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"] == selector
    cluster_ip = found[("Service", "micrograd-rpc")]["spec"]
    assert cluster_ip.get("type", "ClusterIP") == "ClusterIP" and cluster_ip["selector"] == selector
    hpa = found[("HorizontalPodAutoscaler", "micrograd-rpc")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "micrograd-rpc" and hpa["minReplicas"] >= 2
    assert found[("PodDisruptionBudget", "micrograd-rpc")]["spec"]["selector"]["matchLabels"] == (
        selector
    )
    redis = found[("Deployment", "micrograd-rpc-redis")]["spec"]["template"]["spec"]
    assert "allkeys-lru" in redis["containers"][0]["args"]
    assert ("Service", "micrograd-rpc-redis") in found
