"""The KServe InferenceService manifest (docker/k8s/inferenceservice.yaml): its structure, and that
what it points the probes and the v2 route at is what the server serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import ServiceSettings
from service.v2_routes import v2_paths

yaml = pytest.importorskip("yaml", reason="PyYAML is missing (run scripts/install-deploy-tools.sh)")

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "docker" / "k8s" / "inferenceservice.yaml"


def test_inferenceservice_is_a_v2_custom_predictor_on_the_projects_image():
    (doc,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    assert doc["metadata"]["name"]
    predictor = doc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # KServe's name for the serving container
    assert container["image"].startswith("badexpert-guard:") and container["args"] == ["serve"]
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = ServiceSettings(**{name.removeprefix("BADEXPERT_").lower(): value for name, value in env.items()})
    (port,) = container["ports"]  # KServe routes to a single port
    assert port["containerPort"] == settings.port == 8080 and settings.host == "0.0.0.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert f"/v2/models/{settings.v2_model_name}/infer" in v2_paths(settings)
    assert settings.v2_model_name == doc["metadata"]["name"]
    assert predictor["securityContext"]["runAsNonRoot"] and predictor["securityContext"]["runAsUser"] == 10001
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in predictor["volumes"]}
    assert volumes["bundles"]["persistentVolumeClaim"]["claimName"] == "badexpert-bundles" and mounts["bundles"]["readOnly"]
    assert settings.bundle_dir.as_posix().startswith(mounts["bundles"]["mountPath"] + "/")
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])


def test_inferenceservice_pod_fields_validate_as_a_kubernetes_pod_spec():
    """KServe's predictor is a PodSpec plus its own fields (min/maxReplicas): the PodSpec part is checked
    against the Kubernetes schema, strictly (no misspelt field)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is missing")
    (doc,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    predictor = dict(doc["spec"]["predictor"])
    for kserve_field in ("minReplicas", "maxReplicas"):
        predictor.pop(kserve_field)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "badexpert-guard"}, "spec": predictor}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
