"""A model cut into pipeline stages in one process: each stage holds only its own layers, weights and KV pool, and
the stages' forwards chained through their workers give the unsplit model's logits bit for bit (float32, CPU)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from rayinfer.configs import EngineConfig
from rayinfer.workers.model_config import PIPELINE_PARALLEL_ARCHITECTURES, check_pipeline_parallel, load_model_spec
from rayinfer.workers.models import MODEL_REGISTRY
from rayinfer.workers.models.pipeline import IntermediateState
from rayinfer.workers.parallel_state import (
    PipelineStage,
    pipeline_layer_ranges,
    pipeline_stage,
    pipeline_stage_for,
    set_pipeline_stage,
)
from rayinfer.workers.sampling_options import SamplingOptions
from rayinfer.workers.step_output import StepOutput
from rayinfer.workers.step_plan import PENDING_TOKEN, NewSequence, SampleRequest, SequenceChunk, StepPlan
from rayinfer.workers.tiny_checkpoint.quantized import write_quantized_checkpoint
from rayinfer.workers.weight_loader import build_model
from rayinfer.workers.worker import Worker

BLOCK_SIZE = 4
PROMPTS = {0: [5, 17, 9, 30, 2, 11, 23], 1: [8, 3, 40, 12, 6]}  # seq_id -> prompt ids


@pytest.fixture(autouse=True)
def _no_stage_left_set():
    yield
    set_pipeline_stage(None)


# ------------------------------------------------------------ the split
def test_default_split_gives_the_remainder_to_the_stages_before_the_last() -> None:
    assert pipeline_layer_ranges(4, 1) == [(0, 4)]
    assert pipeline_layer_ranges(4, 2) == [(0, 2), (2, 4)]
    assert pipeline_layer_ranges(3, 2) == [(0, 2), (2, 3)]
    assert pipeline_layer_ranges(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert pipeline_layer_ranges(9, 4) == [(0, 2), (2, 4), (4, 7), (7, 9)]
    assert pipeline_layer_ranges(5, 3, [1, 3, 1]) == [(0, 1), (1, 4), (4, 5)]
    stage = pipeline_stage_for(1, 3, 5, [1, 3, 1])
    assert stage == PipelineStage(1, 3, 1, 4) and stage.num_layers == 3
    assert not stage.is_first and not stage.is_last and stage.owns(1) and stage.owns(3) and not stage.owns(4)


@pytest.mark.parametrize(
    ("num_layers", "pp_size", "partition", "field", "problem"),
    [
        (5, 3, [2, 3], "pipeline_layer_partition", "2 entries"),
        (5, 2, [2, 2], "pipeline_layer_partition", "sums to 4"),
        (5, 3, [3, 2, 0], "pipeline_layer_partition", "at least one"),
        (5, 2, [2.5, 2.5], "pipeline_layer_partition", "whole number"),
        (2, 3, None, "pipeline_parallel_size", "exceeds the model's 2 layers"),
        (2, 0, None, "pipeline_parallel_size", "at least 1"),
    ],
)
def test_bad_splits_name_the_field_and_the_problem(num_layers, pp_size, partition, field, problem) -> None:
    with pytest.raises(ValueError, match=field) as caught:
        pipeline_layer_ranges(num_layers, pp_size, partition)
    assert problem in str(caught.value)


def test_a_stage_set_for_another_model_is_refused_and_none_means_the_whole_model() -> None:
    assert pipeline_stage(7) == PipelineStage(0, 1, 0, 7)
    set_pipeline_stage(pipeline_stage_for(1, 2, 6))
    with pytest.raises(ValueError, match="does not fit a model of 5 layers"):
        pipeline_stage(5)
    set_pipeline_stage(None)
    assert pipeline_stage(5).is_last


# ------------------------------------------------------------ what is refused
def test_supported_architectures_are_the_classes_that_build_stages() -> None:
    building = {arch for arch, cls in MODEL_REGISTRY.items() if getattr(cls, "supports_pipeline_parallel", False)}
    assert building == set(PIPELINE_PARALLEL_ARCHITECTURES)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "bloom", "gpt_neox", "gptj", "falcon", "phi", "gpt_bigcode"])
def test_architectures_without_stages_are_refused_naming_the_field(arch: str, tiny_checkpoint) -> None:
    model_dir = tiny_checkpoint(arch)
    spec = load_model_spec(model_dir)
    check_pipeline_parallel(spec, 1)
    with pytest.raises(ValueError, match=f"pipeline_parallel_size 2: {spec.architecture}"):
        check_pipeline_parallel(spec, 2)
    set_pipeline_stage(pipeline_stage_for(0, 2, spec.num_layers))  # the worker-side guard, for a caller that skipped it
    with pytest.raises(ValueError, match="pipeline_parallel_size 2"):
        build_model(spec, model_dir, torch.float32, torch.device("cpu"), 64)


def test_check_pipeline_parallel_checks_the_split(tiny_checkpoint) -> None:
    spec = load_model_spec(tiny_checkpoint("llama"))  # two layers
    check_pipeline_parallel(spec, 2)
    check_pipeline_parallel(spec, 2, [1, 1])
    with pytest.raises(ValueError, match="pipeline_layer_partition"):
        check_pipeline_parallel(spec, 2, [2, 1])


# ------------------------------------------------------------ stages through their workers
def _stages(num_layers: int, count: int, partition: list[int] | None) -> list[PipelineStage | None]:
    if count == 1:
        return [None]
    return [pipeline_stage_for(i, count, num_layers, partition) for i in range(count)]


def _workers(model_dir: Path, stages: list[PipelineStage | None], **config: object) -> list[Worker]:
    spec = load_model_spec(model_dir)
    engine = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", block_size=BLOCK_SIZE, **config)
    workers = []
    for stage in stages:
        worker = Worker(engine, spec, max_model_len=64, max_num_batched_tokens=64, stage=stage)
        worker.init_distributed("", 0)
        worker.load_model()
        worker.init_cache(num_blocks=12)
        workers.append(worker)
    return workers


def _spy_logits(worker: Worker) -> list[torch.Tensor]:
    """Records every logits tensor the worker's model computes (the runner calls model.compute_logits)."""
    seen: list[torch.Tensor] = []
    compute = worker.model.compute_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(compute(hidden))
        return seen[-1]

    worker.model.compute_logits = recording
    return seen


def _plans() -> list[StepPlan]:
    """Prefill of both prompts, then two decode steps whose inputs are the tokens still pending at planning."""
    def greedy() -> SampleRequest:
        return SampleRequest(SamplingOptions(logprobs=3), seed=0, prompt_token_ids=[], output_token_ids=[],
                             stop_ids_for_min_tokens=[])

    prefill = StepPlan(
        chunks=[SequenceChunk(s, p, 0, [2 * s, 2 * s + 1], reset_blocks=True, sample=True) for s, p in PROMPTS.items()],
        new_sequences=[NewSequence(s, len(p), greedy()) for s, p in PROMPTS.items()],
    )
    decodes = [
        StepPlan(chunks=[
            SequenceChunk(s, [PENDING_TOKEN], len(p) + i, [4 + s] if len(p) + i == 2 * BLOCK_SIZE else [],
                          reset_blocks=False, sample=True)
            for s, p in PROMPTS.items()
        ])
        for i in range(2)
    ]
    return [prefill, *decodes]


def _run(workers: list[Worker], plan: StepPlan) -> StepOutput:
    """One step down the pipeline, each stage given its own copy of the plan (as each worker unpickles its own);
    the earlier stages then learn the drawn tokens, which fill the next plan's pending inputs."""
    state = None
    for worker in workers:
        result = worker.execute(copy.deepcopy(plan), state)
        if worker is not workers[-1]:
            assert isinstance(result, IntermediateState)
            assert result.hidden.shape == result.residual.shape == (plan.num_tokens, worker.spec.hidden_size)
            state = result
    assert isinstance(result, StepOutput)
    for worker in workers[:-1]:
        worker.record_samples(plan, result.token_ids)
    return result


def _generate(workers: list[Worker]) -> tuple[list[torch.Tensor], list[StepOutput]]:
    logits = _spy_logits(workers[-1])
    return logits, [_run(workers, plan) for plan in _plans()]


ARCHS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "gemma2": ("gemma2", {}),  # soft-capped attention and logits; ties its embeddings
    "qwen3": ("qwen3", {}),
}
SPLITS = {"2-stages": (2, None), "3-stages-1-3-1": (3, [1, 3, 1]), "3-stages-default": (3, None)}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("name", list(ARCHS))
def test_chained_stages_give_the_whole_models_logits(name: str, split: str, tiny_checkpoint) -> None:
    arch, overrides = ARCHS[name]
    model_dir = tiny_checkpoint(arch, num_hidden_layers=5, **overrides)
    count, partition = SPLITS[split]
    whole_logits, whole_out = _generate(_workers(model_dir, [None]))
    staged_logits, staged_out = _generate(_workers(model_dir, _stages(5, count, partition)))
    assert len(staged_logits) == len(whole_logits) == 3  # prefill, then two decode steps
    for ours, theirs in zip(staged_logits, whole_logits):
        assert torch.equal(ours, theirs)
    assert [o.token_ids for o in staged_out] == [o.token_ids for o in whole_out]
    assert [o.logprobs for o in staged_out] == [o.logprobs for o in whole_out]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_each_stage_holds_only_its_parameters_and_kv_layers(tied: bool, tiny_checkpoint) -> None:
    model_dir = tiny_checkpoint("llama", num_hidden_layers=5, tie_word_embeddings=tied)
    whole, *stages = _workers(model_dir, [None, *_stages(5, 3, [1, 3, 1])])
    spec = whole.spec
    for worker in stages:
        stage, names = worker.stage, dict(worker.model.named_parameters())
        layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert layers == set(range(stage.first_layer, stage.end_layer))
        assert ("model.embed_tokens.weight" in names) == stage.is_first
        assert ("lm_head.weight" in names) == stage.is_last
        assert ("model.norm.weight" in names) == stage.is_last
        assert len(worker.runner.kv_pool.layers) == stage.num_layers
    whole_params = sum(p.numel() for p in whole.model.parameters())  # a tied head counts once
    staged_params = sum(p.numel() for w in stages for p in w.model.parameters())
    # Tied: the last stage keeps its own copy of the embedding for its LM head.
    assert staged_params == whole_params + (spec.vocab_size * spec.hidden_size if tied else 0)
    last = stages[-1].model
    head = whole.model.model.embed_tokens if tied else whole.model.lm_head
    assert torch.equal(last.lm_head.weight, head.weight)


def test_a_stage_with_fewer_layers_gets_more_blocks_from_the_same_memory(tiny_checkpoint) -> None:
    model_dir = tiny_checkpoint("llama", num_hidden_layers=5)
    budget = 1 << 20
    whole, first, last = _workers(model_dir, [None, *_stages(5, 2, [4, 1])], kv_cache_memory_bytes=budget)
    per_layer = whole._block_bytes() // 5
    assert first._block_bytes() == 4 * per_layer and last._block_bytes() == per_layer
    assert [w.num_available_blocks() for w in (whole, first, last)] == [budget // (n * per_layer) for n in (5, 4, 1)]


def test_the_profiling_step_runs_on_every_stage(tiny_checkpoint) -> None:
    model_dir = tiny_checkpoint("llama", num_hidden_layers=5)
    for worker in _workers(model_dir, _stages(5, 3, None)):
        assert worker.run_largest_step() == 16 + 1  # a sequence of 63 tokens (16 blocks), then one of 1
        assert not worker.sequences


def test_a_later_stage_without_the_previous_state_says_so(tiny_checkpoint) -> None:
    model_dir = tiny_checkpoint("llama", num_hidden_layers=5)
    _, last = _workers(model_dir, _stages(5, 2, None))
    with pytest.raises(ValueError, match="needs the previous stage's IntermediateState"):
        last.execute(copy.deepcopy(_plans()[0]))


@pytest.mark.parametrize("fmt", ["awq", "fp8"])
def test_quantised_checkpoints_load_per_stage(fmt: str, tiny_checkpoint, tmp_path: Path) -> None:
    quant_dir, _ = write_quantized_checkpoint(tiny_checkpoint("llama", num_hidden_layers=3), tmp_path, fmt)
    whole_logits, _ = _generate(_workers(quant_dir, [None]))
    staged = _workers(quant_dir, _stages(3, 2, None))
    for worker in staged:  # each stage quantised only its own layers' linears (4 per layer)
        linears = [n for n, m in worker.model.named_modules() if getattr(m, "quantized", None) is not None]
        assert len(linears) == 4 * worker.stage.num_layers
    staged_logits, _ = _generate(staged)
    for ours, theirs in zip(staged_logits, whole_logits, strict=True):
        assert torch.equal(ours, theirs)
