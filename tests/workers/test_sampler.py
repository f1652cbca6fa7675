"""Sampler: greedy = argmax, penalties match a loop reference, filters hold, draws follow probs and do not
depend on what else is in the batch."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from rayinfer.scheduler import SamplingParams
from rayinfer.workers.step_plan import SampleRequest
from rayinfer.workers.sampler import Sampler, apply_penalties, counter_uniforms
from rayinfer.workers.sampling_batch import build_sampling_tensors

M64 = (1 << 64) - 1


def _row(params: SamplingParams, seed: int = 0, prompt=(), output=(), stop_ids=()) -> SampleRequest:
    return SampleRequest(params.sampling_options(), seed, list(prompt), list(output), list(stop_ids))


def _sample(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    return Sampler()(logits, build_sampling_tensors(rows, logits.shape[1], "cpu"))


def _ref_mix(x: int) -> int:
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _ref_uniform(seed: int, position: int, token: int) -> float:
    key = _ref_mix(_ref_mix(seed) + (position + 1) * 0xD1B54A32D192ED03)
    bits = _ref_mix(key + (token + 1) * 0x9E3779B97F4A7C15)
    return ((bits >> 41) * 2 + 1) / 2**24


def test_counter_uniforms_match_unsigned_splitmix() -> None:
    seeds = [0, 1, 12345, 2**63 - 1, -1, -(2**63), 0xDEADBEEF]
    signed = [s if s < 2**63 else s - 2**64 for s in seeds]
    positions = [0, 7, 3, 1 << 40, 5, 2, 100]
    u = counter_uniforms(torch.tensor(signed), torch.tensor(positions), 50)
    for i, (seed, pos) in enumerate(zip(seeds, positions)):
        for tok in (0, 1, 17, 49):
            assert u[i, tok].item() == _ref_uniform(seed & M64, pos, tok)
    assert 0.0 < u.min().item() and u.max().item() < 1.0


def test_counter_uniforms_look_uniform() -> None:
    u = counter_uniforms(torch.arange(200), torch.zeros(200, dtype=torch.int64), 500).flatten()
    hist = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert abs(u.mean().item() - 0.5) < 0.005
    assert ((hist - 10_000).abs() < 500).all()


def test_greedy_is_argmax_for_any_dtype() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    rows = [_row(SamplingParams(temperature=0.0), seed=i) for i in range(8)]
    assert torch.equal(_sample(logits, rows), logits.argmax(-1))
    half = logits.to(torch.bfloat16)
    assert torch.equal(_sample(half, rows), half.float().argmax(-1))
    # Greedy rows mixed with sampled ones still take argmax; the input is left untouched.
    mixed = [_row(SamplingParams(temperature=0.0 if i % 2 else 1.0, top_k=5), seed=i) for i in range(8)]
    before = logits.clone()
    out = _sample(logits, mixed)
    assert torch.equal(logits, before)
    assert torch.equal(out[1::2], logits.argmax(-1)[1::2])


def test_build_sets_only_what_the_batch_needs() -> None:
    t = build_sampling_tensors([_row(SamplingParams(temperature=0.0, top_k=5))], 50, "cpu")
    assert t.all_greedy and not (t.any_top_k or t.any_top_p or t.any_min_p or t.any_penalty)
    assert t.prompt_seen is None and t.output_counts is None and t.banned_token_ids is None
    t = build_sampling_tensors(
        [_row(SamplingParams(top_k=100, presence_penalty=0.5), output=[1]), _row(SamplingParams(top_p=0.5))], 50, "cpu"
    )
    assert not t.all_greedy and not t.any_top_k and t.any_top_p and t.any_penalty
    assert t.prompt_seen is None and t.output_counts is not None
    assert t.top_ks.tolist() == [50, 50]


def _reference_penalties(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    out = logits.clone()
    for b, row in enumerate(rows):
        p = row.params
        for tok in set(row.prompt_token_ids) | set(row.output_token_ids):
            value = out[b, tok].item()
            rep = p.repetition_penalty
            out[b, tok] = value / rep if value > 0 else value * rep
        for tok in set(row.output_token_ids):
            count = row.output_token_ids.count(tok)
            out[b, tok] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalties_match_loop_reference() -> None:
    rng = random.Random(0)
    torch.manual_seed(0)
    vocab = 40
    rows = []
    for i in range(12):
        params = SamplingParams(
            repetition_penalty=rng.choice([1.0, 0.7, 1.3, 2.0]),
            frequency_penalty=rng.choice([0.0, 0.5, -0.4]),
            presence_penalty=rng.choice([0.0, 1.0, -1.5]),
        )
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 15))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 10))]
        rows.append(_row(params, seed=i, prompt=prompt, output=output))
    rows.append(_row(SamplingParams(), prompt=[1, 2], output=[3]))  # no penalty: must come back exact
    logits = torch.randn(len(rows), vocab) * 3
    t = build_sampling_tensors(rows, vocab, "cpu")
    got = apply_penalties(logits.clone(), t)
    expected = _reference_penalties(logits, rows)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[-1], logits[-1])
    # A greedy row picks the argmax of the penalised logits.
    greedy = [dataclasses.replace(r, params=dataclasses.replace(r.params, temperature=0.0)) for r in rows]
    assert torch.equal(_sample(logits, greedy), expected.argmax(-1))


def test_stop_ids_banned_until_min_tokens() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]] * 3)
    params = SamplingParams(temperature=0.0, min_tokens=2)
    rows = [
        _row(params, output=[], stop_ids=[1]),  # below min_tokens: EOS (1) banned
        _row(params, output=[2], stop_ids=[1, 3]),  # still below: 1 and 3 banned
        _row(params, output=[2, 2], stop_ids=[1]),  # reached min_tokens: free again
    ]
    assert _sample(logits, rows).tolist() == [3, 2, 1]
    t = build_sampling_tensors([rows[2]], 4, "cpu")
    assert t.banned_token_ids is None


def _allowed(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Reference filter on one row: top-k, then top-p on the renormalised rest, then min-p."""
    z = (logits.double() / p.temperature).tolist()
    order = sorted(range(len(z)), key=lambda i: -z[i])
    if p.top_k > 0:
        order = order[: p.top_k]
    weights = [math.exp(z[i] - z[order[0]]) for i in order]
    total = sum(weights)
    kept, mass = [], 0.0
    for i, w in zip(order, weights):
        if mass >= p.top_p:
            break
        kept.append(i)
        mass += w / total
    return {i for i in kept if math.exp(z[i] - z[order[0]]) >= p.min_p}


def test_filters_never_return_a_filtered_token() -> None:
    torch.manual_seed(1)
    logits = torch.randn(32) * 2
    cases = [
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.6, temperature=0.8),
        SamplingParams(min_p=0.15, temperature=1.3),
        SamplingParams(top_k=10, top_p=0.8, min_p=0.05, temperature=0.7),
        SamplingParams(top_k=1),
    ]
    for params in cases:
        rows = [_row(params, seed=s) for s in range(400)]
        drawn = set(_sample(logits.expand(400, -1), rows).tolist())
        allowed = _allowed(logits, params)
        assert drawn <= allowed, (params, drawn - allowed)
        assert len(drawn) >= min(3, len(allowed))  # really sampling, not collapsing to argmax


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0
    return (((counts - expected) ** 2)[keep] / expected[keep]).sum().item()


def test_draws_follow_the_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 8000
    # Across seeds, plain temperature 1.
    drawn = _sample(logits.expand(n, -1), [_row(SamplingParams(), seed=s) for s in range(n)])
    assert _chi_square(torch.bincount(drawn, minlength=6).double(), logits.double().softmax(-1)) < 25.0
    # Across positions of one seed, with temperature and top-k (renormalised over the top 3).
    params = SamplingParams(temperature=0.5, top_k=3)
    t = build_sampling_tensors([_row(params, seed=7)] * n, 6, "cpu")
    t = dataclasses.replace(t, output_positions=torch.arange(n))
    drawn = Sampler()(logits.expand(n, -1), t)
    expected = torch.cat([(logits[:3].double() / 0.5).softmax(-1), torch.zeros(3, dtype=torch.float64)])
    assert _chi_square(torch.bincount(drawn, minlength=6).double(), expected) < 20.0


def _mixed_rows(vocab: int) -> list[SampleRequest]:
    rng = random.Random(3)
    choices = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=8),
        SamplingParams(top_p=0.7),
        SamplingParams(min_p=0.1, temperature=1.5),
        SamplingParams(top_k=20, top_p=0.9, min_p=0.02),
        SamplingParams(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(min_tokens=4, temperature=0.9),
    ]
    rows = []
    for i in range(40):
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 6))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
        rows.append(_row(choices[i % len(choices)], seed=rng.randrange(2**63), prompt=prompt, output=output,
                         stop_ids=[0, 1]))
    return rows


def test_draw_does_not_depend_on_the_batch() -> None:
    torch.manual_seed(2)
    vocab = 64
    rows = _mixed_rows(vocab)
    logits = torch.randn(len(rows), vocab) * 2
    batched = _sample(logits, rows)
    alone = torch.cat([_sample(logits[i : i + 1], [rows[i]]) for i in range(len(rows))])
    assert torch.equal(batched, alone)
    perm = torch.randperm(len(rows))
    permuted = _sample(logits[perm], [rows[i] for i in perm.tolist()])
    assert torch.equal(permuted, batched[perm])
    # And a different seed or position does change draws somewhere.
    reseeded = [dataclasses.replace(r, seed=r.seed + 1) for r in rows]
    assert not torch.equal(_sample(logits, reseeded), batched)


@pytest.mark.gpu
def test_cuda_draws_match_cpu() -> None:
    seeds, positions = torch.arange(-50, 50), torch.arange(100) * 3
    cpu = counter_uniforms(seeds, positions, 1000)
    assert torch.equal(counter_uniforms(seeds.cuda(), positions.cuda(), 1000).cpu(), cpu)
    torch.manual_seed(2)
    rows = _mixed_rows(64)
    logits = torch.randn(len(rows), 64) * 2
    on_cuda = Sampler()(logits.cuda(), build_sampling_tensors(rows, 64, "cuda")).cpu()
    assert torch.equal(on_cuda, _sample(logits, rows))


def test_logit_bias_and_allowed_ids_apply_per_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 32)
    rows = [
        _row(SamplingParams(temperature=0.0)),
        _row(SamplingParams(temperature=0.0, logit_bias={7: 100.0})),
        _row(SamplingParams(temperature=0.0, allowed_token_ids=[3, 9, 30])),
        _row(SamplingParams(temperature=0.0, allowed_token_ids=[3, 9, 30], logit_bias={9: 100.0, 3: -100.0})),
    ]
    tokens = _sample(logits, rows).tolist()
    assert tokens[0] == logits[0].argmax().item()  # a row without either is untouched by the others
    assert tokens[1] == 7
    assert tokens[2] == [3, 9, 30][logits[2, [3, 9, 30]].argmax().item()]
    assert tokens[3] == 9


def test_logit_bias_shifts_the_draw_and_allowed_ids_bound_it() -> None:
    logits = torch.zeros(64, 16)
    params = SamplingParams(temperature=1.0, allowed_token_ids=[2, 5], logit_bias={5: 3.0})
    tokens = _sample(logits, [_row(params, seed=s) for s in range(64)]).tolist()
    assert set(tokens) <= {2, 5}
    assert tokens.count(5) > 48  # p(5) = e^3 / (1 + e^3) ~ 0.95


def test_logprobs_are_raw_and_rank_by_logit() -> None:
    from rayinfer.workers.logprobs import top_logprobs

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 0.0, 5.0, -1.0]])
    out = top_logprobs(logits, torch.tensor([0, 2]), [2, 0])
    expected = torch.log_softmax(logits, dim=-1)
    assert out[0].token_ids == [0, 1, 2] and out[0].ranks == [3, 1, 2]
    assert out[0].logprobs == pytest.approx([expected[0, 0].item(), expected[0, 1].item(), expected[0, 2].item()])
    assert out[1].token_ids == [2] and out[1].ranks == [1]
    assert out[1].logprobs == pytest.approx([expected[1, 2].item()])
