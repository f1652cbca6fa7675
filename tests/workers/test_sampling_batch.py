"""SamplingBatch: rows kept across steps give the tensors a fresh build gives, and the tensors the requests
describe, while sequences join, draw, finish and are sent again."""
from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
import torch

from rayinfer.workers.sampler import Sampler, SamplingTensors
from rayinfer.workers.sampling_batch import SamplingBatch, build_sampling_tensors
from rayinfer.workers.sampling_options import SamplingOptions
from rayinfer.workers.step_plan import NewSequence, SampleRequest, StepPlan

VOCAB = 48
STOP_IDS = [1, 2]
OPTIONS = [
    SamplingOptions(),  # greedy
    SamplingOptions(temperature=0.8, top_p=0.9),
    SamplingOptions(temperature=1.0, top_k=5),
    SamplingOptions(temperature=1.3, min_p=0.1),
    SamplingOptions(temperature=0.7, top_k=100),  # top_k >= vocab: off
    SamplingOptions(temperature=0.9, repetition_penalty=1.3),
    SamplingOptions(frequency_penalty=0.5, presence_penalty=-0.4),  # greedy with penalties
    SamplingOptions(temperature=0.6, repetition_penalty=0.8, frequency_penalty=0.2, presence_penalty=0.3),
    SamplingOptions(temperature=0.9, min_tokens=4),
    SamplingOptions(min_tokens=2, presence_penalty=1.0),
    SamplingOptions(temperature=1.1, allowed_token_ids=[3, 5, 8, 13, 21]),
    SamplingOptions(allowed_token_ids=[7]),
    SamplingOptions(temperature=0.8, logit_bias={4: 2.5, 9: -100.0, 30: 0.25}),
    SamplingOptions(temperature=1.0, top_p=0.5, logit_bias={6: 1.0}, allowed_token_ids=list(range(10, 40)),
                    repetition_penalty=1.1, min_tokens=3),
    SamplingOptions(allowed_token_ids=[]),  # empty: every id allowed
]


def _request(rng: random.Random, options: SamplingOptions, outputs: int = 0) -> SampleRequest:
    return SampleRequest(
        options,
        seed=rng.randrange(-(2**63), 2**64),
        prompt_token_ids=[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))],
        output_token_ids=[rng.randrange(VOCAB) for _ in range(outputs)],
        stop_ids_for_min_tokens=list(STOP_IDS) if options.min_tokens else [],
    )


def _mask(ids: torch.Tensor | None, rows: int) -> torch.Tensor:
    """[rows, V] bool of the ids listed per row (pad = VOCAB dropped); all False for None."""
    mask = torch.zeros(rows, VOCAB + 1, dtype=torch.bool)
    if ids is not None:
        mask.scatter_(1, ids.cpu(), True)
    return mask[:, :VOCAB]


def _dense(t: SamplingTensors) -> dict:
    """The tensors as comparable values: padded id lists become masks, whatever their widths."""
    rows = t.temperatures.shape[0]
    bias = torch.zeros(rows, VOCAB + 1)
    if t.logit_bias_ids is not None:
        bias.scatter_add_(1, t.logit_bias_ids.cpu(), t.logit_bias_values.cpu())
    out = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}
    out.update(
        banned_token_ids=(t.banned_token_ids is not None, _mask(t.banned_token_ids, rows)),
        allowed_token_ids=(t.allowed_token_ids is not None, _mask(t.allowed_token_ids, rows)),
        logit_bias_ids=(t.logit_bias_ids is not None, bias[:, :VOCAB]),
        logit_bias_values=None,
    )
    return out


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        mine = got[name]
        if isinstance(value, tuple):
            assert mine[0] == value[0], name
            assert torch.equal(mine[1], value[1]), name
        elif isinstance(value, torch.Tensor):
            assert isinstance(mine, torch.Tensor) and mine.dtype == value.dtype, name
            assert torch.equal(mine.cpu(), value.cpu()), name
        else:
            assert mine == value, name


def _described(requests: list[SampleRequest]) -> dict:
    """What the requests say the tensors hold, written out row by row (the per-step build's rules)."""
    rows = len(requests)
    p = [r.params for r in requests]
    greedy = [o.is_greedy for o in p]
    top_ks = [VOCAB if g or o.top_k <= 0 else min(o.top_k, VOCAB) for g, o in zip(greedy, p)]
    top_ps = [1.0 if g else o.top_p for g, o in zip(greedy, p)]
    min_ps = [0.0 if g else o.min_p for g, o in zip(greedy, p)]
    any_penalty = any(o.any_penalty for o in p)
    any_repetition = any(o.repetition_penalty != 1.0 for o in p)
    counts = torch.zeros(rows, VOCAB)
    seen = torch.zeros(rows, VOCAB, dtype=torch.bool)
    banned = torch.zeros(rows, VOCAB, dtype=torch.bool)
    allowed = torch.zeros(rows, VOCAB, dtype=torch.bool)
    bias = torch.zeros(rows, VOCAB)
    for i, r in enumerate(requests):
        if r.params.any_penalty:  # rows without a penalty may show zero counts: their penalties change nothing
            for token, n in Counter(r.output_token_ids).items():
                counts[i, token] = n
        if r.params.repetition_penalty != 1.0:
            seen[i, r.prompt_token_ids] = True
        if len(r.output_token_ids) < r.params.min_tokens:
            banned[i, r.stop_ids_for_min_tokens] = True
        allowed[i, r.params.allowed_token_ids or []] = True
        for token, value in (r.params.logit_bias or {}).items():
            bias[i, token] = value
    f32 = dict(dtype=torch.float32)
    restricted = torch.tensor([bool(o.allowed_token_ids) for o in p])
    return dict(
        temperatures=torch.tensor([0.0 if g else o.temperature for g, o in zip(greedy, p)], **f32),
        top_ks=torch.tensor(top_ks),
        top_ps=torch.tensor(top_ps, **f32),
        min_ps=torch.tensor(min_ps, **f32),
        presence_penalties=torch.tensor([o.presence_penalty for o in p], **f32),
        frequency_penalties=torch.tensor([o.frequency_penalty for o in p], **f32),
        repetition_penalties=torch.tensor([o.repetition_penalty for o in p], **f32),
        seeds=torch.tensor([(r.seed + 2**63) % 2**64 - 2**63 for r in requests]),
        output_positions=torch.tensor([len(r.output_token_ids) for r in requests]),
        prompt_seen=seen if any_repetition else None,
        output_counts=counts if any_penalty else None,
        banned_token_ids=(bool(banned.any()), banned),
        allowed_token_ids=(bool(restricted.any()), allowed),
        restricted_rows=restricted if restricted.any() else None,
        logit_bias_ids=(bool(bias.any()), bias),
        logit_bias_values=None,
        all_greedy=all(greedy),
        any_top_k=any(k < VOCAB for k in top_ks),
        any_top_p=any(x < 1.0 for x in top_ps),
        any_min_p=any(x > 0.0 for x in min_ps),
        any_penalty=any_penalty,
        grammar_bitmask=None,  # the model runner adds a step's grammar mask (grammar_matchers.py)
        grammar_may_empty=False,
    )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rows_kept_across_steps_match_a_fresh_build(device: str) -> None:
    rng = random.Random(0)
    torch.manual_seed(0)
    batch = SamplingBatch(VOCAB, device, capacity=2)  # well below the live count: the batch must grow
    live: dict[int, SampleRequest] = {}
    next_id = 0
    sampler = Sampler()
    for step in range(150):
        plan = StepPlan(chunks=[])
        for seq_id in list(live):
            if rng.random() < 0.08:
                plan.finished_seq_ids.append(seq_id)
                del live[seq_id]
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            request = _request(rng, rng.choice(OPTIONS), outputs=rng.choice([0, 0, 1, 5]))
            plan.new_sequences.append(NewSequence(next_id, len(request.prompt_token_ids), request))
            live[next_id] = request
            next_id += 1
        if live and rng.random() < 0.1:
            # Sent again (as after the workers lost their state): it starts over, possibly with other options.
            seq_id = rng.choice(list(live))
            old = live[seq_id]
            options = rng.choice([old.params, rng.choice(OPTIONS)])
            request = dataclasses.replace(old, params=options, output_token_ids=list(old.output_token_ids),
                                          stop_ids_for_min_tokens=list(STOP_IDS) if options.min_tokens else [])
            plan.new_sequences.append(NewSequence(seq_id, len(request.prompt_token_ids), request))
            live[seq_id] = request
        batch.apply(plan)
        assert len(batch) == len(live)
        if not live:
            continue
        sampling = rng.sample(list(live), rng.randrange(1, len(live) + 1))  # any subset, in any order
        requests = [live[seq_id] for seq_id in sampling]
        step_rows = batch.step_rows(sampling)
        kept = batch.tensors(step_rows)
        fresh = build_sampling_tensors(requests, VOCAB, device)
        _assert_same(_dense(kept), _dense(fresh))
        _assert_same(_dense(kept), _described(requests))
        if step % 5 == 0:
            logits = torch.randn(len(sampling), VOCAB, device=device) * 3
            assert torch.equal(sampler(logits, kept), sampler(logits, fresh))
        # What the rows then record need not be what they drew: any id, repeats included.
        tokens = [rng.choice([rng.randrange(VOCAB), *STOP_IDS, 5]) for _ in sampling]
        batch.record(step_rows, torch.tensor(tokens, device=device))
        for request, token in zip(requests, tokens):
            request.output_token_ids.append(token)
    assert next_id > 40


def test_step_rows_are_reused_until_the_batch_changes() -> None:
    rng = random.Random(1)
    batch = SamplingBatch(VOCAB, "cpu", capacity=4)
    new = [NewSequence(i, 3, _request(rng, OPTIONS[i])) for i in range(3)]
    batch.apply(StepPlan(chunks=[], new_sequences=new))
    first = batch.step_rows([2, 0])
    assert batch.step_rows([2, 0]) is first
    assert batch.step_rows([0, 2]) is not first
    batch.apply(StepPlan(chunks=[]))  # nothing changed
    again = batch.step_rows([0, 2])
    assert batch.step_rows([0, 2]) is again
    batch.apply(StepPlan(chunks=[], finished_seq_ids=[1]))
    assert batch.step_rows([0, 2]) is not again


def test_stop_ids_are_banned_until_min_tokens() -> None:
    rng = random.Random(2)
    batch = SamplingBatch(VOCAB, "cpu")
    request = _request(rng, SamplingOptions(temperature=0.5, min_tokens=3), outputs=1)
    batch.apply(StepPlan(chunks=[], new_sequences=[NewSequence(7, 4, request)]))
    for _ in range(2):
        step = batch.step_rows([7])
        assert batch.tensors(step).banned_token_ids is not None
        batch.record(step, torch.tensor([9]))
    step = batch.step_rows([7])
    assert batch.tensors(step).banned_token_ids is None
    assert batch.tensors(step).output_positions.tolist() == [3]
