"""docker-compose: valid Compose, 2 Tollgate replicas behind nginx, Redis with AOF,
Prometheus and Grafana wired to the files in this repository."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.deploy.files import COMPOSE, DEPLOY, GRAFANA, load_yaml
from tests.deploy.tools import output, run


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def _service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = _compose()["services"][name]
    return service


def _bind_mounts(service: str) -> dict[Path, str]:
    """Host path (resolved from deploy/) -> container path, for the service's bind mounts."""
    mounts = {}
    for volume in _service(service).get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[(DEPLOY / source).resolve()] = target
    return mounts


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, f"unexpected duration {duration!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_compose_file_matches_the_compose_spec() -> None:
    result = run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, output(result)


def test_compose_schema_check_rejects_an_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  tollgate:\n    imag: tollgate\n    ports: 8080\n")
    result = run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(bad))
    assert result.returncode != 0, output(result)


def test_every_bind_mount_and_build_file_exists() -> None:
    for name in _compose()["services"]:
        for source in _bind_mounts(name):
            assert source.exists(), f"{name} mounts {source}, which does not exist"
    build = _service("tollgate")["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert (context / "pyproject.toml").exists(), "build context must be the repository root"
    assert (context / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()


def test_named_volumes_are_declared() -> None:
    declared = set(_compose().get("volumes") or {})
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_tollgate_runs_two_replicas_with_the_serve_command() -> None:
    tollgate = _service("tollgate")
    assert tollgate["deploy"]["replicas"] >= 2
    assert tollgate["command"] == ["serve", "--host", "0.0.0.0", "--port", "8080", "--workers", "2"]
    # Only the nginx front publishes a port; replicas are reached through it.
    assert "ports" not in tollgate and "container_name" not in tollgate
    # Long streams get to finish: TOLLGATE_SHUTDOWN_TIMEOUT defaults to 185 s.
    assert _seconds(tollgate["stop_grace_period"]) > 185


def test_tollgate_uses_the_compose_redis() -> None:
    url = _service("tollgate")["environment"]["TOLLGATE_REDIS_URL"]
    assert re.fullmatch(r"redis://redis:6379(/\d+)?", url)
    assert _service("tollgate")["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_7_persists_with_aof_on_a_volume() -> None:
    redis = _service("redis")
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert any(v.endswith(":/data") and not v.startswith(".") for v in redis["volumes"])
    assert "healthcheck" in redis


def test_nginx_fronts_the_tollgate_replicas_with_streaming_settings() -> None:
    nginx = _service("nginx")
    assert nginx["ports"] == ["8080:8080"]
    (conf,) = [source for source in _bind_mounts("nginx") if source.suffix == ".conf"]
    text = conf.read_text()
    assert re.search(r"server\s+tollgate:8080\b", text), "upstream must be the tollgate service"
    assert "proxy_pass http://tollgate;" in text
    assert re.search(r"listen\s+8080;", text)
    assert re.search(r"proxy_buffering\s+off;", text), "SSE must not be buffered"
    (timeout,) = re.findall(r"proxy_read_timeout\s+(\w+);", text)
    assert _seconds(timeout) > 180, "upstream streams may last 180 s"


def test_prometheus_mounts_its_config_and_every_rule_file() -> None:
    mounts = _bind_mounts("prometheus")
    config_path = DEPLOY / "prometheus" / "prometheus.yml"
    assert mounts[config_path.resolve()] == "/etc/prometheus/prometheus.yml"
    config = load_yaml(config_path)
    for rule_file in config["rule_files"]:
        host = (config_path.parent / rule_file).resolve()
        assert mounts.get(host) == f"/etc/prometheus/{rule_file}", f"{rule_file} is not mounted"


def test_prometheus_scrapes_each_tollgate_replica_directly() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "tollgate"]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["tollgate"] and discovery["port"] == 8080
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_mounts_the_provisioning_and_the_dashboards_it_points_at() -> None:
    mounts = _bind_mounts("grafana")
    assert mounts[(GRAFANA / "provisioning").resolve()] == "/etc/grafana/provisioning"
    dashboards_target = mounts[(GRAFANA / "dashboards").resolve()]
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "tollgate.yml")
    assert [p["options"]["path"] for p in provider["providers"]] == [dashboards_target]
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    assert [d["url"] for d in datasources["datasources"]] == ["http://prometheus:9090"]
    assert "prometheus" in _compose()["services"]
