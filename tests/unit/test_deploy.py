"""The compose stack, Dockerfile, Prometheus config and Grafana dashboard, checked statically
(no Docker engine here): pinned images, real settings, consistent ports and volumes, and
dashboard queries that name metrics the workers really export."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from streamtune.core.settings import REPO_ROOT, Settings
from streamtune.ops.telemetry import ScorerMetrics, TrainerMetrics

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (REPO_ROOT / "deploy/docker/Dockerfile").read_text()
METRICS_PORT = 9108


def services() -> dict[str, dict[str, Any]]:
    return dict(COMPOSE["services"])


def test_every_image_is_pinned() -> None:
    for name, svc in services().items():
        if "build" in svc:
            continue  # built from this repository
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image} is not pinned"
        assert re.search(r":v?\d+\.\d+\.\d+", image), f"{name}: {image} needs a full version tag"
    base = re.search(r"^FROM (\S+)", DOCKERFILE, re.M)
    assert base and re.search(r":\d+\.\d+\.\d+", base.group(1))


def test_every_streamtune_variable_is_a_real_setting() -> None:
    fields = {f"STREAMTUNE_{n.upper()}" for n, _ in Settings.flat_fields()}
    text = (REPO_ROOT / "docker-compose.yml").read_text() + DOCKERFILE
    used = set(re.findall(r"STREAMTUNE_[A-Z0-9_]+", text))
    assert used, "no settings found"
    assert used <= fields, f"not settings: {sorted(used - fields)}"
    for svc in services().values():
        env = svc.get("environment", {})
        if isinstance(env, dict):
            Settings(
                **{
                    k.removeprefix("STREAMTUNE_").lower(): v
                    for k, v in env.items()
                    if k.startswith("STREAMTUNE_")
                }
            )


def test_ports_bind_localhost_and_metrics_ports_agree() -> None:
    for name, svc in services().items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} must bind to localhost"
    for name in ("scorer", "trainer"):
        assert services()[name]["environment"]["STREAMTUNE_METRICS_PORT"] == str(METRICS_PORT)
    prom = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["streamtune-scorer"]["dns_sd_configs"][0]["port"] == METRICS_PORT
    assert jobs["streamtune-trainer"]["static_configs"][0]["targets"] == [f"trainer:{METRICS_PORT}"]
    assert f"EXPOSE {METRICS_PORT}" in DOCKERFILE and f"127.0.0.1:{METRICS_PORT}/healthz" in DOCKERFILE


def test_volumes_are_declared_and_bind_mounts_exist() -> None:
    declared = set(COMPOSE.get("volumes", {}))
    for name, svc in services().items():
        for vol in svc.get("volumes", []):
            src = str(vol).split(":", 1)[0]
            if src.startswith("."):
                assert (REPO_ROOT / src).exists(), f"{name}: {src} missing"
            else:
                assert src in declared, f"{name}: volume {src} not declared"


def test_workers_run_as_non_root_with_a_healthcheck() -> None:
    assert re.search(r"^USER (?!root)\S+", DOCKERFILE, re.M)
    assert "HEALTHCHECK" in DOCKERFILE
    assert "torch==2.13.0" in DOCKERFILE  # the version pyproject.toml pins
    assert '"torch==2.13.0"' in (REPO_ROOT / "pyproject.toml").read_text()


def exported_metric_names() -> set[str]:
    names: set[str] = set()
    for metrics in (ScorerMetrics(), TrainerMetrics()):
        for fam in metrics.registry.collect():
            names.add(fam.name)
            if fam.type == "counter":
                names.add(fam.name + "_total")
            if fam.type == "histogram":
                names |= {fam.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_dashboard_is_valid_and_queries_exported_metrics() -> None:
    dash = json.loads((REPO_ROOT / "deploy/grafana/dashboards/streamtune.json").read_text())
    exported = exported_metric_names()
    used = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"streamtune_[a-z_]+", target["expr"]))
    assert used, "the dashboard queries no streamtune metric"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    for wanted in ("streamtune_consumer_lag", "streamtune_trainer_runs_total", "streamtune_canary_fraction",
                   "streamtune_dead_letters_total", "streamtune_event_to_redis_seconds_bucket"):  # fmt: skip
        assert wanted in used


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    prov = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/dashboards/streamtune.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    mounts = services()["grafana"]["volumes"]
    assert any(m.endswith(f":{path}:ro") and m.startswith("./deploy/grafana/dashboards") for m in mounts)
