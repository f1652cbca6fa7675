"""The Ray Serve application: the OpenAI-compatible ingress (`rayinfer.cluster.openai.routes.Ingress`) in front of
engine replicas, and the builders Serve config files and the CLI name (`app_builder`, `build_app_from_args`).

`EngineDeployment` is one engine replica: an `AsyncEngine` (the scheduler on a step thread, with its
tensor-parallel workers in the replica's placement group) whose `generate` streams output deltas to the ingress.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from rayinfer.cluster.metrics import ReplicaMetrics
from rayinfer.cluster.openai.routes import Ingress
from rayinfer.configs import EngineConfig
from rayinfer.scheduler.async_engine import AsyncEngine
from rayinfer.scheduler.outputs import RequestOutput
from rayinfer.scheduler.sampling_params import SamplingParams

# Serve's default of 5 ongoing requests per replica would starve continuous batching; the queue in front of
# the replicas is bounded so that overload answers 503 instead of growing without limit.
ENGINE_MAX_ONGOING_REQUESTS = 256
ENGINE_MAX_QUEUED_REQUESTS = 1024


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=ENGINE_MAX_ONGOING_REQUESTS,
    max_queued_requests=ENGINE_MAX_QUEUED_REQUESTS,
)
class EngineDeployment:
    """One engine replica; Serve adds and removes whole replicas, each with its own workers."""

    def __init__(self, config: EngineConfig) -> None:
        from rayinfer.cluster.metrics_board import Publisher
        from rayinfer.workers.tiny_checkpoint import ensure_model_dir

        ensure_model_dir(config.model)  # the built-in tiny model is built on whichever node the replica lands
        self.engine = AsyncEngine(config)
        self.metrics = ReplicaMetrics()
        context = serve.get_replica_context()
        self.publisher = Publisher(context.app_name, context.replica_tag, self._snapshot)

    def _snapshot(self) -> dict[str, Any]:
        return self.metrics.snapshot(self.engine.stats())

    def info(self) -> dict[str, Any]:
        engine = self.engine.engine
        return {
            "max_model_len": engine.max_model_len,
            "model": engine.config.model,
            "max_logprobs": engine.config.max_logprobs,
            "eos_token_ids": sorted(engine.eos_token_ids),
            "vocab_size": engine.model_spec.vocab_size,
        }

    async def generate(
        self, request_id: str, prompt: str | None, params: SamplingParams, prompt_token_ids: list[int] | None
    ) -> AsyncIterator[RequestOutput]:
        timer = self.metrics.track()
        try:
            async for delta in self.engine.generate(request_id, prompt, params, prompt_token_ids):
                timer.on_delta(delta)
                yield delta
        except ValueError:  # refused before it started (InvalidRequestError): not a served request
            timer = None
            raise
        finally:
            if timer is not None:
                timer.on_end()
                self.publisher.poke()

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def check_health(self) -> None:
        """Serve replaces a replica whose worker group died beyond repair."""
        if self.engine.engine.failure is not None:
            raise RuntimeError(self.engine.engine.failure)

    def __del__(self) -> None:
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            publisher.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def build_app(
    config: EngineConfig,
    served_model_name: str | None = None,
    deployment_options: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """The Serve application: one engine deployment whose replicas own their workers' placement group.

    `deployment_options` maps a deployment name (`EngineDeployment`, `Ingress`) to Serve options
    (`autoscaling_config`, `max_ongoing_requests`, ...), as the `deployments:` list of a Serve config file does.
    """
    from rayinfer.workers.ray_executor import worker_bundles

    options = deployment_options or {}
    if config.distributed_executor_backend is None:
        config = config.model_copy(update={"distributed_executor_backend": "ray"})
    engine_options = {
        "placement_group_bundles": worker_bundles(config),
        "placement_group_strategy": config.placement_strategy,
        **options.get("EngineDeployment", {}),
    }
    engine = EngineDeployment.options(**engine_options).bind(config)
    ingress = Ingress.options(**options["Ingress"]) if "Ingress" in options else Ingress
    return ingress.bind(engine, served_model_name or config.model, config.tokenizer_path)


def app_builder(args: dict[str, Any]) -> Any:
    """The `import_path` of Serve config files (`serve run configs/serve/tiny.yaml`); Serve applies the file's
    `deployments:` settings itself, and requires a builder to take exactly this one argument."""
    return build_app_from_args(args)


def build_app_from_args(args: dict[str, Any], deployment_options: dict[str, dict[str, Any]] | None = None) -> Any:
    """The application for a config file's `args`: engine arguments plus `served_model_name`; a missing or null
    `model` serves the built-in tiny checkpoint."""
    engine_args = dict(args)
    served_model_name = engine_args.pop("served_model_name", None)
    model = engine_args.pop("model", None)
    if model is None:
        from rayinfer.workers.tiny_checkpoint import default_tiny_model_dir

        model = str(default_tiny_model_dir())
    config = EngineConfig(model=model, **engine_args)
    return build_app(config, served_model_name=served_model_name, deployment_options=deployment_options)
