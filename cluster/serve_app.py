"""The Ray Serve application, and the builders Serve config files and the CLI name (`app_builder`,
`build_app_from_args`).

The application is one deployment, `LLMServer` (`rayinfer.cluster.openai.routes`): each replica serves the
OpenAI-compatible routes from its own engine (`rayinfer.cluster.engine_replica.EngineReplica`: the scheduler on a
step thread, its tensor-parallel workers in the replica's placement group), and Serve's HTTP proxy spreads requests
over the replicas.
"""
from __future__ import annotations

from typing import Any

from rayinfer.cluster.openai.routes import LLMServer
from rayinfer.cluster.openai.tool_calls import check_tool_call_parser
from rayinfer.configs import EngineConfig


def build_app(
    config: EngineConfig,
    served_model_name: str | None = None,
    deployment_options: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """The Serve application: one `LLMServer` deployment whose replicas own their workers' placement group.

    `deployment_options` maps the deployment's name (`LLMServer`) to Serve options (`autoscaling_config`,
    `max_ongoing_requests`, ...), as the `deployments:` list of a Serve config file does.
    """
    from rayinfer.workers.ray_executor import worker_bundles

    check_tool_call_parser(config.tool_call_parser)  # here, not in a replica that Serve would restart in a loop
    _check_local_checkpoint(config)
    options = deployment_options or {}
    unknown = set(options) - {LLMServer.name}
    if unknown:  # `EngineDeployment` and `Ingress` were merged into `LLMServer`
        raise ValueError(f"deployments: this application has one deployment, {LLMServer.name!r}; "
                         f"there is no {', '.join(sorted(map(repr, unknown)))}")
    if config.distributed_executor_backend is None:
        config = config.model_copy(update={"distributed_executor_backend": "ray"})
    server_options = {
        "placement_group_bundles": worker_bundles(config),
        "placement_group_strategy": config.placement_strategy,
        **options.get(LLMServer.name, {}),
    }
    return LLMServer.options(**server_options).bind(config, served_model_name or config.model)


def _check_local_checkpoint(config: Any) -> None:
    """What a local checkpoint folder's config.json decides, checked before Serve starts a replica (whose failure
    the deploy would report only as "Failed to update the deployments"): its quantisation format, and whether it
    splits across the tensor-parallel ranks and pipeline stages asked for. A Hub id is checked by the replica."""
    from pathlib import Path

    from rayinfer.workers.model_config import check_pipeline_parallel, check_tensor_parallel, load_model_spec
    from rayinfer.workers.quantization.config import quant_scheme_for

    if not (Path(config.model) / "config.json").is_file():
        return
    spec = load_model_spec(config.model)
    quant_scheme_for(spec.raw, config.quantization)
    check_tensor_parallel(spec, config.tensor_parallel_size)
    check_pipeline_parallel(spec, config.pipeline_parallel_size, config.pipeline_layer_partition)


def app_builder(args: dict[str, Any]) -> Any:
    """The `import_path` of Serve config files (`serve run configs/serve/demo.yaml`); Serve applies the file's
    `deployments:` settings itself, and requires a builder to take exactly this one argument."""
    return build_app_from_args(args)


def build_app_from_args(args: dict[str, Any], deployment_options: dict[str, dict[str, Any]] | None = None) -> Any:
    """The application for a config file's `args`: engine arguments plus `served_model_name`; a missing or null
    `model` serves the built-in demo model (`rayinfer-demo`)."""
    engine_args = dict(args)
    served_model_name = engine_args.pop("served_model_name", None)
    model = engine_args.pop("model", None)
    if model is None:
        from rayinfer.workers.demo_model import DEMO_MODEL_NAME

        model = DEMO_MODEL_NAME
    config = EngineConfig(model=model, **engine_args)
    return build_app(config, served_model_name=served_model_name, deployment_options=deployment_options)
