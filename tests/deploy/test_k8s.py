"""The Kubernetes manifests: schema-valid offline (kubernetes-validate, strict), and consistent with
the server (ports, settings, metric names), the Dockerfile (user) and each other (selectors,
names). The KServe InferenceService is a custom resource without a bundled schema: its container is
validated as a core Container and its KServe fields are checked here."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fineserve.server.app import LIVENESS_SERVICE
from fineserve.server.config import ENV_PREFIX, Settings, load_settings
from fineserve.server.metrics import Metrics
from tests.deploy.dockerfile import parse

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"  # probes' grpc and preStop sleep need 1.30+
GRPC_PORT = Settings.model_fields["grpc_port"].default
METRICS_PORT = Settings.model_fields["metrics_port"].default


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
RESOURCES = [doc for name in KUSTOMIZATION["resources"] for doc in _documents(K8S / name)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in RESOURCES if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


DEPLOYMENT = _one("Deployment")
POD = DEPLOYMENT["spec"]["template"]
[CONTAINER] = POD["spec"]["containers"]


def test_kustomization_lists_every_manifest_of_the_folder() -> None:
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(KUSTOMIZATION["resources"]) == manifests


@pytest.mark.parametrize("doc", RESOURCES, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_against_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_schema_validation_rejects_a_misspelled_field() -> None:
    broken = copy.deepcopy(DEPLOYMENT)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _probe_ports(container: dict[str, Any]) -> dict[str, int]:
    probes = {k: v for k, v in container.items() if k.endswith("Probe")}
    assert all(set(p) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"} for p in probes.values()), probes
    return {kind: probe["grpc"]["port"] for kind, probe in probes.items()}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def _check_settings_env(env: dict[str, str]) -> None:
    for name in env:
        if name.startswith(ENV_PREFIX):
            assert name.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, f"{name} is no setting"


def _check_gpu_resources(container: dict[str, Any]) -> None:
    resources = container["resources"]
    # Extended resources cannot be overcommitted: request and limit must be equal.
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]


def test_deployment_probes_the_grpc_health_service_on_the_grpc_port() -> None:
    ports = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert _probe_ports(CONTAINER) == {
        "startupProbe": GRPC_PORT,
        "readinessProbe": GRPC_PORT,
        "livenessProbe": GRPC_PORT,
    }
    env = _env(CONTAINER)
    assert int(env["FINESERVE_GRPC_PORT"]) == GRPC_PORT and int(env["FINESERVE_METRICS_PORT"]) == METRICS_PORT


def test_liveness_probes_ask_the_liveness_service_and_readiness_the_whole_server() -> None:
    [kserve] = _documents(ROOT / "deploy" / "kserve" / "inferenceservice.yaml")
    for container in (CONTAINER, kserve["spec"]["predictor"]["containers"][0]):
        # A restart must not follow readiness: that is what the server's liveness service is for.
        assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
        if "startupProbe" in container:  # nor may a pod whose models all failed be killed at startup
            assert container["startupProbe"]["grpc"]["service"] == LIVENESS_SERVICE
        assert container["readinessProbe"]["grpc"].get("service", "") == ""


def test_deployment_settings_requests_and_security() -> None:
    env = _env(CONTAINER)
    _check_settings_env(env)
    load_settings(**{k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items()})  # valid together
    _check_gpu_resources(CONTAINER)
    # The pod runs as the image's user; the server only reads the models.
    user = parse(ROOT / "Dockerfile").stage("serve").all("USER")[-1].args.split(":")[0]
    security = POD["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and str(security["runAsUser"]) == user
    models = next(m for m in CONTAINER["volumeMounts"] if m["mountPath"] == env["FINESERVE_MODEL_REPOSITORY"])
    assert models["readOnly"] is True
    volume = next(v for v in POD["spec"]["volumes"] if v["name"] == models["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == _one("PersistentVolumeClaim")["metadata"]["name"]
    # On SIGTERM the server drains for shutdown_grace_s: the pod must be given longer.
    grace = float(env["FINESERVE_SHUTDOWN_GRACE_S"]) + CONTAINER["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert POD["spec"]["terminationGracePeriodSeconds"] > grace


def _selects_pods(selector: dict[str, str]) -> bool:
    labels: dict[str, str] = POD["metadata"]["labels"]
    return selector.items() <= labels.items()


def test_services_reach_the_pods_on_named_ports() -> None:
    named = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    service = _one("Service", "fineserve")
    assert _selects_pods(service["spec"]["selector"])
    assert {p["port"]: named[p["targetPort"]] for p in service["spec"]["ports"]} == {
        GRPC_PORT: GRPC_PORT,
        METRICS_PORT: METRICS_PORT,
    }
    headless = _one("Service", "fineserve-headless")
    assert headless["spec"]["clusterIP"] == "None" and _selects_pods(headless["spec"]["selector"])
    assert [named[p["targetPort"]] for p in headless["spec"]["ports"]] == [GRPC_PORT]


def test_hpa_scales_the_deployment_on_a_metric_the_server_exports() -> None:
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "fineserve",
    }
    exported = {family.name for family in Metrics().registry.collect()}
    [metric] = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert metric["type"] == "Pods" and name in exported, (
        f"{name} is not exported; exported: {sorted(exported)}"
    )
    # prometheus-adapter must publish the same name from the same series.
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    [rule] = adapter["rules"]["custom"]
    assert rule["name"]["as"] == name and re.match(rf"{name}\{{", rule["seriesQuery"])
    assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
    # The disruption budget leaves a replica up even at the HPA's minimum.
    pdb = _one("PodDisruptionBudget")
    assert _selects_pods(pdb["spec"]["selector"]["matchLabels"])
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


def test_pod_monitor_scrapes_the_metrics_port() -> None:
    [monitor] = _documents(K8S / "monitoring" / "podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert _selects_pods(monitor["spec"]["selector"]["matchLabels"])
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_kserve_inference_service_serves_v2_grpc_from_the_storage_uri() -> None:
    [service] = _documents(ROOT / "deploy" / "kserve" / "inferenceservice.yaml")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    predictor = service["spec"]["predictor"]
    [container] = predictor["containers"]
    # Its container is a core Container: validate it as one inside a Pod.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [container]}}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    # One port, named h2c: Knative routes HTTP/2 (gRPC) to it.
    assert container["ports"] == [{"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}]
    assert set(_probe_ports(container).values()) == {GRPC_PORT}
    env = _env(container)
    _check_settings_env(env)
    assert env["FINESERVE_MODEL_REPOSITORY"] == "/mnt/models"  # where the storage initializer writes
    assert env["STORAGE_URI"].startswith(("pvc://", "s3://", "gs://", "https://"))
    _check_gpu_resources(container)
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(METRICS_PORT)
    assert predictor["scaleMetric"] == "concurrency" and predictor["minReplicas"] >= 1
