"""The scheduler actor: one engine replica as a Ray actor that streams each request's output deltas.

Only the step thread touches the engine. Callers' `generate`/`abort` calls post commands to its inbox and
wait on asyncio futures, so the event loop stays free to stream tokens while a step runs, and the thread
sleeps when there is no work.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.engine import Engine
from rayinfer.scheduler.output_stream import DeltaTracker
from rayinfer.scheduler.outputs import RequestOutput
from rayinfer.scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue

    def push(self, output: RequestOutput) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, output)


class EngineActor:
    def __init__(self, config: EngineConfig, engine_id: str | None = None) -> None:
        self.engine = Engine(config, engine_id=engine_id)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="rayinfer-step-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ called by clients (event loop thread)
    async def generate(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's output deltas; a bad request raises ValueError before anything streams."""
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        accepted = loop.create_future()
        self._post(("add", request_id, prompt, params, prompt_token_ids, stream, accepted))
        await accepted
        tracker = DeltaTracker(params)
        finished = False
        try:
            while not finished:
                output = await stream.outputs.get()
                finished = output.finished
                delta = tracker.delta(output)
                if delta is not None:
                    yield delta
        finally:
            if not finished:  # the client went away: free the request's blocks at once
                self._post(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), "engine_id": self.engine.engine_id}

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    def _post(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wake.set()

    # ------------------------------------------------------------ the step thread
    def _run(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # an engine bug must end requests with an error, not hang them
                logger.exception("engine step failed")
                outputs = self._fail_everything(f"{type(exc).__name__}: {exc}")
            for output in outputs:
                self._deliver(output)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, params, token_ids, stream, accepted = command
                try:
                    self.engine.add_request(request_id, prompt, params, prompt_token_ids=token_ids)
                except Exception as exc:
                    stream.loop.call_soon_threadsafe(_settle, accepted, exc)
                    continue
                self._streams[request_id] = stream
                stream.loop.call_soon_threadsafe(_settle, accepted, None)
            else:
                output = self.engine.abort_request(command[1])
                if output is not None:
                    self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        if output.finished:
            del self._streams[output.request_id]
        stream.push(output)

    def _fail_everything(self, message: str) -> list[RequestOutput]:
        outputs = []
        for request_id in list(self.engine.requests):
            output = self.engine.abort_request(request_id)
            output.error = message
            for completion in output.outputs:
                completion.finish_reason = "error"
            outputs.append(output)
        return outputs


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


@dataclass
class EngineReplica:
    """A running scheduler actor and the placement group it and its workers live in."""

    actor: ray.actor.ActorHandle
    engine_id: str
    placement_group: PlacementGroup

    def stop(self) -> None:
        """Shuts the engine down (workers first), then removes the actor and its placement group."""
        try:
            ray.get(self.actor.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.actor)
            remove_placement_group(self.placement_group)


def start_engine_replica(config: EngineConfig) -> EngineReplica:
    """Starts an engine replica: a placement group for its workers, the scheduler actor in its first bundle."""
    from rayinfer.workers.ray_executor import worker_bundles

    engine_id = uuid.uuid4().hex[:8]
    if config.distributed_executor_backend is None:
        config = config.model_copy(update={"distributed_executor_backend": "ray"})
    group = placement_group(worker_bundles(config), strategy=config.placement_strategy, name=f"rayinfer-{engine_id}")
    ray.get(group.ready(), timeout=120)
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
    actor = (
        ray.remote(EngineActor)
        .options(name=f"rayinfer-{engine_id}-scheduler", num_cpus=0, scheduling_strategy=strategy)
        .remote(config, engine_id)
    )
    return EngineReplica(actor, engine_id, group)
