"""The engine of one Serve replica: an `AsyncEngine` (the scheduler on a step thread, with its tensor-parallel
workers in the replica's placement group), its request metrics, and the limits the OpenAI routes check against.

The routes (`rayinfer.cluster.openai.routes.LLMServer`) run in the same replica and read each request's deltas
straight from the engine's stream, so a token goes from the step thread to the HTTP proxy in one hop.
"""
from __future__ import annotations

from typing import Any

from rayinfer.cluster.metrics import ReplicaMetrics, RequestTimer
from rayinfer.configs import EngineConfig
from rayinfer.scheduler.async_engine import AsyncEngine, RequestStream
from rayinfer.scheduler.outputs import RequestOutput
from rayinfer.scheduler.sampling_params import SamplingParams


class EngineReplica:
    def __init__(self, config: EngineConfig) -> None:
        from ray import serve

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
        """The engine's limits, for the routes' checks and `/v1/models`."""
        engine = self.engine.engine
        return {
            "max_model_len": engine.max_model_len,
            "model": engine.config.model,
            "max_logprobs": engine.config.max_logprobs,
            "eos_token_ids": sorted(engine.eos_token_ids),
            "vocab_size": engine.model_spec.vocab_size,
            "hidden_size": engine.model_spec.hidden_size,
        }

    def stream(
        self, request_id: str, prompt: str | None, params: SamplingParams, prompt_token_ids: list[int] | None
    ) -> TimedStream:
        return TimedStream(self, request_id, prompt, params, prompt_token_ids)

    def check_health(self) -> None:
        """Serve's health check: it replaces a replica whose worker group died beyond repair or whose step loop
        stalls (a replica replacing its workers is left to finish)."""
        problem = self.engine.health_problem(include_recovery=False)
        if problem is not None:
            raise RuntimeError(problem)

    def health_problem(self) -> str | None:
        """What `/health` reports: the same, and also a worker group being replaced."""
        return self.engine.health_problem()

    def shutdown(self) -> None:
        self.publisher.stop()
        self.engine.shutdown()


class TimedStream:
    """One request's deltas from the replica's engine, recorded in its metrics. The first `__anext__` adds the
    request (raising what the engine refuses: not a served request, so not recorded); `cancel()` aborts it at any
    point, as when the client goes away."""

    def __init__(
        self,
        replica: EngineReplica,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None,
    ) -> None:
        self._replica = replica
        self._request = (request_id, prompt, params, prompt_token_ids)
        self._stream: RequestStream | None = None
        self._timer: RequestTimer | None = replica.metrics.track()
        self._cancelled = False

    def __aiter__(self) -> TimedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._stream is None:
            if self._cancelled:
                raise StopAsyncIteration
            try:
                self._stream = await self._replica.engine.open(*self._request)
            except BaseException:
                self._timer = None
                raise
            if self._cancelled:  # cancelled while it was being added
                self._stream.cancel()
        try:
            delta = await self._stream.__anext__()
        except StopAsyncIteration:
            self._end()
            raise
        if self._timer is not None:
            self._timer.on_delta(delta)
        if delta.finished:
            self._end()
        return delta

    def cancel(self) -> None:
        self._cancelled = True
        if self._stream is not None:
            self._stream.cancel()
        self._end()

    def _end(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and self._stream is not None:
            timer.on_end()
            self._replica.publisher.poke()
