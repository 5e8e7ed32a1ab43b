"""Kubernetes manifests validated offline: core resources against the Kubernetes schemas
(kubernetes-validate, strict), the KEDA ScaledObject against its structural schema, kustomize
files against the resources they name, and the wiring between them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from streamtune.core.settings import REPO_ROOT, Settings

K8S = REPO_ROOT / "deploy/k8s"
K8S_VERSION = "1.31.0"


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_resources() -> dict[str, dict[str, Any]]:
    kust = docs(K8S / "base/kustomization.yaml")[0]
    out = {}
    for name in kust["resources"]:
        for doc in docs(K8S / "base" / name):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


@pytest.mark.parametrize("key", sorted(base_resources()))
def test_each_resource_is_valid(key: str) -> None:
    doc = base_resources()[key]
    if doc["apiVersion"].startswith("keda.sh/"):
        schema = json.loads((K8S / "schemas/keda-scaledobject-v1alpha1.json").read_text())
        jsonschema.validate(doc, schema)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomizations_name_existing_files() -> None:
    for kust_path in K8S.rglob("kustomization.yaml"):
        kust = docs(kust_path)[0]
        for res in kust.get("resources", []):
            assert (kust_path.parent / res).exists(), f"{kust_path}: {res} missing"
        for patch in kust.get("patches", []):
            assert (kust_path.parent / patch["path"]).exists()


def test_probes_scaling_and_config_are_wired() -> None:
    res = base_resources()
    config = res["ConfigMap/streamtune-config"]["data"]
    fields = {f"STREAMTUNE_{n.upper()}" for n, _ in Settings.flat_fields()}
    assert set(config) <= fields, f"not settings: {sorted(set(config) - fields)}"
    assert set(res["Secret/streamtune-secrets"]["stringData"]) <= fields
    scorer = res["Deployment/streamtune-scorer"]["spec"]["template"]["spec"]["containers"][0]
    assert scorer["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert scorer["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["containerPort"] for p in scorer["ports"]} == {int(config["STREAMTUNE_METRICS_PORT"])}
    scaled = res["ScaledObject/streamtune-scorer"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "streamtune-scorer"
    assert scaled["maxReplicaCount"] <= int(config["STREAMTUNE_TOPIC_PARTITIONS"])
    assert all(t["metadata"]["consumerGroup"] == config["STREAMTUNE_GROUP_ID"] for t in scaled["triggers"])
    from streamtune.core.tasks import TASKS

    assert {t["metadata"]["topic"] for t in scaled["triggers"]} == {s.input_topic for s in TASKS.values()}
    for name in ("scorer", "trainer"):
        pod = res[f"Deployment/streamtune-{name}"]["spec"]["template"]["spec"]
        seeds = [c for c in pod.get("initContainers", []) if c["name"] == "seed-registry"]
        assert seeds, f"{name}: nothing seeds the registry volume"
        assert seeds[0]["volumeMounts"][0]["mountPath"] == config["STREAMTUNE_ADAPTER_DIR"]
    grace = float(config["STREAMTUNE_SHUTDOWN_GRACE_S"])
    for name in ("scorer", "trainer"):
        pod = res[f"Deployment/streamtune-{name}"]["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > grace + 10, f"{name}: SIGKILL before the drain ends"
    trainer = res["Deployment/streamtune-trainer"]["spec"]
    assert trainer["replicas"] == 1 and trainer["strategy"]["type"] == "Recreate"
    pdb = res["PodDisruptionBudget/streamtune-scorer"]["spec"]["selector"]["matchLabels"]
    assert pdb == res["Deployment/streamtune-scorer"]["spec"]["selector"]["matchLabels"]


def test_a_broken_manifest_is_caught() -> None:
    doc = base_resources()["Deployment/streamtune-scorer"]
    broken = json.loads(json.dumps(doc))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    so = json.loads(json.dumps(base_resources()["ScaledObject/streamtune-scorer"]))
    so["spec"]["maxReplicas"] = 3  # a typo of maxReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(so, json.loads((K8S / "schemas/keda-scaledobject-v1alpha1.json").read_text()))
