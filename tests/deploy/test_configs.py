"""Static checks of deploy/: compose (compose-spec schema), Prometheus (promtool), Grafana
provisioning and dashboards, Kubernetes manifests (kubernetes-validate, strict).

The ServiceMonitor is a Prometheus Operator CRD, which kubernetes-validate has no schema for
(it only warns); it is validated against tests/deploy/schemas/servicemonitor-v1.json, the
fields we use taken from the CRD's own schema.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy import dashboard_metrics as dm
from tests.deploy.dashboards import DASHBOARD_DIR, dashboards, queries
from tests.deploy.tools import ROOT, tool

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_CORE = ["deployment.yaml", "service.yaml", "hpa.yaml"]
SCHEMAS = Path(__file__).parent / "schemas"


def run(*cmd: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` and fail with its output if it exits non-zero."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}{result.stderr}"
    return result


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_compose_matches_compose_spec() -> None:
    run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
        str(DEPLOY / "compose.yaml"))  # fmt: skip


def test_compose_mounts_exist_and_wire_up() -> None:
    """Bind-mounted files exist; Prometheus scrapes the server's alias; Grafana reads it."""
    compose = load(DEPLOY / "compose.yaml")
    services = compose["services"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"missing mount source {source}"
    assert services["tokenzip-cpu"]["networks"]["default"]["aliases"] == ["tokenzip"]
    targets = load(DEPLOY / "prometheus" / "prometheus.yaml")["scrape_configs"][0]
    assert targets["static_configs"][0]["targets"] == ["tokenzip:8000"]
    source = load(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    provider = load(DEPLOY / "grafana/provisioning/dashboards/tokenzip.yaml")["providers"][0]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in \
        services["grafana"]["volumes"]  # fmt: skip


def test_prometheus_config_valid() -> None:
    run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yaml"))


def test_dashboards_generated_from_script(tmp_path: Path) -> None:
    """The committed JSON is what scripts/make_dashboards.py writes."""
    script = ROOT / "scripts" / "make_dashboards.py"
    spec = importlib.util.spec_from_file_location("make_dashboards", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for path in module.write(tmp_path):
        assert path.read_text() == (DASHBOARD_DIR / path.name).read_text(), \
            f"{path.name} is stale: run scripts/make_dashboards.py"  # fmt: skip


def test_dashboards_shape() -> None:
    """Two dashboards; every panel on the DS_PROMETHEUS datasource with unique ids."""
    boards = dashboards()
    assert sorted(boards) == ["latency.json", "tokenzip.json"]
    for board in boards.values():
        variables = {v["name"] for v in board["templating"]["list"]}
        assert variables == {"DS_PROMETHEUS", "model_name"}
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert panel["targets"], panel["title"]


def test_dashboard_metric_names_listed_once() -> None:
    """The dashboards read exactly the names in dashboard_metrics.py, no more, no fewer."""
    used = set().union(*(dm.names_in(q.expr) for q in queries()))
    assert used == dm.ALL, {"unlisted": used - dm.ALL, "unused": dm.ALL - used}
    assert len(dm.ALL) == len(dm.VLLM) + len(dm.TOKENZIP) + len(dm.PENDING), "listed twice"


@pytest.mark.parametrize("name", K8S_CORE)
def test_k8s_manifest_valid(name: str) -> None:
    result = run(tool("kubernetes-validate"), "--strict", str(K8S / name))
    assert "passed" in result.stdout + result.stderr


def test_servicemonitor_valid() -> None:
    run(tool("check-jsonschema"), "--schemafile", str(SCHEMAS / "servicemonitor-v1.json"),
        str(K8S / "servicemonitor.yaml"))  # fmt: skip


def test_k8s_wiring() -> None:
    """Service selects the pods, ServiceMonitor the Service's port, HPA the adapter's metric."""
    deployment, service, monitor, hpa = (load(K8S / f) for f in
                                         ["deployment.yaml", "service.yaml",
                                          "servicemonitor.yaml", "hpa.yaml"])  # fmt: skip
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]

    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] != "serve", "the image's entry point already runs vllm serve"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}

    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    rule = load(K8S / "prometheus-adapter-values.yaml")["rules"]["custom"][0]
    assert rule["seriesQuery"].startswith("vllm:num_requests_waiting{")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    kustomization = load(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted([*K8S_CORE, "servicemonitor.yaml"])
