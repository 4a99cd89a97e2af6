"""Every deployment file parses, and every TOLLGATE_* setting they pass is one Tollgate reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.files import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    ENV_EXAMPLE,
    GRAFANA,
    env_file,
    kubernetes_manifests,
    load_yaml,
)

DATA_FILES = sorted(
    path
    for root in (DEPLOY, GRAFANA)
    for path in root.rglob("*")
    if path.suffix in {".yml", ".yaml", ".json"}
)
_INTERPOLATION = re.compile(r"\$\{(\w+)")


def test_data_files_are_found() -> None:
    names = {path.relative_to(DEPLOY.parent).as_posix() for path in DATA_FILES}
    assert {
        "deploy/docker-compose.yml",
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/alerts_test.yml",
        "deploy/kubernetes/kustomization.yaml",
        "grafana/dashboards/tollgate.json",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/tollgate.yml",
    } <= names


@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: p.relative_to(DEPLOY.parent).as_posix())
def test_data_file_parses(path: Path) -> None:
    text = path.read_text()
    documents = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
    assert documents, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in documents), f"{path}: a document is not a mapping"


def _dockerfile_env() -> dict[str, str]:
    values: dict[str, str] = {}
    for name, value in re.findall(r"\b(TOLLGATE_\w+|PROMETHEUS_\w+)=(\S+)", DOCKERFILE.read_text()):
        values[name] = value
    return values


def _compose_tollgate_env() -> dict[str, str]:
    environment = load_yaml(COMPOSE)["services"]["tollgate"]["environment"]
    assert isinstance(environment, dict), "use the mapping form for environment"
    return {name: str(value) for name, value in environment.items()}


def _settings_by_source() -> dict[str, set[str]]:
    objects = kubernetes_manifests()
    return {
        "Dockerfile": set(_dockerfile_env()),
        "docker-compose.yml": set(_compose_tollgate_env()),
        ".env.example": set(env_file(ENV_EXAMPLE)),
        "ConfigMap": set(objects["ConfigMap"]["data"]),
        "Secret": set(objects["Secret"]["stringData"]),
    }


def test_every_tollgate_setting_passed_is_one_tollgate_reads() -> None:
    from proxy.config import ENV_VARIABLES

    for source, names in _settings_by_source().items():
        unknown = {name for name in names if name.startswith("TOLLGATE_")} - set(ENV_VARIABLES)
        assert not unknown, f"{source} sets variables Tollgate does not read: {sorted(unknown)}"


def test_upstream_url_is_set_for_compose_and_kubernetes() -> None:
    assert _compose_tollgate_env()["TOLLGATE_UPSTREAM_URL"]
    assert env_file(ENV_EXAMPLE)["TOLLGATE_UPSTREAM_URL"].startswith("https://")
    assert kubernetes_manifests()["ConfigMap"]["data"]["TOLLGATE_UPSTREAM_URL"].startswith("https")


def test_env_example_defines_every_variable_compose_interpolates() -> None:
    interpolated = set(_INTERPOLATION.findall(COMPOSE.read_text()))
    assert "TOLLGATE_UPSTREAM_URL" in interpolated
    missing = interpolated - set(env_file(ENV_EXAMPLE))
    assert not missing, f"docker-compose.yml uses ${{...}} not in .env.example: {sorted(missing)}"


def test_secrets_are_in_the_secret_and_not_in_the_configmap() -> None:
    secret_names = {"TOLLGATE_ADMIN_TOKEN", "TOLLGATE_UPSTREAM_API_KEY", "TOLLGATE_REDIS_URL"}
    objects = kubernetes_manifests()
    assert set(objects["Secret"]["stringData"]) == secret_names
    assert not secret_names & set(objects["ConfigMap"]["data"])


def test_spool_dir_is_the_same_in_image_and_kubernetes() -> None:
    configured = kubernetes_manifests()["ConfigMap"]["data"]["TOLLGATE_SPOOL_DIR"]
    assert configured == _dockerfile_env()["TOLLGATE_SPOOL_DIR"]
