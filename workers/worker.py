"""One rank of the model: its weight shard, its KV pool, and the per-sequence state steps build on.

The in-process executor holds one `Worker`; the Ray executor runs one per GPU (or CPU slot) as an actor.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rayinfer.configs import EngineConfig
from rayinfer.workers.step_output import StepOutput
from rayinfer.workers.sampling_options import SamplingOptions
from rayinfer.workers.step_plan import PENDING_TOKEN, NewSequence, SampleRequest, SequenceChunk, StepPlan
from rayinfer.workers.kv_pool import KVPool, bytes_per_block, kv_cache_storage_dtype, pool_bytes
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.grammar import GrammarCompiler, GrammarError, GrammarSpec
from rayinfer.workers.model_source import checkpoint_dir, tokenizer_dir
from rayinfer.workers.cuda_graphs import DecodeGraphs
from rayinfer.workers.model_runner import ModelRunner
from rayinfer.workers.models.pipeline import IntermediateState
from rayinfer.workers.parallel_state import PipelineStage, set_pipeline_stage, set_tensor_parallel_group
from rayinfer.workers.stage_link import StageLink, StageTiming
from rayinfer.workers.device import resolve_device, resolve_dtype, use_cpu_cores
from rayinfer.workers.weight_loader import build_model

logger = logging.getLogger(__name__)


@dataclass
class WorkerSequence:
    block_table: list[int]
    num_prompt_tokens: int
    sampling: SampleRequest


class SequenceStates(dict[int, WorkerSequence]):
    """What a worker knows of each live sequence, kept current by the deltas in each StepPlan."""

    def apply(self, plan: StepPlan) -> None:
        for seq_id in plan.finished_seq_ids:
            self.pop(seq_id, None)
        for new in plan.new_sequences:
            self[new.seq_id] = WorkerSequence([], new.num_prompt_tokens, new.sampling)
        for chunk in plan.chunks:
            state = self[chunk.seq_id]
            if chunk.reset_blocks:
                state.block_table.clear()
            state.block_table.extend(chunk.new_blocks)
            if PENDING_TOKEN in chunk.token_ids:
                chunk.token_ids = self._fill_pending(chunk, state)

    @staticmethod
    def _fill_pending(chunk: SequenceChunk, state: WorkerSequence) -> list[int]:
        """A token the engine had not seen when it planned the step is one this worker drew since."""
        outputs = state.sampling.output_token_ids
        first = chunk.start_position - state.num_prompt_tokens
        return [outputs[first + i] if t == PENDING_TOKEN else t for i, t in enumerate(chunk.token_ids)]

    def record_samples(self, plan: StepPlan, tokens: list[int]) -> None:
        sampled = (chunk.seq_id for chunk in plan.chunks if chunk.sample)
        for seq_id, token in zip(sampled, tokens, strict=True):
            self[seq_id].sampling.output_token_ids.append(token)


def pick_rendezvous_address() -> tuple[str, int]:
    """This host's address and a port free right now, for torch.distributed's TCP rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    try:
        host = socket.gethostbyname(socket.gethostname())
    except OSError:
        host = "127.0.0.1"
    return host, port


class Worker:
    def __init__(
        self,
        config: EngineConfig,
        spec: ModelSpec,
        max_model_len: int,
        max_num_batched_tokens: int,
        rank: int = 0,
        world_size: int = 1,
        claim_cpu_cores: bool = False,
        stage: PipelineStage | None = None,
    ) -> None:
        """`claim_cpu_cores`: a worker actor of a CPU engine takes its share of the cores as torch threads (Ray
        starts it with one); an in-process worker keeps whatever its host process set. `stage`: the pipeline
        stage this worker holds (`pipeline_stage_for`); None: the whole model."""
        self.config = config
        self.spec = spec
        self.stage = stage if stage is not None else PipelineStage(0, 1, 0, spec.num_layers)
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.rank = rank  # global: stage index * tensor_parallel_size + the rank within the stage
        self.world_size = world_size
        self.tp_size = config.tensor_parallel_size if self.stage.count > 1 else world_size
        self.tp_rank = rank % self.tp_size
        self.stage_link: StageLink | None = None
        self.stage_timing = StageTiming()
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, spec, self.device)
        self.kv_cache_dtype = kv_cache_storage_dtype(config.kv_cache_dtype, self.dtype)
        if self.device.type == "cpu" and claim_cpu_cores:
            use_cpu_cores(world_size)
        self.sequences = SequenceStates()
        self.runner: ModelRunner | None = None
        self.model: torch.nn.Module | None = None
        self._grammar_compiler: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()

    # ------------------------------------------------------------ setup
    def pid(self) -> int:
        return os.getpid()

    def rendezvous_address(self) -> tuple[str, int]:
        return pick_rendezvous_address()

    def init_distributed(self, host: str, port: int) -> None:
        if self.world_size > 1:
            if self.device.type == "cuda" and self.device.index is not None:
                # "cuda" without an index is the current device already (Ray shows each worker its own GPU), and
                # set_device refuses an unindexed device.
                torch.cuda.set_device(self.device)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend, init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world_size
            )
        group = None
        if self.stage.count > 1 and self.world_size > 1:  # (a test may chain in-process stages by hand)
            # Every rank makes every stage's group, in the same order (torch.distributed's rule), and keeps its own.
            for index in range(self.stage.count):
                ranks = list(range(index * self.tp_size, (index + 1) * self.tp_size))
                made = dist.new_group(ranks)
                group = made if index == self.stage.index else group
            self.stage_link = StageLink(self.stage, self.rank, self.tp_size, self.spec.hidden_size, self.dtype,
                                        self.device)
        set_tensor_parallel_group(self.tp_rank, self.tp_size, group)

    def load_model(self) -> None:
        # Each worker resolves a Hub id itself, fetching into its own node's cache.
        folder = checkpoint_dir(self.config)
        set_pipeline_stage(self.stage)  # the model reads it as it is built; unset after, as this worker keeps it
        try:
            self.model = build_model(
                self.spec, folder, self.dtype, self.device, self.max_model_len, self.config.quantization,
                self.config.kv_cache_dtype,
            )
        finally:
            set_pipeline_stage(None)

    def _block_bytes(self) -> int:
        """Bytes of one block over this stage's layers: a stage's pool holds K/V for its own layers only, so
        the same memory holds more blocks the fewer layers it has (the engine uses the least over all workers)."""
        kv_heads = max(1, self.spec.num_kv_heads // self.tp_size)
        return bytes_per_block(
            self.stage.num_layers, self.config.block_size, kv_heads, self.spec.head_dim, self.kv_cache_dtype
        )

    def num_available_blocks(self) -> int:
        block_bytes = self._block_bytes()
        if self.config.kv_cache_memory_bytes is None and self.device.type == "cuda":
            return self._profiled_pool_bytes(block_bytes) // block_bytes
        return pool_bytes(self.config, block_bytes, self.device, self.max_model_len) // block_bytes

    def _profiled_pool_bytes(self, block_bytes: int) -> int:
        """Runs the largest step on a scratch pool and measures its peak memory; the KV pool gets what
        gpu_memory_utilization leaves after the weights, that peak and other processes."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        scratch_bytes = self.run_largest_step() * block_bytes
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.runner = None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = int(total * self.config.gpu_memory_utilization) - used_by_others - (peak - scratch_bytes)
        logger.info("profiled step peak %.2f GiB; KV pool gets %.2f GiB", peak / 2**30, max(budget, 0) / 2**30)
        return max(budget, 0)

    def run_largest_step(self) -> int:
        """One step of max_num_batched_tokens prompt tokens (in sequences of at most max_model_len - 1) on a
        scratch pool just big enough; returns the scratch pool's block count. Leaves no sequence behind."""
        tokens, per_seq = self.max_num_batched_tokens, self.max_model_len - 1
        lengths = [per_seq] * (tokens // per_seq) + ([tokens % per_seq] if tokens % per_seq else [])
        blocks_per_seq = [-(-n // self.config.block_size) for n in lengths]
        self.init_cache(sum(blocks_per_seq))
        intermediate = None
        if not self.stage.is_first:  # what the previous stage would send: only its shape matters here
            intermediate = IntermediateState.zeros(tokens, self.spec.hidden_size, self.dtype, self.device)
        plan, next_block = StepPlan(chunks=[]), 0
        for seq_id, (length, num_blocks) in enumerate(zip(lengths, blocks_per_seq)):
            # A sampled (temperature 1) row, as SamplingParams' defaults ask, so the draw's memory is counted too.
            sampling = SampleRequest(
                SamplingOptions(temperature=1.0), seed=0, prompt_token_ids=[], output_token_ids=[], stop_ids_for_min_tokens=[]
            )
            plan.new_sequences.append(NewSequence(seq_id, length, sampling))
            blocks = list(range(next_block, next_block + num_blocks))
            plan.chunks.append(SequenceChunk(seq_id, [0] * length, 0, blocks, reset_blocks=True, sample=True))
            next_block += num_blocks
        self.execute(plan, intermediate)
        self.execute(StepPlan(chunks=[], finished_seq_ids=list(range(len(lengths)))))
        return next_block

    def init_cache(self, num_blocks: int, capture_graphs: bool = False) -> None:
        """Builds the KV pool and the runner; `capture_graphs` (the serving pool, not a profiling scratch one)
        also captures the decode CUDA graphs where they apply."""
        kv_heads = max(1, self.spec.num_kv_heads // self.tp_size)
        pool = KVPool(
            self.stage.num_layers, num_blocks, self.config.block_size, kv_heads, self.spec.head_dim,
            self.kv_cache_dtype, self.device,
        )
        self.runner = ModelRunner(
            self.model, pool, self.spec.vocab_size, self.device, self.config.max_num_seqs, self.grammar_compiler
        )
        if capture_graphs and self._uses_cuda_graphs():
            self._capture_decode_graphs()

    def _uses_cuda_graphs(self) -> bool:
        # Tensor parallelism would put its all-reduces inside the graph (NCCL capture): not done yet. Pipeline
        # stages run eagerly too for now (a graph would need a static intermediate-state input).
        return (
            self.device.type == "cuda"
            and not self.config.enforce_eager
            and self.world_size == 1
            and self.stage.count == 1
            and not getattr(self.model, "uses_dynamic_rope", False)  # its tables depend on the step's lengths
        )

    def _capture_decode_graphs(self) -> None:
        graphs = DecodeGraphs(
            self.model,
            self.config.max_num_seqs,
            max_blocks_per_seq=-(-self.max_model_len // self.config.block_size),
            max_model_len=self.max_model_len,
            device=self.device,
        )
        try:
            graphs.capture()
        except Exception:  # a model whose forward cannot be captured still serves, eagerly
            logger.exception("capturing CUDA graphs failed; decode steps run eagerly")
            return
        self.runner.graphs = graphs

    # ------------------------------------------------------------ structured outputs
    def grammar_compiler(self) -> GrammarCompiler:
        """This rank's grammar compiler, made on first use (it loads the tokenizer): the engine's stop ids end
        every grammar, as they end every sequence."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                from transformers import AutoTokenizer

                from rayinfer.workers.model_config import stop_token_ids

                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(self.config)))
                self._grammar_compiler = GrammarCompiler(
                    tokenizer, self.spec.vocab_size, stop_token_ids(self.spec, tokenizer)
                )
            return self._grammar_compiler

    def prepare_grammar(self, spec: GrammarSpec) -> tuple[str, str] | None:
        """Compiles `spec` ahead of its sequences (called beside the step loop, not in it); returns (the
        constraint's kind, why) when it cannot be compiled."""
        try:
            self.grammar_compiler().compile(spec)
        except GrammarError as exc:
            return exc.kind, str(exc)
        return None

    # ------------------------------------------------------------ steps
    def execute(
        self, plan: StepPlan, intermediate: IntermediateState | None = None
    ) -> StepOutput | IntermediateState | None:
        """Applies the plan's changes, runs the step; rank 0 returns the drawn tokens (and the logprobs asked
        for), other ranks None.

        Pipeline stages: a stage after the first takes the previous stage's `intermediate`; a stage before the
        last returns its `IntermediateState` on every rank (None for a plan without chunks) and draws nothing, so
        it learns the tokens the last stage drew through `record_samples` before a plan that reads them."""
        self.sequences.apply(plan)
        if self.stage.is_last:  # only the last stage draws
            self.runner.sampling_batch.apply(plan)
            self.runner.grammars.apply(plan)
        if plan.block_copies:
            self.runner.kv_pool.copy_blocks(plan.block_copies)
        if not plan.chunks:
            output = StepOutput([]) if self.stage.is_last else None
        else:
            output = self.runner.execute(plan, self.sequences, with_logprobs=self.tp_rank == 0,
                                         intermediate=intermediate)
        if not self.stage.is_last:
            return output
        # Every rank draws (same logits, same counter-based randomness, so the same tokens): each then knows
        # the tokens that fill the next step's pending inputs without a broadcast.
        self.record_samples(plan, output.token_ids)
        return output if self.tp_rank == 0 else None

    def run_step(self, plan: StepPlan) -> StepOutput | None:
        """A step as the executors send it: a pipeline stage first takes the previous stage's output for it, and
        hands its own to the next; only the last stage answers with tokens (its first rank)."""
        if self.stage_link is None:
            return self.execute(plan)
        intermediate = self.stage_link.receive(plan)
        started = time.perf_counter()
        output = self.execute(plan, intermediate)
        self.stage_timing.add(started, time.perf_counter())
        if not self.stage.is_last:
            self.stage_link.send(output)
            return None
        return output

    def stage_timings(self) -> tuple[float, float, int]:
        """(seconds computing, seconds since the first step timed began, steps) since the last reset: a pipeline
        stage's busy share, whose complement is its bubble (scripts/bench_pipeline.py)."""
        return self.stage_timing.busy_s, self.stage_timing.span_s, self.stage_timing.steps

    def reset_stage_timings(self) -> None:
        self.stage_timing = StageTiming()

    def record_samples(self, plan: StepPlan, token_ids: list[int]) -> None:
        """Appends the tokens drawn for `plan`'s sampling chunks (in their order) to their sequences; a non-last
        pipeline stage is given the last stage's, so the pending tokens of later plans can be filled."""
        self.sequences.record_samples(plan, token_ids)

    def num_sequences(self) -> int:
        """How many sequences this worker holds state for (all are dropped once their requests end)."""
        return len(self.sequences)

    def shutdown(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
