"""configs/serve/*.yaml: valid Serve config files (as `serve run` reads them) whose engine args and autoscaling
settings make sense, and the checks `rayinfer serve CONFIG.yaml` makes on files of its own."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="installed with the 'serve' extra")

from rayinfer.cluster.serve_config import APP_BUILDER, load_serve_config  # noqa: E402
from rayinfer.configs import EngineConfig  # noqa: E402

SERVE_DIR = Path(__file__).resolve().parents[2] / "configs" / "serve"
SERVE_CONFIGS = sorted(SERVE_DIR.glob("*.yaml"))


def test_there_are_configs_for_cpu_one_gpu_tensor_and_pipeline_parallel() -> None:
    names = {path.stem for path in SERVE_CONFIGS}
    assert {"demo", "llama3-8b", "llama3-70b", "llama3-70b-pp"} <= names


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.stem)
def test_serve_config_is_valid_and_scales(path: Path) -> None:
    config = load_serve_config(path)
    module, attribute = APP_BUILDER.split(":")
    assert callable(getattr(importlib.import_module(module), attribute))  # what `serve run` imports
    for app in config.apps:
        engine_args = {k: v for k, v in app.args.items() if k != "served_model_name"}
        engine_args["model"] = engine_args.get("model") or "tiny"
        EngineConfig(**engine_args)
        engine = app.deployment_options["LLMServer"]
        scaling = engine["autoscaling_config"]
        assert scaling["min_replicas"] < scaling["max_replicas"]
        # A replica never holds more than max_ongoing_requests, so a target at or above it never scales out.
        assert scaling["target_ongoing_requests"] < engine["max_ongoing_requests"]
        assert engine["max_queued_requests"] > 0  # a full queue answers 503 instead of growing forever


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return path


def test_misspelt_key_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "applications:\n  - name: a\n    import_path: " + APP_BUILDER + "\n    argz: {}\n")
    with pytest.raises(ValueError, match="serve.yaml is not a valid Serve config file.*argz"):
        load_serve_config(path)
    deployment = "applications:\n  - name: a\n    import_path: " + APP_BUILDER + "\n    deployments:\n" \
                 "      - name: LLMServer\n        autoscaling_confg: {max_replicas: 2}\n"
    with pytest.raises(ValueError, match="autoscaling_confg in deployment 'LLMServer'"):
        load_serve_config(_write(tmp_path, deployment))


def test_a_deployment_the_application_does_not_have_is_refused() -> None:
    from rayinfer.cluster.serve_app import build_app_from_args

    with pytest.raises(ValueError, match="one deployment, 'LLMServer'; there is no 'Ingress'"):
        build_app_from_args({"model": "tiny"}, deployment_options={"Ingress": {"max_ongoing_requests": 4}})


def test_other_applications_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "applications:\n  - name: a\n    import_path: my.module:app\n")
    with pytest.raises(ValueError, match="my.module:app"):
        load_serve_config(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_serve_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.stem)
def test_serve_run_builds_the_application_from_the_file(path: Path) -> None:
    """What `serve run FILE` does with `import_path` and `args`, short of deploying."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from rayinfer.cluster.serve_app import app_builder

    args = dict(load_serve_config(path).apps[0].args)
    args["model"] = args.get("model") or "tiny"
    app = call_user_app_builder_with_args_if_necessary(app_builder, args)
    assert isinstance(app, Application)


def test_pipeline_config_asks_for_one_4_gpu_node_per_stage_of_its_cluster() -> None:
    """llama3-70b-pp.yaml on configs/cluster/aws-llama3-70b-pp.yaml: each replica's placement group (as Serve gets
    it from the built application) is one {GPU: 4} bundle per stage on nodes of their own, each bundle one whole
    GPU node of the cluster, and the replicas fit the cluster's nodes (two per replica)."""
    import yaml
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from rayinfer.cluster.serve_app import app_builder

    config = load_serve_config(SERVE_DIR / "llama3-70b-pp.yaml")
    args = config.apps[0].args
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (4, 2)
    app = call_user_app_builder_with_args_if_necessary(app_builder, dict(args))
    replica = app._bound_deployment._replica_config  # what Serve reserves per replica; no public accessor
    assert replica.placement_group_bundles == [{"GPU": 4.0}, {"GPU": 4.0}]
    assert replica.placement_group_strategy in ("SPREAD", "STRICT_SPREAD")

    cluster = yaml.safe_load((SERVE_DIR.parent / "cluster" / "aws-llama3-70b-pp.yaml").read_text())
    (gpu_node,) = [t for t in cluster["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_node["resources"]["GPU"] == 4, "a stage's bundle is one whole node"
    scaling = config.apps[0].deployment_options["LLMServer"]["autoscaling_config"]
    assert 2 * scaling["max_replicas"] <= min(cluster["max_workers"], gpu_node["max_workers"])
    assert 2 * scaling["min_replicas"] <= gpu_node["min_workers"], "the first replica's nodes stay warm"


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_a_config_open_to_the_network_says_to_set_an_api_key(path: Path) -> None:
    config = load_serve_config(path)
    if config.host == "0.0.0.0":
        assert "RAYINFER_API_KEY" in path.read_text() and "Authorization: Bearer" in path.read_text()
    assert "api_key" not in str(config.apps[0].args)  # the key comes from the environment, never from the file
