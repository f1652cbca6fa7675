"""Structured outputs through the engine, on the random-weight tiny Llama at temperature 1 (noise unless
constrained): every finished output validates against its JSON schema (`jsonschema`), fullmatches its regex or
is one of its choices, with n > 1, under preemption by a small pool with prefix caching on, and streamed."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rayinfer.cluster import LLM, SamplingParams, StructuredOutputsParams
from rayinfer.scheduler.request_errors import InvalidRequestError

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = {
    "nested-object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50},
                                                       "y": {"type": "number", "minimum": 0, "maximum": 1}},
                      "required": ["x", "y"]},
        },
        "required": ["name", "point"],
    },
    "bounded-array-enum": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2,
                                "maxItems": 4},
                       "level": {"enum": [1, 2, 3, "max"]}},
        "required": ["tags", "level"],
    },
    "anyof-const-nullable": {
        "type": "object",
        "properties": {"kind": {"const": "event"},
                       "id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "boolean"}]},
                       "note": {"type": ["string", "null"], "maxLength": 6}},
        "required": ["kind", "id", "note"],
    },
    "pattern-and-top-level-array": {
        "type": "array",
        "items": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                                                   "ok": {"type": "boolean"}},
                  "required": ["code", "ok"]},
        "minItems": 1, "maxItems": 3,
    },
}
PROMPTS = [[0, 45, 74, 81, 315, 279], [0, 273, 455, 479, 268, 87, 485, 83], [0, 52, 83, 405]]


def _finished(outputs) -> list[str]:
    """The texts of the sequences that ended where their grammar does (finish reason "stop"); most must."""
    completions = [c for out in outputs for c in out.outputs]
    done = [c.text for c in completions if c.finish_reason == "stop"]
    assert len(done) >= 0.75 * len(completions), [(c.finish_reason, c.text) for c in completions]
    return done


@pytest.fixture(scope="module")
def llm(llama_dir: Path):
    engine = LLM(str(llama_dir), dtype="float32", max_num_seqs=16)
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate(llm, name: str) -> None:
    schema = SCHEMAS[name]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=160,
                            structured_outputs=StructuredOutputsParams(json=schema))
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for text in _finished(outputs):
        jsonschema.validate(json.loads(text), schema)


def test_regex_choice_grammar_and_json_object(llm) -> None:
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    pattern = r"(ab|cd)[0-9]{2,4}-[xyz]+\."
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=64,
                            structured_outputs=StructuredOutputsParams(regex=pattern))
    assert all(re.fullmatch(pattern, text) for text in _finished(llm.generate(prompts, params, use_tqdm=False)))

    choices = ["alpha", "beta gamma", "δ (delta)"]
    params = SamplingParams(n=4, temperature=1.0, seed=4, max_tokens=32,
                            structured_outputs=StructuredOutputsParams(choice=choices))
    drawn = _finished(llm.generate(prompts, params, use_tqdm=False))
    assert set(drawn) <= set(choices) and len(set(drawn)) > 1

    grammar = 'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=64,
                            structured_outputs=StructuredOutputsParams(grammar=grammar))
    for text in _finished(llm.generate(prompts, params, use_tqdm=False)):
        assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", text)

    params = SamplingParams(temperature=1.0, seed=6, max_tokens=200,
                            structured_outputs=StructuredOutputsParams(json_object=True))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for text in [c.text for out in outputs for c in out.outputs if c.finish_reason == "stop"]:
        assert isinstance(json.loads(text), (dict, list))


def test_the_grammar_ends_the_sequence_whatever_else_is_asked(llm) -> None:
    """ignore_eos cannot run a grammar past its end, and min_tokens (which bans EOS) or allowed_token_ids that
    leave the grammar nothing give way to it; constrained and plain rows share steps."""
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    choice = StructuredOutputsParams(choice=["yes", "no"])
    cases = [
        SamplingParams(temperature=1.0, seed=1, max_tokens=30, ignore_eos=True, structured_outputs=choice),
        SamplingParams(temperature=1.0, seed=2, max_tokens=30, min_tokens=20, structured_outputs=choice),
        SamplingParams(temperature=0.0, max_tokens=30, allowed_token_ids=[5, 6, 7], structured_outputs=choice),
        SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True),
    ]
    outputs = llm.generate(prompts + prompts[:1], cases, use_tqdm=False)
    for out in outputs[:3]:
        assert out.outputs[0].text in ("yes", "no") and out.outputs[0].finish_reason == "stop"
    assert len(outputs[3].outputs[0].token_ids) == 12  # the plain row beside them runs as before


def test_logprobs_stay_those_of_the_raw_logits(llm) -> None:
    """The mask changes what is drawn, not the logprobs reported (vLLM's semantics)."""
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2,
                            structured_outputs=StructuredOutputsParams(regex="[0-9]{6}"))
    completion = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)[0].outputs[0]
    assert re.fullmatch("[0-9]{6}", completion.text)
    top_rank = [entry[token].rank for entry, token in zip(completion.logprobs, completion.token_ids)]
    assert any(rank != 1 for rank in top_rank)  # a digit is rarely the raw argmax of a random model


@pytest.mark.parametrize(
    ("constraint", "field", "words"),
    [
        (dict(json={"type": "object", "properties": {"a": {"type": "strin"}}}), "structured_outputs.json", "strin"),
        (dict(regex="([a-z]"), "structured_outputs.regex", "parenthesis"),
        (dict(grammar='root ::= "a" missing'), "structured_outputs.grammar", "missing"),
    ],
    ids=["schema", "regex", "grammar"],
)
def test_a_constraint_that_does_not_compile_is_refused_naming_it(llm, constraint, field: str, words: str) -> None:
    params = SamplingParams(structured_outputs=StructuredOutputsParams(**constraint))
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)
    assert info.value.field == field and words in str(info.value)
    assert not llm.engine.requests and llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks


def test_valid_under_preemption_with_prefix_caching(llama_dir: Path) -> None:
    """A pool of a few blocks preempts sequences mid-output (they are recomputed, their matchers kept), and
    shared prompt blocks come from the prefix cache; n=2 forks share the prompt."""
    from rayinfer.workers.kv_pool import bytes_per_block
    from rayinfer.workers.model_config import load_model_spec

    spec = load_model_spec(llama_dir)
    block_bytes = bytes_per_block(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim, torch.float32)
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory_bytes=12 * block_bytes, max_num_batched_tokens=32,
              enable_prefix_caching=True)
    schema = SCHEMAS["bounded-array-enum"]
    params = SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(json=schema))
    prompts = [{"prompt_token_ids": PROMPTS[i % 3] + [100 + i]} for i in range(8)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    engine = llm.engine
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.num_prefix_hits > 0
    for text in _finished(outputs):
        jsonschema.validate(json.loads(text), schema)
    assert engine.num_free_blocks == engine.block_manager.num_blocks
    llm.shutdown()


def test_streamed_deltas_join_to_valid_json(llm, stream_deltas) -> None:
    schema = SCHEMAS["nested-object"]
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=160,
                            structured_outputs=StructuredOutputsParams(json=schema))
    llm.engine.add_request("streamed", None, params, prompt_token_ids=PROMPTS[1])
    deltas, final = stream_deltas(llm.engine, params)
    assert len(deltas) > 3  # it did stream, token by token
    text = "".join(delta.outputs[0].text for delta in deltas if delta.outputs)
    assert final.outputs[0].finish_reason == "stop" and text == final.outputs[0].text
    jsonschema.validate(json.loads(text), schema)


def test_tensor_parallel_ranks_mask_alike(llm, llama_dir: Path, ray_session) -> None:
    """Both ranks of a TP=2 engine on Ray compile the grammar (beside their step loop, before the request runs) and
    mask alike: greedy constrained outputs equal the single-rank engine's token for token (a rank that masked
    differently would feed the other rank different tokens), and sampled ones validate."""
    schema = SCHEMAS["anyof-const-nullable"]
    constraint = StructuredOutputsParams(json=schema)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    greedy = SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=constraint)
    sampled = SamplingParams(n=2, temperature=1.0, seed=21, max_tokens=80, structured_outputs=constraint)
    tp = LLM(str(llama_dir), dtype="float32", tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        expected = [out.outputs[0].token_ids for out in llm.generate(prompts, greedy, use_tqdm=False)]
        assert [out.outputs[0].token_ids for out in tp.generate(prompts, greedy, use_tqdm=False)] == expected
        for text in _finished(tp.generate(prompts, sampled, use_tqdm=False)):
            jsonschema.validate(json.loads(text), schema)
        with pytest.raises(InvalidRequestError, match="structured_outputs.regex"):
            tp.generate(prompts[:1], SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-")))
    finally:
        tp.shutdown()


def test_a_fresh_worker_group_resumes_each_grammar_where_its_text_stands(llm, llama_dir: Path) -> None:
    """The worker is lost mid-output and replaced by one that holds nothing (no matchers, no compiled grammars):
    the sequences sent to it again replay their outputs into new matchers, so greedy outputs equal an undisturbed
    run's token for token."""
    import functools

    from rayinfer.configs import EngineConfig
    from rayinfer.scheduler.engine import Engine
    from rayinfer.workers.executor import InProcessExecutor
    from rayinfer.workers.executor_interface import WorkerGroupFailure

    class LosesItsWorkerOnce(InProcessExecutor):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.rebuild, self.steps = functools.partial(InProcessExecutor.__init__, self, *args, **kwargs), 0

        def execute(self, plan):
            self.steps += 1
            if self.steps == 6:
                raise WorkerGroupFailure("rank 0 died")
            return super().execute(plan)

        def restart(self) -> None:
            self.rebuild()

    schema = SCHEMAS["nested-object"]
    params = SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=schema))
    expected = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                                             use_tqdm=False)]
    engine = Engine(EngineConfig(model=str(llama_dir), dtype="float32"), executor_factory=LosesItsWorkerOnce)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), None, params, prompt_token_ids=prompt)
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
    assert engine.executor.steps > 6 and engine.failure is None
    assert [outputs[str(i)] for i in range(len(PROMPTS))] == expected
