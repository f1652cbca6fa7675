"""OpenAI protocol models: parsing client payloads, mapping to SamplingParams, response and error shapes."""

import json

import pytest
from pydantic import ValidationError

from rayinfer.cluster.protocol import (
    SSE_DONE,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    InvalidRequestError,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
    chat_logprobs,
    completion_logprobs,
    error_body,
    next_text_offset,
    sse_event,
    validation_error_body,
)
from rayinfer.scheduler.outputs import Logprob
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
    sp = CompletionRequest.model_validate(COMPLETION_PAYLOAD).to_sampling_params(default_max_tokens=1000)
    assert isinstance(sp, SamplingParams)
    assert (sp.n, sp.best_of, sp.max_tokens, sp.min_tokens) == (2, 3, 32, 4)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (0.7, 0.9, 50, 0.05)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.5, -0.25, 1.1)
    assert sp.seed == 1234 and sp.logprobs == 2
    assert sp.stop == ["\n\n", "###"] and sp.stop_token_ids == [2, 7]
    assert sp.ignore_eos and not sp.skip_special_tokens and sp.include_stop_str_in_output


def test_unset_sampling_fields_keep_engine_defaults() -> None:
    sp = CompletionRequest(model="m", prompt="x").to_sampling_params(100)
    default = SamplingParams()
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "n"):
        assert getattr(sp, name) == getattr(default, name), name
    assert sp.max_tokens == 16 and sp.stop == [] and sp.logprobs is None


def test_chat_to_sampling_params() -> None:
    sp = ChatCompletionRequest.model_validate(CHAT_PAYLOAD).to_sampling_params(default_max_tokens=500)
    assert sp.stop == ["END"]  # str -> list
    assert sp.is_greedy and sp.temperature == 0.0
    assert sp.max_tokens == 20 and sp.top_k == 1 and sp.logprobs == 3


def test_max_tokens_defaults_and_precedence() -> None:
    msgs = [{"role": "user", "content": "x"}]
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": msgs})
    assert chat.to_sampling_params(default_max_tokens=777).max_tokens == 777
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": msgs, "max_tokens": 9})
    assert chat.to_sampling_params(777).max_tokens == 9
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": msgs, "max_tokens": 9, "max_completion_tokens": 5})
    assert chat.to_sampling_params(777).max_tokens == 5
    comp = CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": None})
    assert comp.to_sampling_params(555).max_tokens == 555
    # the implicit default 16 shrinks to the room left; an explicit value that does not fit is an error
    assert CompletionRequest(model="m", prompt="x").to_sampling_params(10).max_tokens == 10
    with pytest.raises(InvalidRequestError) as info:
        CompletionRequest(model="m", prompt="x", max_tokens=50).to_sampling_params(10)
    assert info.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as info:
        CompletionRequest(model="m", prompt="x").to_sampling_params(0)
    assert info.value.param == "prompt"


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
        req.to_sampling_params(default_max_tokens=100)
    assert info.value.param == field


def test_chat_invalid_value_names_request_field() -> None:
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(InvalidRequestError, match="max_completion_tokens") as info:
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": msgs, "max_completion_tokens": 0}).to_sampling_params(100)
    assert info.value.param == "max_completion_tokens"
    with pytest.raises(ValueError, match="top_logprobs"):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": msgs, "logprobs": True, "top_logprobs": -2}).to_sampling_params(100)


# ---------------------------------------------------------------------------------------- responses


def test_completion_response_shape() -> None:
    resp = CompletionResponse(
        model="tiny",
        choices=[CompletionChoice(index=0, text=" Bob.", finish_reason="stop")],
        usage=UsageInfo.of(5, 2),
    )
    body = json.loads(resp.model_dump_json())
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": " Bob.", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_completion_stream_chunk_shape() -> None:
    chunk = CompletionStreamResponse(id="cmpl-1", created=1, model="tiny",
                                     choices=[CompletionChoice(index=1, text="a")])
    event = sse_event(chunk)
    assert event.startswith("data: ") and event.endswith("\n\n")
    body = json.loads(event[len("data: "):])
    assert body == {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny",
                    "choices": [{"index": 1, "text": "a", "logprobs": None, "finish_reason": None}], "usage": None}
    assert SSE_DONE == "data: [DONE]\n\n"


def test_chat_response_shape() -> None:
    resp = ChatCompletionResponse(
        model="tiny",
        choices=[ChatCompletionChoice(index=0, message=ChatResponseMessage(content="1 2 3"), finish_reason="length")],
        usage=UsageInfo.of(10, 3),
    )
    body = resp.model_dump(mode="json")
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "1 2 3"},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"]["total_tokens"] == 13


def test_chat_stream_chunk_shapes() -> None:
    first = ChatCompletionStreamResponse(
        model="tiny", choices=[ChatCompletionStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))])
    middle = ChatCompletionStreamResponse(
        model="tiny", choices=[ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content="Hi"))])
    last = ChatCompletionStreamResponse(
        model="tiny", choices=[ChatCompletionStreamChoice(index=0, delta=DeltaMessage(), finish_reason="stop")])
    usage = ChatCompletionStreamResponse(model="tiny", choices=[], usage=UsageInfo.of(4, 1))
    bodies = [json.loads(sse_event(c)[6:]) for c in (first, middle, last, usage)]
    for body in bodies:
        assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
        assert body["object"] == "chat.completion.chunk"
    assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert bodies[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert bodies[2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert bodies[3]["choices"] == [] and bodies[3]["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    assert bodies[1]["usage"] is None


def test_models_and_tokenize_shapes() -> None:
    models = ModelList(data=[ModelCard(id="tiny", root="/ckpt/tiny", max_model_len=2048)]).model_dump()
    assert models["object"] == "list"
    assert set(models["data"][0]) == {"id", "object", "created", "owned_by", "root", "max_model_len"}
    assert models["data"][0]["object"] == "model"
    tok = TokenizeResponse(count=2, max_model_len=2048, tokens=[5, 6]).model_dump()
    assert tok == {"count": 2, "max_model_len": 2048, "tokens": [5, 6], "token_strs": None}
    assert DetokenizeResponse(prompt="hi").model_dump() == {"prompt": "hi"}


# ------------------------------------------------------------------------------------------- errors


def test_error_body_shape() -> None:
    assert error_body("model 'x' not found", "NotFoundError", code=404) == {
        "error": {"message": "model 'x' not found", "type": "NotFoundError", "param": None, "code": 404}}
    body = error_body("bad", "invalid_request_error", param="temperature", code=400)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == "temperature"


def test_validation_error_body_lists_every_field() -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": "hot", "n": "2"})
    body = validation_error_body(info.value)
    assert body["error"]["param"] == "n"  # errors come in field order
    assert "temperature:" in body["error"]["message"] and "n:" in body["error"]["message"]
    assert body["error"]["code"] == 400
    json.dumps(body)  # serialisable as-is


# ------------------------------------------------------------------------------- logprobs, echo, logit_bias


def test_logprob_fields_map_to_sampling_params() -> None:
    sp = CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "logprobs": 2, "echo": True, "logit_bias": {"7": 100, "9": -250},
         "allowed_token_ids": [7, 9]}).to_sampling_params(100)
    assert sp.logprobs == 2 and sp.prompt_logprobs == 2  # echo asks for the prompt's logprobs too
    assert sp.logit_bias == {7: 100.0, 9: -100.0} and sp.allowed_token_ids == [7, 9]
    assert CompletionRequest(model="m", prompt="x", echo=True).to_sampling_params(100).prompt_logprobs is None
    assert CompletionRequest(model="m", prompt="x", logprobs=1).to_sampling_params(100).prompt_logprobs is None
    msgs = [{"role": "user", "content": "x"}]
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": msgs, "logprobs": True,
                                                 "logit_bias": {"3": 1.5}}).to_sampling_params(100)
    assert chat.logprobs == 0 and chat.logit_bias == {3: 1.5}
    assert ChatCompletionRequest.model_validate(
        {"model": "m", "messages": msgs, "top_logprobs": 0}).to_sampling_params(100).logprobs is None


def test_logprob_field_errors_name_the_field() -> None:
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": msgs, "top_logprobs": 3})
    body = validation_error_body(info.value)
    assert body["error"]["param"] == "top_logprobs" and "logprobs is true" in body["error"]["message"]
    with pytest.raises(InvalidRequestError, match="echo") as err:
        CompletionRequest(model="m", prompt="x", echo=True, max_tokens=0).to_sampling_params(100)
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as err:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "logit_bias": {"a": 1}}).to_sampling_params(9)
    assert err.value.param == "logit_bias"
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "logit_bias": {"1": "big"}})
    assert validation_error_body(info.value)["error"]["param"].startswith("logit_bias")


def test_engine_refusals_are_renamed_to_the_request_field() -> None:
    msgs = [{"role": "user", "content": "x"}]
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": msgs, "logprobs": True,
                                                 "top_logprobs": 30, "max_completion_tokens": 5})
    refusal = chat.engine_refusal("logprobs: 30 requested, but this engine's max_logprobs is 20")
    assert refusal.param == "top_logprobs" and str(refusal).startswith("top_logprobs: 30 requested")
    assert chat.engine_refusal("max_tokens: too many").param == "max_completion_tokens"
    assert chat.engine_refusal("logit_bias: token ids must be in [0, 5)").param == "logit_bias"
    comp = CompletionRequest(model="m", prompt="x", logprobs=30, echo=True)
    assert comp.engine_refusal("prompt_logprobs: 30 requested").param == "logprobs"
    assert comp.engine_refusal("logprobs: 30 requested").param == "logprobs"
    assert comp.engine_refusal("something broke").param is None
    assert comp.engine_refusal("kv_cache: full").param is None


def _position(*entries: tuple[int, float, int, str]) -> dict[int, Logprob]:
    return {tid: Logprob(lp, rank, text) for tid, lp, rank, text in entries}


def test_completion_logprobs_format() -> None:
    positions = [
        None,  # the first prompt token: nothing predicts it
        _position((5, -0.5, 1, " b"), (6, -1.5, 2, " c")),
        _position((7, -3.0, 3, "d"), (5, -0.25, 1, " b"), (6, float("-inf"), 2, " c")),
    ]
    out = completion_logprobs([4, 5, 7], positions, 1, decode=lambda t: "<s>" if t == 4 else "?", initial_offset=2)
    assert out.model_dump() == {
        "tokens": ["<s>", " b", "d"],
        "token_logprobs": [None, -0.5, -3.0],
        "top_logprobs": [None, {" b": -0.5}, {"d": -3.0, " b": -0.25}],  # the token itself, then the top 1
        "text_offset": [2, 5, 7],
    }
    assert next_text_offset(out, 2) == 8
    wide = completion_logprobs([7], positions[2:], 2, decode=str)
    assert wide.top_logprobs == [{"d": -3.0, " b": -0.25, " c": -9999.0}]  # -inf as OpenAI's floor


def test_chat_logprobs_format() -> None:
    positions = [_position((7, -3.0, 3, "d"), (5, -0.25, 1, "é"), (6, -1.0, 2, " c")), None]
    out = chat_logprobs([7, 9], positions, 2, decode=lambda t: "x").model_dump()
    assert out["content"][0] == {
        "token": "d", "logprob": -3.0, "bytes": [100],
        "top_logprobs": [{"token": "é", "logprob": -0.25, "bytes": [195, 169]},  # the top 2 by rank
                         {"token": " c", "logprob": -1.0, "bytes": [32, 99]}],
    }
    assert out["content"][1] == {"token": "x", "logprob": -9999.0, "bytes": [120], "top_logprobs": []}
    assert chat_logprobs([7], positions[:1], 0, decode=str).content[0].top_logprobs == []


def test_logprobs_response_shapes() -> None:
    legacy = completion_logprobs([5], [_position((5, -0.5, 1, "a"))], 0, decode=str)
    chunk = CompletionStreamResponse(id="cmpl-1", created=1, model="tiny",
                                     choices=[CompletionChoice(index=0, text="a", logprobs=legacy)])
    body = json.loads(sse_event(chunk)[len("data: "):])
    assert body["choices"][0]["logprobs"] == {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": [{"a": -0.5}],
                                              "text_offset": [0]}
    content = chat_logprobs([5], [_position((5, -0.5, 1, "a"))], 1, decode=str)
    chat = ChatCompletionResponse(model="tiny", usage=UsageInfo.of(1, 1), choices=[ChatCompletionChoice(
        index=0, message=ChatResponseMessage(content="a"), logprobs=content, finish_reason="length")])
    entry = chat.model_dump(mode="json")["choices"][0]["logprobs"]["content"][0]
    assert entry == {"token": "a", "logprob": -0.5, "bytes": [97],
                     "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}]}
    streamed = ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content="a"), logprobs=content)
    assert streamed.model_dump()["logprobs"]["content"][0]["token"] == "a"


def test_use_beam_search_maps_to_beam_search_params() -> None:
    req = CompletionRequest.model_validate({"prompt": "x", "use_beam_search": True, "n": 2, "best_of": 3,
                                           "length_penalty": 0.5, "ignore_eos": True, "seed": 1})
    bp = req.to_beam_search_params(default_max_tokens=10)  # the implicit 16 shrinks to the room left
    assert (bp.beam_width, bp.max_tokens, bp.length_penalty, bp.ignore_eos) == (3, 10, 0.5, True)
    assert req.beam_width_field == "best_of"
    msgs = [{"role": "user", "content": "x"}]
    chat = ChatCompletionRequest.model_validate({"messages": msgs, "use_beam_search": True, "n": 4,
                                                 "temperature": 0, "max_completion_tokens": 5})
    bp = chat.to_beam_search_params(default_max_tokens=100)
    assert (bp.beam_width, bp.max_tokens, bp.length_penalty) == (4, 5, 1.0) and chat.beam_width_field == "n"
    for patch, param in [({"temperature": 0.5}, "temperature"), ({"top_k": 5}, "top_k"),
                         ({"best_of": 1, "n": 2}, "best_of"), ({"n": 0}, "n"), ({"echo": True}, "echo"),
                         ({"length_penalty": float("inf")}, "length_penalty"), ({"max_tokens": 11}, "max_tokens")]:
        body = CompletionRequest.model_validate({"prompt": "x", "use_beam_search": True, **patch})
        with pytest.raises(InvalidRequestError) as exc:
            body.to_beam_search_params(default_max_tokens=10)
        assert exc.value.param == param, (patch, exc.value)
    # chat takes best_of too (a vLLM extra), for sampling as for beam search
    best = ChatCompletionRequest.model_validate({"messages": msgs, "n": 2, "best_of": 3, "temperature": 1.0})
    assert best.to_sampling_params(default_max_tokens=8).num_sequences == 3
