"""A request that breaks the worker group fails alone: the engine over an executor that fails every step holding
a "poison" request, and the restart budget over time."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.engine import Engine
from rayinfer.scheduler.failure_triage import FailureTriage
from rayinfer.scheduler.sampling_params import SamplingParams
from rayinfer.scheduler.sequence import Request
from rayinfer.workers.executor_interface import Executor, WorkerGroupFailure
from rayinfer.workers.step_plan import StepPlan

POISON = 13  # a request whose prompt starts with this id fails every step it is in
TOKEN = 7


class PoisonExecutor(Executor):
    """Answers TOKEN for every sampling chunk; raises WorkerGroupFailure for any step holding a poison sequence
    (or every step, with `fail_all`). Checks that a step never holds two suspects."""

    def __init__(self, config, spec, max_model_len, max_num_batched_tokens, engine_id, fail_all=False) -> None:
        self.num_blocks = 64
        self.engine: Engine | None = None
        self.fail_all = fail_all
        self.num_restarts = 0
        self.steps_with_suspects: list[list[str]] = []

    def _request_of(self, seq_id: int) -> Request:
        return next(r for r in self.engine.requests.values() if any(s.seq_id == seq_id for s in r.seqs))

    def execute(self, plan: StepPlan) -> list[int]:
        if not plan.chunks:
            return []
        requests = {r.request_id: r for r in (self._request_of(c.seq_id) for c in plan.chunks)}
        suspects = [rid for rid, r in requests.items() if r.suspect_until is not None]
        assert len(suspects) <= 1, f"two suspects in one step: {suspects}"
        self.steps_with_suspects.append(suspects)
        if self.fail_all or any(r.prompt_token_ids[0] == POISON for r in requests.values()):
            raise WorkerGroupFailure("worker rank 0 failed: IndexError: index out of range")
        return [TOKEN for chunk in plan.chunks if chunk.sample]

    def restart(self) -> None:
        self.num_restarts += 1


def make_engine(model_dir: Path, fail_all: bool = False, **config) -> Engine:
    engine = Engine(
        EngineConfig(model=str(model_dir), max_model_len=128, max_num_batched_tokens=64, **config),
        executor_factory=functools.partial(PoisonExecutor, fail_all=fail_all),
    )
    engine.executor.engine = engine
    return engine


def test_a_poison_request_fails_alone_and_the_others_finish(llama_dir: Path, run_to_end) -> None:
    engine = make_engine(llama_dir)
    honest = {f"ok-{i}": [20 + i] * (5 + 7 * i) for i in range(3)}  # prompts long enough to take several chunks
    engine.add_request("ok-0", None, SamplingParams(max_tokens=6), prompt_token_ids=honest["ok-0"])
    engine.add_request("poison", None, SamplingParams(max_tokens=6, n=2), prompt_token_ids=[POISON] + [30] * 40)
    for rid in ("ok-1", "ok-2"):
        engine.add_request(rid, None, SamplingParams(max_tokens=6), prompt_token_ids=honest[rid])
    finals = run_to_end(engine, max_steps=500)
    bad = finals["poison"]
    assert bad.error is not None and "failed the worker group twice" in bad.error and "IndexError" in bad.error
    assert {o.finish_reason for o in bad.outputs} == {"error"}
    for rid in honest:
        assert finals[rid].error is None
        assert finals[rid].outputs[0].token_ids == [TOKEN] * 6 and finals[rid].outputs[0].finish_reason == "length"
    assert engine.executor.num_restarts == 2  # the first failure marks suspects; the second names the poison
    assert engine.failure is None and not engine.requests
    assert engine.num_free_blocks == engine.block_manager.num_blocks
    # The suspects were recomputed one at a time, and each was cleared once it had drawn a token.
    assert any(engine.executor.steps_with_suspects) and not any(r.suspect_until for r in engine.requests.values())


def test_restarts_past_the_budget_fail_the_engine(llama_dir: Path, run_to_end) -> None:
    engine = make_engine(llama_dir, fail_all=True, max_worker_restarts_per_minute=2)
    for i in range(3):
        engine.add_request(f"r{i}", None, SamplingParams(max_tokens=4), prompt_token_ids=[20 + i] * 4)
    finals = run_to_end(engine, max_steps=500)
    assert engine.executor.num_restarts == 2
    assert engine.failure is not None and "max_worker_restarts_per_minute" in engine.failure
    assert all(out.error for out in finals.values()) and len(finals) == 3
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def _request(rid: str, drawn: int = 0) -> Request:
    params = SamplingParams(max_tokens=8)
    request = Request(rid, None, [1, 2], params, arrival=0, max_tokens=8, stop_token_ids=frozenset(),
                      eos_token_ids=frozenset())
    from rayinfer.scheduler.sequence import Sequence

    seq = Sequence(seq_id=hash(rid) & 0xFFFF, request=request, index=0, seed=0, token_ids=[1, 2], num_prompt_tokens=2)
    seq.output_token_ids.extend([TOKEN] * drawn)
    request.seqs.append(seq)
    return request


def test_blame_marks_a_first_failure_and_names_a_lone_suspect() -> None:
    triage = FailureTriage(max_restarts_per_minute=5)
    a, b = _request("a", drawn=3), _request("b")
    assert triage.blame([a, b, a]) == []  # a first failure: both become suspects, marked one token ahead
    assert (a.suspect_until, b.suspect_until) == (4, 1)
    assert triage.blame([a, b]) == []  # two suspects in one step cannot be told apart
    assert triage.blame([a, _request("fresh")]) == [a]
    a.seqs[0].output_token_ids.append(TOKEN)
    FailureTriage.note_progress(a)
    assert a.suspect_until is None


def test_the_restart_budget_is_per_minute() -> None:
    now = [0.0]
    triage = FailureTriage(max_restarts_per_minute=2, clock=lambda: now[0])
    assert triage.may_restart() and triage.may_restart()
    assert not triage.may_restart()
    now[0] = 59.0
    assert not triage.may_restart()
    now[0] = 60.5
    assert triage.may_restart()


@pytest.mark.parametrize("field", ["stop_token_ids", "logit_bias", "allowed_token_ids"])
def test_out_of_vocab_ids_in_any_field_are_refused_by_the_engine(llama_dir: Path, field: str) -> None:
    engine = make_engine(llama_dir)
    vocab = engine.model_spec.vocab_size
    value = {vocab: 1.0} if field == "logit_bias" else [vocab]
    with pytest.raises(ValueError, match=rf"{field}: token ids must be in \[0, {vocab}\)") as info:
        engine.add_request("r", None, SamplingParams(min_tokens=1, **{field: value}), prompt_token_ids=[20])
    assert info.value.field == field and not engine.requests


def test_stop_strings_are_capped_in_number_and_length(llama_dir: Path, run_to_end) -> None:
    engine = make_engine(llama_dir, max_stop_strings=2, max_stop_string_length=5)
    with pytest.raises(ValueError, match="3 stop strings given; this engine's max_stop_strings is 2"):
        engine.add_request("r", None, SamplingParams(stop=["a", "b", "c"]), prompt_token_ids=[20])
    with pytest.raises(ValueError, match="6 characters is too long; this engine's max_stop_string_length is 5"):
        engine.add_request("r", None, SamplingParams(stop=["abcdef"]), prompt_token_ids=[20])
    engine.add_request("r", None, SamplingParams(stop=["a", "abcde"], max_tokens=2), prompt_token_ids=[20])
    assert run_to_end(engine, max_steps=500)["r"].outputs[0].token_ids == [TOKEN, TOKEN]


def test_stats_count_requests_and_sequences_apart(llama_dir: Path, run_to_end) -> None:
    """(Here for the fake executor.) An n=4 request is one running request of four sequences."""
    engine = make_engine(llama_dir)
    engine.add_request("four", None, SamplingParams(n=4, temperature=1.0, max_tokens=8), prompt_token_ids=[20] * 5)
    engine.add_request("one", None, SamplingParams(max_tokens=8), prompt_token_ids=[21] * 5)
    stats = engine.stats()
    assert (stats["num_running"], stats["num_waiting"]) == (0, 2)
    for _ in range(3):  # the prompts, the fork, a token each
        engine.step()
    stats = engine.stats()
    assert (stats["num_running"], stats["num_waiting"]) == (2, 0)
    assert (stats["num_running_sequences"], stats["num_waiting_sequences"]) == (5, 0)
    run_to_end(engine, max_steps=500)
    assert engine.stats()["num_running"] == engine.stats()["num_running_sequences"] == 0
