"""best_of on the real tiny model: a request runs best_of sequences (forked from one prompt, as n does) and
returns the n of highest cumulative logprob, best first, renumbered 0..n-1 (vLLM v0). The ranking needs each
drawn token's logprob, which the workers return even when the user asked for none; the user still sees none."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.engine import Engine
from rayinfer.scheduler.outputs import OutputAssembler, RequestOutput
from rayinfer.scheduler.sampling_params import SamplingParams

# Stopping on a tenth of the vocabulary ends some sequences early, so lengths and finish reasons differ.
STOP_IDS = list(range(6, 56))
BASE = dict(temperature=1.0, seed=7, max_tokens=10, stop_token_ids=STOP_IDS)


@pytest.fixture(scope="module")
def engine(llama_dir: Path) -> Engine:
    return Engine(EngineConfig(model=str(llama_dir), dtype="float32", block_size=4, max_num_seqs=8))


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    rng = random.Random(5)
    return [rng.randrange(60, 500) for _ in range(13)]


def _run(engine: Engine, request_id: str, prompt: list[int], params: SamplingParams) -> RequestOutput:
    engine.add_request(request_id, None, params, prompt_token_ids=prompt)
    final, assembler = None, OutputAssembler()
    while engine.has_unfinished_requests():
        for delta in engine.step():
            output = assembler.add(delta)
            if output is not None and output.request_id == request_id:
                final = output
    assert engine.num_free_blocks == engine.block_manager.num_blocks  # every block came back
    return final


def _reference(engine: Engine, prompt: list[int], best_of: int, request_id: str) -> list:
    """The same seeded best_of sequences run as n=best_of with logprobs asked, sorted by cumulative logprob."""
    everyone = _run(engine, request_id, prompt, SamplingParams(n=best_of, logprobs=0, **BASE))
    assert len({tuple(c.token_ids) for c in everyone.outputs}) == best_of  # different draws to choose from
    return sorted(everyone.outputs, key=lambda c: -c.cumulative_logprob)


def test_best_of_returns_the_n_best_by_cumulative_logprob_without_exposing_logprobs(
    engine: Engine, prompt: list[int]
) -> None:
    ranked = _reference(engine, prompt, 5, "reference")
    assert len({c.finish_reason for c in ranked}) == 2  # some stopped early, some ran to max_tokens
    assert [c.index for c in ranked[:2]] != [0, 1]  # the best are not simply the first sequences
    out = _run(engine, "best-of", prompt, SamplingParams(n=2, best_of=5, **BASE))
    assert [c.index for c in out.outputs] == [0, 1]
    for got, want in zip(out.outputs, ranked[:2], strict=True):
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            want.token_ids, want.text, want.finish_reason, want.stop_reason,
        )
        assert got.cumulative_logprob is None and got.logprobs is None  # not asked for
    assert out.prompt_logprobs is None


def test_best_of_with_logprobs_shows_them_best_first(engine: Engine, prompt: list[int]) -> None:
    ranked = _reference(engine, prompt, 5, "reference-lp")
    out = _run(engine, "best-of-lp", prompt, SamplingParams(n=3, best_of=5, logprobs=2, **BASE))
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ranked[:3]]
    cumulative = [c.cumulative_logprob for c in out.outputs]
    assert cumulative == sorted(cumulative, reverse=True)
    for got, want in zip(out.outputs, ranked, strict=False):
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-6)
        assert len(got.logprobs) == len(got.token_ids) and all(len(entry) in (2, 3) for entry in got.logprobs)


def test_best_of_sequences_share_the_prompt_and_keep_only_the_sum(engine: Engine, prompt: list[int]) -> None:
    engine.add_request("shared", None, SamplingParams(n=1, best_of=4, **BASE), prompt_token_ids=prompt)
    request = engine.requests["shared"]
    assert len(request.seqs) == 4
    while not all(seq.output_token_ids for seq in request.seqs):
        engine.step()
    first_block = request.seqs[0].block_table[0]
    assert all(seq.block_table[0] == first_block for seq in request.seqs)  # forked: the prompt is stored once
    assert engine.block_manager.ref_count(first_block) == 4 - sum(seq.is_finished for seq in request.seqs)
    assert all(seq.logprobs is None for seq in request.seqs)  # no per-token dicts kept for an unasked request
    assert all(seq.cumulative_logprob < 0 for seq in request.seqs)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_a_best_of_stream_sends_only_the_final_output(engine: Engine, prompt: list[int], stream_deltas) -> None:
    params = SamplingParams(n=2, best_of=3, **BASE)
    engine.add_request("stream", None, params, prompt_token_ids=prompt)
    deltas, final = stream_deltas(engine, params)
    assert len(deltas) == 1 and deltas[0].finished
    assert [(c.index, c.token_ids, c.text) for c in deltas[0].outputs] == [
        (c.index, c.token_ids, c.text) for c in final.outputs
    ]
    # Without best_of, the same request streams as it goes.
    plain = SamplingParams(n=2, **BASE)
    engine.add_request("stream-plain", None, plain, prompt_token_ids=prompt)
    deltas, final = stream_deltas(engine, plain)
    assert len(deltas) > 1 and [d.finished for d in deltas].count(True) == 1


def test_aborting_a_best_of_request_returns_n_outputs(engine: Engine, prompt: list[int]) -> None:
    engine.add_request("abort", None, SamplingParams(n=2, best_of=4, **BASE), prompt_token_ids=prompt)
    for _ in range(3):
        engine.step()
    out = engine.abort_request("abort")
    assert out.finished and [c.index for c in out.outputs] == [0, 1]
    assert all(c.finish_reason in ("abort", "stop", "length") for c in out.outputs)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_best_of_is_validated(engine: Engine, prompt: list[int]) -> None:
    with pytest.raises(ValueError, match=r"best_of: 9 sequences cannot run together with max_num_seqs=8"):
        engine.add_request("too-many", None, SamplingParams(n=2, best_of=9, **BASE), prompt_token_ids=prompt)
    assert "too-many" not in engine.requests
    with pytest.raises(ValueError, match=r"best_of must equal n .* greedy sampling .*best_of=3, n=1"):
        SamplingParams(best_of=3, temperature=0.0)
    with pytest.raises(ValueError, match="best_of must be >= n"):
        SamplingParams(n=3, best_of=2)
    assert SamplingParams(n=2, best_of=2, temperature=0.0).num_sequences == 2  # best_of == n: plain n
    assert SamplingParams(n=2).num_sequences == 2 and SamplingParams(n=2, best_of=5).num_sequences == 5
