"""The OpenAI request side: parsing client payloads (`request_models`), their `SamplingParams` and
`BeamSearchParams` (`sampling_fields`), and refusals that name the client's field, with no message parsing."""

import pytest
from pydantic import ValidationError

from rayinfer.cluster.openai.errors import validation_error_body
from rayinfer.cluster.openai.request_models import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from rayinfer.cluster.openai.sampling_fields import (
    beam_width_field,
    blame,
    to_beam_search_params,
    to_sampling_params,
)
from rayinfer.scheduler.request_errors import InvalidRequestError
from rayinfer.scheduler.sampling_params import SamplingParams

# What openai-python sends for client.completions.create(..., extra_body={...}).
COMPLETION_PAYLOAD = {
    "model": "tiny",
    "prompt": "Hello, my name is",
    "max_tokens": 32,
    "temperature": 0.7,
    "top_p": 0.9,
    "n": 2,
    "stream": True,
    "stream_options": {"include_usage": True},
    "stop": ["\n\n", "###"],
    "seed": 1234,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.25,
    "logprobs": 2,
    "echo": False,
    "best_of": 3,
    "user": "user-42",
    # vLLM extra_body fields
    "top_k": 50,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "ignore_eos": True,
    "min_tokens": 4,
    "stop_token_ids": [2, 7],
    "skip_special_tokens": False,
    "include_stop_str_in_output": True,
}

CHAT_PAYLOAD = {
    "model": "tiny",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Count to three.", "name": "bob"},
    ],
    "max_completion_tokens": 20,
    "temperature": 0,
    "stream": False,
    "stop": "END",
    "logprobs": True,
    "top_logprobs": 3,
    "top_k": 1,
}


# ------------------------------------------------------------------------------------------- parsing


def test_completion_payload_parses_with_extras() -> None:
    req = CompletionRequest.model_validate({**COMPLETION_PAYLOAD, "suffix": None, "logit_bias": {"50256": -100},
                                            "some_future_field": [1, 2]})
    assert req.prompt == "Hello, my name is"
    assert req.n == 2 and req.best_of == 3 and req.top_k == 50 and req.min_tokens == 4
    assert req.include_usage
    assert req.prompts() == ["Hello, my name is"]


@pytest.mark.parametrize(
    "prompt, batch",
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_forms(prompt, batch) -> None:
    assert CompletionRequest(model="m", prompt=prompt).prompts() == batch


@pytest.mark.parametrize("prompt", [[], 5, [1, "a"], [[]], [True, 1], [-1], None])
def test_bad_prompt_rejected_with_field_named(prompt) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    body = validation_error_body(info.value)
    assert body["error"]["param"] == "prompt"
    assert "prompt" in body["error"]["message"]


def test_completion_defaults() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    assert req.max_tokens == 16 and req.n == 1 and not req.stream and not req.include_usage
    assert req.temperature is None and req.stop is None


def test_chat_payload_parses() -> None:
    req = ChatCompletionRequest.model_validate({**CHAT_PAYLOAD, "tools": None, "response_format": {"type": "text"},
                                                "parallel_tool_calls": True})
    assert [m.role for m in req.messages] == ["system", "user", "assistant", "user"]
    assert req.messages[1].text() == "Hi\nthere"
    assert req.messages[3].text() == "Count to three."
    assert req.max_completion_tokens == 20 and req.max_tokens is None


@pytest.mark.parametrize(
    "patch, param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),  # strict: no string coercion
        ({"n": 1.5}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"stop": 3}, "stop"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids.0"),
        ({"stream_options": {"include_usage": "x"}, "stream": True}, "stream_options.include_usage"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages.0.content.0.type"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
         "messages.1.content.1.type"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]},
         "messages.0.content.0.type"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages.0.content.0"),
        ({"messages": []}, "messages"),
    ],
)
def test_chat_wrong_types_name_the_field(patch, param) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({**CHAT_PAYLOAD, **patch})
    body = validation_error_body(info.value)
    assert body["error"]["param"] == param
    assert param in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"


def test_missing_required_fields() -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m"})
    assert validation_error_body(info.value)["error"]["param"] == "messages"
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m"})
    assert validation_error_body(info.value)["error"]["param"] == "prompt"


def test_stream_options_require_stream() -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}})
    body = validation_error_body(info.value)
    assert body["error"]["param"] == "stream_options" and "stream is true" in body["error"]["message"]
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x", "stream": True, "stream_options": {}})


def test_tokenize_requests() -> None:
    t = TokenizeRequest.model_validate({"model": "m", "prompt": "hi"})
    assert t.use_special_tokens
    t = TokenizeRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    assert not t.use_special_tokens and t.add_generation_prompt
    with pytest.raises(ValidationError):
        TokenizeRequest.model_validate({"model": "m"})
    with pytest.raises(ValidationError):
        TokenizeRequest.model_validate({"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    assert DetokenizeRequest.model_validate({"model": "m", "tokens": [1, 2]}).tokens == [1, 2]
    with pytest.raises(ValidationError):
        DetokenizeRequest.model_validate({"tokens": "12"})


# ---------------------------------------------------------------------------------- sampling params


def test_completion_to_sampling_params_maps_everything() -> None:
    sp = to_sampling_params(CompletionRequest.model_validate(COMPLETION_PAYLOAD), room=1000)
    assert isinstance(sp, SamplingParams)
    assert (sp.n, sp.best_of, sp.max_tokens, sp.min_tokens) == (2, 3, 32, 4)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (0.7, 0.9, 50, 0.05)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.5, -0.25, 1.1)
    assert sp.seed == 1234 and sp.logprobs == 2
    assert sp.stop == ["\n\n", "###"] and sp.stop_token_ids == [2, 7]
    assert sp.ignore_eos and not sp.skip_special_tokens and sp.include_stop_str_in_output


def test_unset_sampling_fields_keep_engine_defaults() -> None:
    sp = to_sampling_params(CompletionRequest(model="m", prompt="x"), 100)
    default = SamplingParams()
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "n"):
        assert getattr(sp, name) == getattr(default, name), name
    assert sp.max_tokens == 16 and sp.stop == [] and sp.logprobs is None


def test_chat_to_sampling_params() -> None:
    sp = to_sampling_params(ChatCompletionRequest.model_validate(CHAT_PAYLOAD), room=500)
    assert sp.stop == ["END"]  # str -> list
    assert sp.is_greedy and sp.temperature == 0.0
    assert sp.max_tokens == 20 and sp.top_k == 1 and sp.logprobs == 3


def test_max_tokens_defaults_and_precedence() -> None:
    msgs = [{"role": "user", "content": "x"}]
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": msgs})
    assert to_sampling_params(chat, room=777).max_tokens == 777
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": msgs, "max_tokens": 9})
    assert to_sampling_params(chat, 777).max_tokens == 9
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": msgs, "max_tokens": 9, "max_completion_tokens": 5})
    assert to_sampling_params(chat, 777).max_tokens == 5
    comp = CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": None})
    assert to_sampling_params(comp, 555).max_tokens == 555
    # the implicit default 16 shrinks to the room left; an explicit value that does not fit is an error
    assert to_sampling_params(CompletionRequest(model="m", prompt="x"), 10).max_tokens == 10
    with pytest.raises(InvalidRequestError) as info:
        to_sampling_params(CompletionRequest(model="m", prompt="x", max_tokens=50), 10)
    assert info.value.field == "max_tokens" and str(info.value).startswith("max_tokens must be <= 10")


def test_a_prompt_that_fills_the_context_is_left_to_the_engine() -> None:
    """No room left: the ingress asks what the client asked, and the engine refuses the prompt, naming it."""
    assert to_sampling_params(CompletionRequest(model="m", prompt="x"), room=0).max_tokens == 16
    assert to_sampling_params(CompletionRequest(model="m", prompt="x", max_tokens=50), room=-3).max_tokens == 50
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert to_sampling_params(chat, room=0).max_tokens is None  # up to max_model_len: the engine's default
    beam = CompletionRequest.model_validate({"prompt": "x", "use_beam_search": True, "max_tokens": None})
    assert to_beam_search_params(beam, room=0).max_tokens == 1


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 40, "max_tokens": 8}, "min_tokens"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"logprobs": -1}, "logprobs"),
    ],
)
def test_invalid_values_raise_value_error_naming_field(patch, field) -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", **patch})
    with pytest.raises(ValueError, match=field) as info:
        to_sampling_params(req, room=100)
    assert info.value.field == field


def test_chat_invalid_value_names_request_field() -> None:
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(InvalidRequestError, match="max_completion_tokens") as info:
        to_sampling_params(ChatCompletionRequest.model_validate(
            {"model": "m", "messages": msgs, "max_completion_tokens": 0}), 100)
    assert info.value.field == "max_completion_tokens"
    assert str(info.value) == "max_completion_tokens: max_tokens must be >= 1 (got 0)"
    with pytest.raises(InvalidRequestError, match="top_logprobs") as info:
        to_sampling_params(ChatCompletionRequest.model_validate(
            {"model": "m", "messages": msgs, "logprobs": True, "top_logprobs": -2}), 100)
    assert info.value.field == "top_logprobs"


# ------------------------------------------------------------------------------- logprobs, echo, logit_bias


def test_logprob_fields_map_to_sampling_params() -> None:
    sp = to_sampling_params(CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "logprobs": 2, "echo": True, "logit_bias": {"7": 100, "9": -250},
         "allowed_token_ids": [7, 9]}), 100)
    assert sp.logprobs == 2 and sp.prompt_logprobs == 2  # echo asks for the prompt's logprobs too
    assert sp.logit_bias == {7: 100.0, 9: -100.0} and sp.allowed_token_ids == [7, 9]
    assert to_sampling_params(CompletionRequest(model="m", prompt="x", echo=True), 100).prompt_logprobs is None
    assert to_sampling_params(CompletionRequest(model="m", prompt="x", logprobs=1), 100).prompt_logprobs is None
    msgs = [{"role": "user", "content": "x"}]
    chat = to_sampling_params(ChatCompletionRequest.model_validate(
        {"model": "m", "messages": msgs, "logprobs": True, "logit_bias": {"3": 1.5}}), 100)
    assert chat.logprobs == 0 and chat.logit_bias == {3: 1.5}
    assert to_sampling_params(ChatCompletionRequest.model_validate(
        {"model": "m", "messages": msgs, "top_logprobs": 0}), 100).logprobs is None


def test_logprob_field_errors_name_the_field() -> None:
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": msgs, "top_logprobs": 3})
    body = validation_error_body(info.value)
    assert body["error"]["param"] == "top_logprobs" and "logprobs is true" in body["error"]["message"]
    with pytest.raises(InvalidRequestError, match="echo") as err:
        to_sampling_params(CompletionRequest(model="m", prompt="x", echo=True, max_tokens=0), 100)
    assert err.value.field == "max_tokens"
    with pytest.raises(InvalidRequestError) as err:
        to_sampling_params(CompletionRequest.model_validate({"model": "m", "prompt": "x", "logit_bias": {"a": 1}}), 9)
    assert err.value.field == "logit_bias"
    with pytest.raises(InvalidRequestError) as err:  # a bad value's field is its parameter: logit_bias[7] -> logit_bias
        to_sampling_params(CompletionRequest.model_validate(
            {"model": "m", "prompt": "x", "logit_bias": {"7": float("nan")}}), 9)
    assert err.value.field == "logit_bias" and str(err.value).startswith("logit_bias[7] must be a number")
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "logit_bias": {"1": "big"}})
    assert validation_error_body(info.value)["error"]["param"].startswith("logit_bias")


def test_engine_refusals_are_renamed_to_the_request_field() -> None:
    msgs = [{"role": "user", "content": "x"}]
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": msgs, "logprobs": True,
                                                 "top_logprobs": 30, "max_completion_tokens": 5})
    refusal = blame(chat, InvalidRequestError.about("logprobs", "30 requested, but this engine's max_logprobs is 20"))
    assert refusal.field == "top_logprobs"
    assert str(refusal) == "top_logprobs: 30 requested, but this engine's max_logprobs is 20"
    assert blame(chat, InvalidRequestError.about("max_tokens", "too many")).field == "max_completion_tokens"
    assert blame(chat, InvalidRequestError.about("prompt", "600 tokens is too long")).field == "messages"
    assert blame(chat, InvalidRequestError.about("prompt_token_ids", "ids must be in [0, 5)")).field == "messages"
    unchanged = InvalidRequestError.about("logit_bias", "token ids must be in [0, 5)")
    assert blame(chat, unchanged) is unchanged
    comp = CompletionRequest(model="m", prompt="x", logprobs=30, echo=True)
    assert blame(comp, InvalidRequestError.about("prompt_logprobs", "30 requested")).field == "logprobs"
    assert blame(comp, InvalidRequestError.about("logprobs", "30 requested")).field == "logprobs"
    assert blame(comp, InvalidRequestError.about("prompt_token_ids", "ids must be in [0, 5)")).field == "prompt"
    assert blame(comp, InvalidRequestError("something broke")).field is None
    other = blame(comp, InvalidRequestError("request_id 'x' is already in use", "request_id"))
    assert other.field is None and str(other) == "request_id 'x' is already in use"
    # a beam search's step asks logprobs for its candidates: the beam width asked for them
    beams = CompletionRequest(model="m", prompt="x", use_beam_search=True, n=2, best_of=4)
    assert blame(beams, InvalidRequestError.about("logprobs", "too many"), {"logprobs": "best_of"}).field == "best_of"


def test_use_beam_search_maps_to_beam_search_params() -> None:
    req = CompletionRequest.model_validate({"prompt": "x", "use_beam_search": True, "n": 2, "best_of": 3,
                                           "length_penalty": 0.5, "ignore_eos": True, "seed": 1})
    bp = to_beam_search_params(req, room=10)  # the implicit 16 shrinks to the room left
    assert (bp.beam_width, bp.max_tokens, bp.length_penalty, bp.ignore_eos) == (3, 10, 0.5, True)
    assert beam_width_field(req) == "best_of"
    msgs = [{"role": "user", "content": "x"}]
    chat = ChatCompletionRequest.model_validate({"messages": msgs, "use_beam_search": True, "n": 4,
                                                 "temperature": 0, "max_completion_tokens": 5})
    bp = to_beam_search_params(chat, room=100)
    assert (bp.beam_width, bp.max_tokens, bp.length_penalty) == (4, 5, 1.0) and beam_width_field(chat) == "n"
    for patch, field in [({"temperature": 0.5}, "temperature"), ({"top_k": 5}, "top_k"),
                         ({"best_of": 1, "n": 2}, "best_of"), ({"n": 0}, "n"), ({"echo": True}, "echo"),
                         ({"length_penalty": float("inf")}, "length_penalty"), ({"max_tokens": 11}, "max_tokens")]:
        body = CompletionRequest.model_validate({"prompt": "x", "use_beam_search": True, **patch})
        with pytest.raises(InvalidRequestError) as exc:
            to_beam_search_params(body, room=10)
        assert exc.value.field == field, (patch, exc.value)
    # chat takes best_of too (a vLLM extra), for sampling as for beam search
    best = ChatCompletionRequest.model_validate({"messages": msgs, "n": 2, "best_of": 3, "temperature": 1.0})
    assert to_sampling_params(best, room=8).num_sequences == 3
