"""The OpenAI response side: response and stream-chunk shapes (`response_models`), error bodies (`errors`),
per-token logprobs in both formats (`logprobs`), and responses rendered from engine deltas (`rendering`)."""

import json

import pytest
from pydantic import ValidationError

from rayinfer.cluster.openai.errors import error_body, validation_error_body
from rayinfer.cluster.openai.logprobs import chat_logprobs, completion_logprobs, next_text_offset
from rayinfer.cluster.openai.rendering import SSE_DONE, Renderer, sse_event
from rayinfer.cluster.openai.request_models import ChatCompletionRequest, CompletionRequest
from rayinfer.cluster.openai.response_models import (
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    UsageInfo,
)
from rayinfer.scheduler.outputs import CompletionOutput, Logprob, RequestOutput


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


# ------------------------------------------------------------------------------------------- rendering


class _Tokenizer:
    """Token id t is the text f"<{t}>"."""

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{t}>" for t in ids)


def _delta(texts_ids: dict[int, tuple[str, list[int]]], first: bool = False, finished: bool = False,
           prompt_logprobs=None) -> RequestOutput:
    """A delta as the engine sends it: prompt ids only in a request's first one."""
    outputs = [
        CompletionOutput(i, text, ids, logprobs=[_position((t, -1.0, 1, f"<{t}>")) for t in ids],
                         finish_reason="length" if finished else None)
        for i, (text, ids) in texts_ids.items()
    ]
    return RequestOutput("cmpl-1", "P" if first else None, [1, 2] if first else None, outputs=outputs,
                         finished=finished, prompt_logprobs=prompt_logprobs)


def _events(renderer: Renderer, deltas: list[RequestOutput]) -> list[dict]:
    events = [renderer.delta_event(0, delta) for delta in deltas]
    return [json.loads(event[len("data: "):]) for event in events if event is not None]


def test_streamed_completion_echoes_once_and_keeps_text_offsets_going() -> None:
    body = CompletionRequest(model="m", prompt="P", n=2, echo=True, logprobs=0, stream=True,
                             stream_options={"include_usage": True})
    renderer = Renderer(body, "tiny", _Tokenizer(), [("P", [1, 2])], response_id="cmpl-1")
    prompt_logprobs = [None, _position((2, -0.5, 1, "<2>"))]
    chunks = _events(renderer, [
        _delta({0: ("<5>", [5]), 1: ("<6>", [6])}, first=True, prompt_logprobs=prompt_logprobs),
        _delta({0: ("<7>", [7])}),
        _delta({0: ("", []), 1: ("<8>", [8])}, finished=True),
    ])
    first = chunks[0]["choices"]
    assert [c["text"] for c in first] == ["P<5>", "P<6>"]  # the prompt before each choice's first text
    assert first[0]["logprobs"]["tokens"] == ["<1>", "<2>", "<5>"]
    assert first[0]["logprobs"]["token_logprobs"] == [None, -0.5, -1.0]
    assert first[0]["logprobs"]["text_offset"] == [0, 3, 6]
    assert chunks[1]["choices"][0]["text"] == "<7>" and chunks[1]["choices"][0]["logprobs"]["text_offset"] == [9]
    assert [c["index"] for c in chunks[2]["choices"]] == [0, 1]
    assert chunks[2]["choices"][1]["logprobs"]["text_offset"] == [9]  # choice 1 continues from its own text
    assert {c["finish_reason"] for c in chunks[2]["choices"]} == {"length"}
    usage = json.loads(renderer.usage_event()[len("data: "):])
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 4,
                                                         "total_tokens": 6}
    assert len({chunk["created"] for chunk in chunks}) == 1 and chunks[0]["id"] == "cmpl-1"


def test_streamed_chat_names_the_role_in_each_choice_first_chunk_only() -> None:
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "n": 2,
                                                 "logprobs": True, "top_logprobs": 1, "stream": True})
    renderer = Renderer(body, "tiny", _Tokenizer(), [("hi", [1])], response_id="chatcmpl-1")
    chunks = _events(renderer, [_delta({0: ("<5>", [5])}, first=True), _delta({0: ("<6>", [6]), 1: ("<7>", [7])})])
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "<5>"}
    assert [c["delta"] for c in chunks[1]["choices"]] == [{"content": "<6>"}, {"role": "assistant", "content": "<7>"}]
    assert chunks[1]["choices"][1]["index"] == 1
    assert chunks[1]["choices"][1]["logprobs"]["content"][0]["top_logprobs"] == [
        {"token": "<7>", "logprob": -1.0, "bytes": list(b"<7>")}]


def test_whole_response_from_assembled_deltas_equals_the_stream() -> None:
    body = CompletionRequest(model="m", prompt=["P", "Q"], echo=True, logprobs=0)
    renderer = Renderer(body, "tiny", _Tokenizer(), [("P", [1, 2]), (None, [3])], response_id="cmpl-1")
    outputs = []
    for first_text in ("<5>", "<9>"):
        deltas = [_delta({0: (first_text, [int(first_text[1])])}, first=True), _delta({0: ("<7>", [7])}, finished=True)]
        whole = RequestOutput("cmpl-1", deltas[0].prompt, list(deltas[0].prompt_token_ids))
        for delta in deltas:
            whole.add(delta)
        outputs.append(whole)
    response = renderer.full_response(outputs).model_dump()
    assert [c["text"] for c in response["choices"]] == ["P<5><7>", "<3><9><7>"]  # token-id prompts are decoded
    assert response["choices"][0]["logprobs"]["text_offset"] == [0, 3, 6, 9]
    assert response["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert response["id"] == "cmpl-1" and response["object"] == "text_completion"
