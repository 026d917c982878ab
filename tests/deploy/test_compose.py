"""The compose stack, read: services build real Dockerfile targets, publish the server's ports,
and mount files of this repository; Prometheus loads the alert rules and scrapes fineserve;
Grafana gets the data source and the dashboard. The dashboard and the alert rules are written by
the observability work at two fixed paths: the wiring to those paths is checked whether or not
the files are there yet, and their contents once they are."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from fineserve.server.config import Settings
from tests.deploy.dockerfile import parse
from tests.tools import binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
FINESERVE = {"fineserve-gpu": "serve", "fineserve-cpu": "serve-cpu"}  # service -> Dockerfile target
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fineserve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
GRPC_PORT = Settings.model_fields["grpc_port"].default
METRICS_PORT = Settings.model_fields["metrics_port"].default


def _mounts(service: str) -> dict[str, Path]:
    """Container path -> host path (resolved from deploy/, as compose does) of bind mounts."""
    out = {}
    for volume in SERVICES[service]["volumes"]:
        host, container = volume.split(":")[:2]
        out[container] = (DEPLOY / host).resolve()
    return out


def _host_path(service: str, container_path: str) -> Path:
    """Where a file the container reads comes from on the host, through the bind mounts."""
    wanted = PurePosixPath(container_path)
    for inside, outside in _mounts(service).items():
        if wanted == PurePosixPath(inside) or wanted.is_relative_to(inside):
            return outside / wanted.relative_to(inside)
    raise AssertionError(f"{service}: nothing mounted at {container_path}")


def _published(service: str) -> dict[int, int]:
    return {int(p.split(":")[1]): int(p.split(":")[0]) for p in SERVICES[service]["ports"]}


@pytest.mark.parametrize(("service", "target"), FINESERVE.items())
def test_fineserve_services_build_dockerfile_targets_and_publish_the_servers_ports(
    service: str, target: str
) -> None:
    build = SERVICES[service]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert target in {stage.name for stage in parse(ROOT / "Dockerfile").stages}
    assert build["target"] == target
    assert _published(service) == {GRPC_PORT: GRPC_PORT, METRICS_PORT: METRICS_PORT}
    # The README's `make models` writes ./models; the image serves /models.
    assert _mounts(service) == {"/models": ROOT / "models"}
    assert SERVICES[service]["volumes"][0].endswith(":ro")
    assert SERVICES[service]["networks"]["default"]["aliases"] == ["fineserve"]


def test_one_fineserve_variant_per_profile_and_the_gpu_one_reserves_a_gpu() -> None:
    assert {s: SERVICES[s]["profiles"] for s in FINESERVE} == {
        "fineserve-gpu": ["gpu"],
        "fineserve-cpu": ["cpu"],
    }
    [device] = SERVICES["fineserve-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in SERVICES["fineserve-cpu"]


def test_bind_mounts_are_files_of_this_repository() -> None:
    for service in ("prometheus", "grafana"):
        for host in _mounts(service).values():
            assert host.is_relative_to(DEPLOY) and host.is_dir(), host


def test_prometheus_scrapes_fineserve_and_loads_the_alert_rules() -> None:
    command = SERVICES["prometheus"]["command"]
    [config_flag] = [c for c in command if c.startswith("--config.file=")]
    config_path = _host_path("prometheus", config_flag.split("=", 1)[1])
    assert config_path == DEPLOY / "prometheus" / "prometheus.yml" and config_path.is_file()
    config = yaml.safe_load(config_path.read_text())
    assert [_host_path("prometheus", f) for f in config["rule_files"]] == [ALERTS]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "fineserve"]
    assert job["static_configs"][0]["targets"] == [f"fineserve:{METRICS_PORT}"]
    assert _published("prometheus") == {9090: 9090}


def test_alert_rules_are_prometheus_rule_groups() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    assert rules["groups"] and all(group["rules"] for group in rules["groups"])
    for rule in (r for group in rules["groups"] for r in group["rules"]):
        assert ("alert" in rule or "record" in rule) and rule["expr"]


def _grafana_provisioning(kind: str) -> list[dict[str, Any]]:
    folder = _host_path("grafana", "/etc/grafana/provisioning") / kind
    return [yaml.safe_load(p.read_text()) for p in sorted(folder.glob("*.yml"))]


def test_grafana_gets_the_prometheus_data_source_and_the_dashboard_folder() -> None:
    [datasources] = _grafana_provisioning("datasources")
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    [dashboards] = _grafana_provisioning("dashboards")
    [provider] = dashboards["providers"]
    assert _host_path("grafana", provider["options"]["path"]) == DASHBOARD.parent
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path("grafana", home) == DASHBOARD


def test_dashboard_uses_the_provisioned_data_source() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    [source] = _grafana_provisioning("datasources")[0]["datasources"]
    variables = {
        v["name"] for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "datasource"
    }

    def references(node: Any) -> list[Any]:
        if isinstance(node, dict):
            found = [node["datasource"]] if "datasource" in node else []
            return found + [r for value in node.values() for r in references(value)]
        if isinstance(node, list):
            return [r for value in node for r in references(value)]
        return []

    for reference in references(dashboard.get("panels", [])):
        uid = reference.get("uid") if isinstance(reference, dict) else reference
        if uid is None or (isinstance(reference, dict) and reference.get("type") not in (None, "prometheus")):
            continue
        assert uid in (source["uid"], source["name"]) or uid.strip("${}") in variables, (
            f"dashboard data source {uid!r} is neither the provisioned one ({source['uid']}) nor a variable"
        )


def test_prometheus_config_passes_promtool_with_the_mounts_resolved(tmp_path: Path) -> None:
    """promtool checks the config and the rule files it loads, read where compose mounts them."""
    promtool = binary("promtool")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(_host_path("prometheus", f)) for f in config["rule_files"]]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr
