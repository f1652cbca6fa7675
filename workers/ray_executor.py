"""Drives tensor-parallel worker actors, one per GPU (or CPU slot), placed in one placement group.

The group is the engine's own, or the one its caller already runs in (a Ray Serve replica, the scheduler
actor), so the scheduler and its workers sit together. A worker that dies is noticed by the step that needed
it; `restart` then replaces the whole group in the same placement group, and the engine recomputes its
sequences from their text.
"""
from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayinfer.configs import EngineConfig
from rayinfer.workers.executor_interface import Executor, WorkerGroupFailure
from rayinfer.workers.grammar import COMPILE_TIMEOUT_S, GrammarSpec
from rayinfer.workers.step_channel import StepChannel, StepServer
from rayinfer.workers.step_output import StepOutput
from rayinfer.workers.step_plan import StepPlan
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.parallel_state import PipelineStage, pipeline_stage_for
from rayinfer.workers.worker import Worker, pick_rendezvous_address

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 60.0
SETUP_TIMEOUT_S = 300.0
# Steps to GPU workers go through a Ray compiled graph: shared-memory channels cost a fraction of an actor
# call, but each worker then polls its channel and keeps a CPU core busy even when idle. That is cheap beside a
# GPU and ruinous on a CPU-only machine, whose workers take their steps over a `StepChannel` instead (a blocking
# connection per rank, as cheap per step). RAYINFER_RAY_COMPILED_GRAPH=1 or 0 forces the choice.
COMPILED_GRAPH_ENV = "RAYINFER_RAY_COMPILED_GRAPH"
# GPU workers are sent the next step before the current one ends (the engine plans it while they compute). CPU
# workers are not: there the planning competes for the cores the worker computes on, and a request that arrives
# while two steps are queued waits for both. Measured serving llama-56m on the 2-core machine at 1 request/s:
# TTFT p50 120 ms in order against 146-180 ms pipelined. RAYINFER_PIPELINE_STEPS=1 or 0 forces the choice.
PIPELINE_ENV = "RAYINFER_PIPELINE_STEPS"


# What each placement strategy asks of the cluster, for the error raised when it cannot be met.
PLACEMENT_NEEDS = {
    "STRICT_PACK": "all on one node",
    "PACK": "on as few nodes as possible",
    "SPREAD": "on as many nodes as possible",
    "STRICT_SPREAD": "each on a node of its own",
}


def worker_bundles(config: EngineConfig) -> list[dict[str, float]]:
    """A GPU where the engine runs on CUDA, a CPU slot otherwise, per rank: one bundle per rank, or with pipeline
    stages one bundle per stage holding its tensor-parallel group, so that a stage never spans nodes while the
    placement strategy spreads the stages (TP inside a node, PP across nodes)."""
    wants_gpu = config.device == "cuda" or (config.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    unit = "GPU" if wants_gpu else "CPU"
    if config.pipeline_parallel_size > 1:
        return [{unit: float(config.tensor_parallel_size)} for _ in range(config.pipeline_parallel_size)]
    return [{unit: 1.0} for _ in range(config.tensor_parallel_size)]


def bundle_of_rank(config: EngineConfig, rank: int) -> int:
    """The bundle (of `worker_bundles`) that global rank `rank` is placed in."""
    return rank // config.tensor_parallel_size if config.pipeline_parallel_size > 1 else rank


@dataclass
class _GraphStep:
    """A step sent through the compiled graph: one reference per rank."""

    refs: list


@dataclass
class _ChannelStep:
    """A step sent over the step channel: its sequence number there."""

    number: int


class WorkerActor(Worker):
    """A rank run as a Ray actor: a `Worker` that can also take its steps over a `StepChannel`, and compile
    grammars on a thread of their own while its steps run (the "grammar" concurrency group)."""

    def rendezvous_address(self) -> tuple[str, int]:
        """The address Ray knows this node by (the one other nodes reach it at), not what the host name resolves
        to, which is often a loopback address."""
        return ray.util.get_node_ip_address(), pick_rendezvous_address()[1]

    def node_id(self) -> str:
        """The Ray node this rank runs on (placement checks)."""
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="grammar")
    def prepare_grammar(self, spec: GrammarSpec) -> tuple[str, str] | None:
        return super().prepare_grammar(spec)

    def listen_for_steps(self, authkey: bytes) -> tuple[str, int]:
        """Opens this rank's end of the step channel; returns the address the engine connects to."""
        self._step_server = StepServer(ray.util.get_node_ip_address(), authkey)
        return self._step_server.address

    def serve_steps(self) -> None:
        """Runs the engine's steps (and calls) until it closes the channel, on the actor's main thread."""
        self._step_server.serve(self.run_step, lambda method, args: getattr(self, method)(*args))


class RayExecutor(Executor):
    def __init__(
        self, config: EngineConfig, spec: ModelSpec, max_model_len: int, max_num_batched_tokens: int, engine_id: str
    ) -> None:
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)
        self.config = config
        self.spec = spec
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.engine_id = engine_id
        self.bundles = worker_bundles(config)
        self.pipelined = self._on_for_gpu_workers(PIPELINE_ENV)  # workers run steps in the order sent
        self.micro_batches = config.pipeline_parallel_size  # one step in flight per stage keeps every stage busy
        self.world_size = config.tensor_parallel_size * config.pipeline_parallel_size
        self.output_rank = self.world_size - config.tensor_parallel_size  # the last stage's first rank samples
        self.placement_group, self._owns_placement_group = self._placement_group()
        self.generation = 0
        self.workers: list[ray.actor.ActorHandle] = []
        self._graph = None
        self._channel: StepChannel | None = None
        self._pids: list[int] = []
        self.num_blocks = self._start_workers(required_blocks=None)

    def _placement_group(self) -> tuple[PlacementGroup, bool]:
        current = get_current_placement_group()
        if current is not None:
            return current, False
        strategy = self.config.placement_strategy
        group = placement_group(self.bundles, strategy=strategy, name=f"rayinfer-{self.engine_id}")
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            remove_placement_group(group)
            raise ValueError(
                f"{self._what_is_placed()} "
                f"{PLACEMENT_NEEDS[strategy]} (placement_strategy {strategy}) within {PLACEMENT_TIMEOUT_S:.0f}s"
            ) from None
        return group, True

    def _start_workers(self, required_blocks: int | None) -> int:
        world = self.world_size
        remote_worker = ray.remote(concurrency_groups={"grammar": 1})(WorkerActor)
        self.generation += 1
        self.workers = []
        for rank in range(world):
            index = bundle_of_rank(self.config, rank)
            strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=index)
            self.workers.append(
                remote_worker.options(
                    name=f"rayinfer-{self.engine_id}-worker-{rank}-gen{self.generation}",
                    num_cpus=1 if "CPU" in self.bundles[index] else 0,
                    num_gpus=1 if "GPU" in self.bundles[index] else 0,
                    scheduling_strategy=strategy,
                ).remote(
                    self.config, self.spec, self.max_model_len, self.max_num_batched_tokens, rank, world,
                    claim_cpu_cores=True, stage=self._stage_of(rank),
                )
            )
        try:
            host, port = ray.get(self.workers[0].rendezvous_address.remote(), timeout=SETUP_TIMEOUT_S)
            ray.get([w.init_distributed.remote(host, port) for w in self.workers], timeout=SETUP_TIMEOUT_S)
            ray.get([w.load_model.remote() for w in self.workers], timeout=SETUP_TIMEOUT_S)
            counts = ray.get([w.num_available_blocks.remote() for w in self.workers], timeout=SETUP_TIMEOUT_S)
            # A block id must mean the same slot on every rank, so all ranks get the smallest count.
            num_blocks = min(counts) if required_blocks is None else required_blocks
            if min(counts) < num_blocks or num_blocks < 1:
                raise WorkerGroupFailure(f"workers report room for {counts} KV blocks; {num_blocks} are needed")
            ray.get([w.init_cache.remote(num_blocks, True) for w in self.workers], timeout=SETUP_TIMEOUT_S)
            self._pids = ray.get([w.pid.remote() for w in self.workers], timeout=SETUP_TIMEOUT_S)
            self._graph = self._compile_step_graph() if self._on_for_gpu_workers(COMPILED_GRAPH_ENV) else None
            if self._graph is None:
                self._open_channel()
        except (RayError, GetTimeoutError, WorkerGroupFailure) as exc:
            self._replace_failed_group()
            raise WorkerGroupFailure(f"starting the worker group failed: {exc}") from exc
        logger.info("engine %s: %d workers up (generation %d), %d KV blocks", self.engine_id, world, self.generation, num_blocks)
        return num_blocks

    def _what_is_placed(self) -> str:
        tp, pp = self.config.tensor_parallel_size, self.config.pipeline_parallel_size
        if pp > 1:
            return (f"pipeline_parallel_size: the cluster cannot place {pp} stages of {self.bundles[0]} ({tp} "
                    f"workers each)")
        return f"tensor_parallel_size: the cluster cannot place {len(self.bundles)} workers of {self.bundles[0]}"

    def _stage_of(self, rank: int) -> PipelineStage:
        tp, pp = self.config.tensor_parallel_size, self.config.pipeline_parallel_size
        return pipeline_stage_for(rank // tp, pp, self.spec.num_layers, self.config.pipeline_layer_partition)

    def _open_channel(self) -> None:
        key = secrets.token_bytes(32)
        addresses = ray.get([w.listen_for_steps.remote(key) for w in self.workers], timeout=SETUP_TIMEOUT_S)
        for worker in self.workers:
            worker.serve_steps.remote()  # returns when the channel closes; nothing to read from it
        self._channel = StepChannel(addresses, key, timeout_s=self.config.step_timeout_s, output_rank=self.output_rank)

    def _on_for_gpu_workers(self, env_var: str) -> bool:
        """A choice that is on for GPU workers and off for CPU ones unless `env_var` is 1 or 0."""
        setting = os.environ.get(env_var, "auto")
        if setting in ("0", "1"):
            return setting == "1"
        return any(bundle.get("GPU", 0) > 0 for bundle in self.bundles)

    def _compile_step_graph(self):  # noqa: ANN202 - a ray.dag.CompiledDAG
        from ray.dag import InputNode, MultiOutputNode

        try:
            with InputNode() as plan:
                graph = MultiOutputNode([w.run_step.bind(plan) for w in self.workers])
            return graph.experimental_compile()
        except Exception as exc:  # an environment without compiled-graph support still works, just slower
            logger.warning("Ray compiled graph unavailable (%s); steps use plain actor calls", exc)
            return None

    def execute(self, plan: StepPlan) -> StepOutput:
        return self.result(self.submit(plan))

    def submit(self, plan: StepPlan) -> object:
        try:
            if self._graph is not None:
                return _GraphStep(self._graph.execute(plan))
            return _ChannelStep(self._live_channel().send(plan))
        except RayError as exc:
            return WorkerGroupFailure(f"a worker of engine {self.engine_id} failed: {exc}")
        except WorkerGroupFailure as exc:
            return exc

    def _live_channel(self) -> StepChannel:
        if self._channel is None:
            raise WorkerGroupFailure(f"engine {self.engine_id} has no worker group")
        return self._channel

    def result(self, handle: object) -> StepOutput:
        if isinstance(handle, WorkerGroupFailure):
            raise handle
        try:
            if isinstance(handle, _GraphStep):
                outputs = ray.get(handle.refs, timeout=self.config.step_timeout_s)  # every rank's output is read
                return outputs[self.output_rank]
            return self._live_channel().receive(handle.number)  # type: ignore[attr-defined, return-value]
        except RayActorError as exc:
            raise WorkerGroupFailure(f"a worker of engine {self.engine_id} died: {exc}") from exc
        except RayError as exc:
            raise WorkerGroupFailure(f"a worker of engine {self.engine_id} failed: {exc}") from exc

    def prepare_grammar(self, spec: GrammarSpec) -> tuple[str, str] | None:
        refs = [w.prepare_grammar.remote(spec) for w in self.workers]
        try:
            problems = ray.get(refs, timeout=COMPILE_TIMEOUT_S)
        except GetTimeoutError:
            return spec.kind, f"it did not compile within {COMPILE_TIMEOUT_S:.0f}s"
        except RayError as exc:  # a lost worker is the step loop's to notice; its replacement compiles on arrival
            logger.warning("engine %s: preparing a grammar failed: %s", self.engine_id, exc)
            return None
        return next((problem for problem in problems if problem is not None), None)

    def worker_pids(self) -> list[int]:
        return list(self._pids)

    def call_workers(self, method: str, *args: object) -> list[object]:
        """Runs a Worker method on every rank between steps (diagnostics and tests)."""
        if self._graph is not None:
            return ray.get([getattr(w, method).remote(*args) for w in self.workers])
        return self._live_channel().call(method, *args)

    def restart(self) -> None:
        self._replace_failed_group()
        last_error: Exception | None = None
        for attempt in range(1, self.config.max_worker_restarts + 1):
            try:
                self._start_workers(required_blocks=self.num_blocks)
                return
            except WorkerGroupFailure as exc:
                last_error = exc
                logger.warning("engine %s: restart attempt %d failed: %s", self.engine_id, attempt, exc)
        raise WorkerGroupFailure(f"gave up after {self.config.max_worker_restarts} attempts: {last_error}")

    def _teardown_graph(self) -> None:
        graph, self._graph = self._graph, None
        if graph is not None:
            try:
                graph.teardown()
            except Exception as exc:  # its actors may be dead already; nothing else holds its channels
                logger.debug("compiled graph teardown: %s", exc)

    def _kill_workers(self) -> None:
        if self._channel is not None:
            self._channel.close()  # the workers' serve_steps calls end
            self._channel = None
        for worker in self.workers:
            try:
                ray.kill(worker, no_restart=True)
            except RayError as exc:
                logger.debug("worker already gone: %s", exc)
        self.workers = []

    def _replace_failed_group(self) -> None:
        # Workers first: a rank stuck in a collective with a dead peer would keep the graph's teardown waiting.
        self._kill_workers()
        self._teardown_graph()

    def shutdown(self) -> None:
        self._teardown_graph()  # healthy workers: stop the graph's loops before their actors go
        self._kill_workers()
        if self._owns_placement_group:
            remove_placement_group(self.placement_group)
            self._owns_placement_group = False
