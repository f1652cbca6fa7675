"""configs/kuberay/rayservice.yaml: a RayService that KubeRay's CRD accepts with no field dropped, whose Serve config
`rayinfer serve` accepts, and whose cluster has room for every engine replica Serve may start.

The CRD schema is vendored (tests/configs/data/, its KubeRay release in the file name and its `source`). Kubernetes
prunes fields its structural schema does not know instead of refusing them, so besides validating against the
schema, the document is walked against the schema's `properties`: a misspelt key fails here rather than vanish.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="installed with the 'serve' extra (pyyaml)")
jsonschema = pytest.importorskip("jsonschema", reason="installed with ray and schemathesis")
pytest.importorskip("ray.serve", reason="installed with the 'serve' extra")

from rayinfer.cluster.serve_config import load_serve_config  # noqa: E402
from rayinfer.configs import EngineConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RAYSERVICE = REPO / "configs" / "kuberay" / "rayservice.yaml"
SCHEMA_FILE = Path(__file__).parent / "data" / "kuberay-v1.7.0-rayservice-v1-schema.json"
LLAMA3_8B = REPO / "configs" / "serve" / "llama3-8b.yaml"


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())["openAPIV3Schema"]


def _load() -> dict[str, Any]:
    return yaml.safe_load(RAYSERVICE.read_text())


def unknown_fields(doc: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """The paths in `doc` that a Kubernetes structural schema would prune (fields it does not declare)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(doc, list):
        items = schema.get("items", {})
        return [p for i, item in enumerate(doc) for p in unknown_fields(item, items, f"{path}[{i}]")]
    if not isinstance(doc, dict):
        return []
    if path == "metadata":  # the object's own ObjectMeta: the API server checks it, not the CRD
        return []
    found = []
    for key, value in doc.items():
        where = f"{path}.{key}" if path else key
        if key in schema.get("properties", {}):
            found += unknown_fields(value, schema["properties"][key], where)
        elif isinstance(schema.get("additionalProperties"), dict):  # a map: any key, values of one schema
            found += unknown_fields(value, schema["additionalProperties"], where)
        else:
            found.append(where)
    return found


def crd_problems(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft4Validator(_schema())  # OpenAPI v3.0 schemas are draft-4 shaped
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    return errors + [f"{p}: not in the CRD schema (Kubernetes would drop it)" for p in unknown_fields(doc, _schema())]


def _serve_config(doc: dict[str, Any], tmp_path: Path) -> Any:
    path = tmp_path / "serveConfigV2.yaml"
    path.write_text(doc["spec"]["serveConfigV2"])
    return load_serve_config(path)


def test_the_schema_is_kuberays_rayservice_v1() -> None:
    source = json.loads(SCHEMA_FILE.read_text())["source"]
    assert source["tag"] in SCHEMA_FILE.name and len(source["commit"]) == 40
    assert set(_schema()["properties"]["spec"]["properties"]) >= {"serveConfigV2", "rayClusterConfig"}


def test_rayservice_matches_the_crd() -> None:
    doc = _load()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert crd_problems(doc) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplica=4), "maxReplica: not in"),
    (lambda d: d["spec"]["rayClusterConfig"].update(enableInTreeAutoscalling=True), "enableInTreeAutoscalling"),
    (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     "is not of type 'string'"),
    (lambda d: d["spec"]["rayClusterConfig"]["authOptions"].update(mode="tokens"), "'tokens' is not one of"),
], ids=["misspelt-key", "misspelt-top-key", "wrong-type", "bad-enum"])
def test_the_check_catches_mistakes(mutate: Any, expected: str) -> None:
    doc = copy.deepcopy(_load())
    mutate(doc)
    assert any(expected in problem for problem in crd_problems(doc)), crd_problems(doc)


def test_serve_config_is_ours_and_the_same_as_llama3_8b(tmp_path: Path) -> None:
    config = _serve_config(_load(), tmp_path)
    [app] = config.apps
    engine_args = {k: v for k, v in app.args.items() if k != "served_model_name"}
    EngineConfig(**engine_args)
    # One application, kept in step with the file `rayinfer serve` and `serve deploy` users start from.
    assert yaml.safe_load(_load()["spec"]["serveConfigV2"]) == yaml.safe_load(LLAMA3_8B.read_text())
    assert config.host == "0.0.0.0"  # the Serve service reaches the proxies from outside their pods


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def test_cluster_fits_the_serve_config(tmp_path: Path) -> None:
    doc = _load()
    cluster = doc["spec"]["rayClusterConfig"]
    [app] = _serve_config(doc, tmp_path).apps
    engine = EngineConfig(**{k: v for k, v in app.args.items() if k != "served_model_name"})
    scaling = app.deployment_options["LLMServer"]["autoscaling_config"]

    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # engine replicas go to GPU pods only
    serve_ports = [p["containerPort"] for c in _containers(head) for p in c.get("ports", []) if p["name"] == "serve"]
    assert serve_ports == [8000]

    gpu_capacity = 0
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpus = int(_containers(group)[0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        # A replica's ranks are placed STRICT_PACK: all on one node, so one pod must hold them all.
        if gpus >= engine.tensor_parallel_size:
            gpu_capacity += group["maxReplicas"] * (gpus // engine.tensor_parallel_size)
        mounts = {m["mountPath"] for c in _containers(group) for m in c.get("volumeMounts", [])}
        assert any(engine.model.startswith(m + "/") for m in mounts), f"{engine.model} is on no volume of the pod"
    assert gpu_capacity >= scaling["max_replicas"], "the worker groups cannot hold max_replicas engine replicas"

    images = {c["image"] for g in [head, *cluster["workerGroupSpecs"]] for c in _containers(g)}
    assert len(images) == 1  # every node runs the same Ray, Python and rayinfer
    assert f"ray{cluster['rayVersion']}" in images.pop()


def test_security_settings() -> None:
    cluster = _load()["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    # The Serve service takes the head's service type: a LoadBalancer would publish the dashboard too.
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    for group in cluster["workerGroupSpecs"]:  # where the engine replicas, which check the key, run
        for container in _containers(group):
            [key] = [e for e in container.get("env", []) if e["name"] == "RAYINFER_API_KEY"]
            assert "value" not in key and key["valueFrom"]["secretKeyRef"]["key"]
