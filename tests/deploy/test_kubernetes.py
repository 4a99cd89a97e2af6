"""Kubernetes manifests: schema-valid, and the objects agree with each other and the image."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.files import DOCKERFILE, KUBERNETES, kubernetes_manifests, load_yaml
from tests.deploy.tools import output, run

MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
# The oldest Kubernetes still commonly run, and the newest the validator knows.
VERSIONS = ["1.30.0", "latest"]


def _validate(path: Path, version: str) -> tuple[bool, str]:
    args = ["--strict", str(path)]
    if version != "latest":
        args = ["--kubernetes-version", version, *args]
    result = run("kubernetes-validate", *args)
    # An unknown apiVersion/kind is only a warning with exit 0: demand "passed" as well.
    ok = result.returncode == 0 and "passed" in result.stdout and "WARN" not in result.stdout
    return ok, output(result)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    ok, report = _validate(path, version)
    assert ok, report


def test_validator_rejects_a_broken_deployment(tmp_path: Path) -> None:
    broken = tmp_path / "deployment.yaml"
    text = (KUBERNETES / "deployment.yaml").read_text()
    broken.write_text(text.replace("containerPort: 8080", "containerPort: eighty"))
    assert not _validate(broken, "latest")[0]


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    resources = load_yaml(KUBERNETES / "kustomization.yaml")["resources"]
    expected = [p.name for p in MANIFESTS if p.name != "secret.example.yaml"]
    assert sorted(resources) == sorted(expected)
    assert "namespace" not in load_yaml(KUBERNETES / "kustomization.yaml")
    for objects in kubernetes_manifests().values():
        assert "namespace" not in objects["metadata"]


def _pod() -> dict[str, Any]:
    pod: dict[str, Any] = kubernetes_manifests()["Deployment"]["spec"]["template"]
    return pod


def _container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = _pod()["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _container_port(port: int | str) -> int:
    """A port number, or the number behind a named container port."""
    for declared in _container()["ports"]:
        if port in (declared["containerPort"], declared.get("name")):
            number: int = declared["containerPort"]
            return number
    raise AssertionError(f"port {port!r} is not a container port")


def _arg(flag: str) -> str:
    args = _container()["args"]
    return str(args[args.index(flag) + 1])


def test_deployment_serves_on_the_container_port_with_several_replicas() -> None:
    deployment = kubernetes_manifests()["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    assert _container()["args"][0] == "serve"
    assert _container_port(int(_arg("--port"))) == 8080
    assert _arg("--host") == "0.0.0.0"


def test_probes_hit_readyz_and_healthz_on_the_container_port() -> None:
    readiness = _container()["readinessProbe"]["httpGet"]
    liveness = _container()["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz" and liveness["path"] == "/healthz"
    assert _container_port(readiness["port"]) == _container_port(liveness["port"]) == 8080


def test_selectors_match_the_pod_labels() -> None:
    objects = kubernetes_manifests()
    labels = _pod()["metadata"]["labels"]
    selectors = {
        "Deployment": objects["Deployment"]["spec"]["selector"]["matchLabels"],
        "Service": objects["Service"]["spec"]["selector"],
        "PodDisruptionBudget": objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and selector.items() <= labels.items(), f"{kind} selects no pod"


def test_service_targets_the_container_port() -> None:
    (port,) = kubernetes_manifests()["Service"]["spec"]["ports"]
    assert _container_port(port["targetPort"]) == 8080


def test_autoscaler_and_disruption_budget_keep_at_least_two_pods() -> None:
    objects = kubernetes_manifests()
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment"
    assert target["name"] == objects["Deployment"]["metadata"]["name"]
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # CPU utilisation is relative to requests: without them the HPA cannot act.
    assert _container()["resources"]["requests"]["cpu"]
    pdb = objects["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1


def test_pods_read_the_configmap_and_secret() -> None:
    objects = kubernetes_manifests()
    refs = {kind: ref["name"] for source in _container()["envFrom"] for kind, ref in source.items()}
    assert refs == {
        "configMapRef": objects["ConfigMap"]["metadata"]["name"],
        "secretRef": objects["Secret"]["metadata"]["name"],
    }


def test_pod_runs_non_root_with_a_read_only_root_filesystem() -> None:
    security = _pod()["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    image_user = re.search(r"^USER (\d+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert image_user and security["runAsUser"] == int(image_user.group(1))
    container_security = _container()["securityContext"]
    assert container_security["readOnlyRootFilesystem"] is True
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["capabilities"]["drop"] == ["ALL"]


def test_every_writable_path_is_an_empty_dir() -> None:
    volumes = {v["name"]: v for v in _pod()["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in _container()["volumeMounts"]}
    multiproc = re.search(r"PROMETHEUS_MULTIPROC_DIR=(\S+)", DOCKERFILE.read_text())
    assert multiproc
    spool = kubernetes_manifests()["ConfigMap"]["data"]["TOLLGATE_SPOOL_DIR"]
    for path in ("/tmp", multiproc.group(1), spool):
        assert "emptyDir" in mounts[path], f"{path} is not writable"


def test_termination_grace_outlasts_the_stream_drain() -> None:
    spec = _pod()["spec"]
    assert spec["terminationGracePeriodSeconds"] == 200
    drain_s = float(kubernetes_manifests()["ConfigMap"]["data"]["TOLLGATE_SHUTDOWN_TIMEOUT"])
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert drain_s >= 180, "streams may last the 180 s upstream limit"
    assert float(pre_stop[1]) + drain_s < spec["terminationGracePeriodSeconds"]


def test_pods_are_annotated_for_prometheus_scraping() -> None:
    annotations = _pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert _container_port(int(annotations["prometheus.io/port"])) == 8080
