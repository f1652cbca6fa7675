"""SamplingParams / BeamSearchParams: defaults, normalisation, a field-naming ValueError per bad value."""

from __future__ import annotations

from typing import Any

import pytest

from rayinfer.scheduler import BeamSearchParams, SamplingParams


def test_defaults_follow_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == (16, 0, [], [])
    assert p.seed is None and p.logprobs is None and p.prompt_logprobs is None
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.is_greedy


def test_normalisation() -> None:
    p = SamplingParams(stop="\n", stop_token_ids=(3, 7), top_k=-1, temperature=1)
    assert p.stop == ["\n"] and p.stop_token_ids == [3, 7] and p.top_k == 0
    assert isinstance(p.temperature, float)
    assert SamplingParams(stop=["a", "bc"]).stop == ["a", "bc"]
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", 1.5),
        ("best_of", 0),
        ("presence_penalty", 2.5),
        ("presence_penalty", float("nan")),
        ("frequency_penalty", -2.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("temperature", -0.1),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("seed", "42"),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [1]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", "12"),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("prompt_logprobs", -1),
        ("logit_bias", [1, 2]),
        ("logit_bias", {"x": 1.0}),
        ("logit_bias", {-3: 1.0}),
        ("logit_bias", {True: 1.0}),
        ("logit_bias", {3: float("nan")}),
        ("logit_bias", {3: "big"}),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [1, -2]),
        ("allowed_token_ids", "12"),
    ],
)
def test_invalid_value_names_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_cross_field_rules() -> None:
    with pytest.raises(ValueError, match="best_of must be >= n"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(n=2, best_of=4).best_of == 4


def test_logit_bias_keys_become_ints_and_values_clamp_to_openai_range() -> None:
    p = SamplingParams(logit_bias={"12": 250, 7: -1e9, 3: 0.5})
    assert p.logit_bias == {12: 100.0, 7: -100.0, 3: 0.5}
    assert SamplingParams(allowed_token_ids=(4, 2)).allowed_token_ids == [4, 2]
    assert SamplingParams().logit_bias is None and SamplingParams().allowed_token_ids is None


def test_beam_search_params() -> None:
    b = BeamSearchParams(beam_width=4, max_tokens=32)
    assert (b.ignore_eos, b.temperature, b.length_penalty) == (False, 0.0, 1.0)
    for kwargs, field in [
        ({"beam_width": 0, "max_tokens": 8}, "beam_width"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
        ({"beam_width": 2, "max_tokens": 8, "temperature": -1.0}, "temperature"),
        ({"beam_width": 2, "max_tokens": 8, "length_penalty": float("nan")}, "length_penalty"),
    ]:
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**kwargs)
