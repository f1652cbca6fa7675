"""Tool calls read out of hand-written model outputs by the route's renderer (what `tool_choice` "auto" does with
the server's parser), no server: a whole response's message and finish reason, and a stream's `delta.tool_calls`
pieces, fed in odd chunkings, that add up to the same calls."""
from __future__ import annotations

import json

import pytest

from rayinfer.cluster.openai.rendering import Renderer
from rayinfer.cluster.openai.request_models import ChatCompletionRequest
from rayinfer.cluster.openai.tool_calls import tool_calling_for
from rayinfer.scheduler.outputs import CompletionOutput, RequestOutput

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
HERMES_OUTPUT = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                 '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon", "days": [1, 2]}}\n</tool_call>')
CALLS = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon", "days": [1, 2]})]


def renderer(n: int = 1, **fields) -> Renderer:
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                                                 "n": n, **fields})
    return Renderer(body, "tiny", None, [("x", [1])], "chatcmpl-1", tool_calling=tool_calling_for(body, "hermes"))


def output(text: str, finish_reason: str | None, index: int = 0) -> RequestOutput:
    completion = CompletionOutput(index=index, text=text, token_ids=[7], finish_reason=finish_reason)
    return RequestOutput("r", "x", [1], outputs=[completion], finished=finish_reason is not None)


def test_whole_response_has_the_calls_the_content_and_finish_reason_tool_calls() -> None:
    message = renderer().full_response([output(HERMES_OUTPUT, "stop")]).model_dump()["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    assert message["message"]["content"] == "Let me look.\n"
    calls = message["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == CALLS
    assert all(c["type"] == "function" and c["id"] for c in calls) and calls[0]["id"] != calls[1]["id"]
    only_first = renderer(parallel_tool_calls=False).full_response([output(HERMES_OUTPUT, "stop")])
    assert len(only_first.choices[0].message.tool_calls) == 1
    cut = renderer().full_response([output(HERMES_OUTPUT, "length")]).choices[0]
    assert cut.finish_reason == "length"  # calls made, but the output was cut: its own reason
    plain = renderer().full_response([output("no calls here", "stop")]).model_dump()["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": "no calls here"} and plain["finish_reason"] == "stop"


@pytest.mark.parametrize("size", [1, 3, 7, 40])
def test_streamed_pieces_add_up_to_the_same_calls(size: int) -> None:
    streaming = renderer(n=2)
    chunks = [HERMES_OUTPUT[i:i + size] for i in range(0, len(HERMES_OUTPUT), size)]
    events = []
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        for index in (0, 1):  # two choices, interleaved, each with its own stream
            event = streaming.delta_event(0, output(chunk, "stop" if last else None, index))
            events.append(json.loads(event.removeprefix("data: ")))
    for index in (0, 1):
        content, calls, finish = "", {}, None
        for event in events:
            for choice in event["choices"]:
                if choice["index"] != index:
                    continue
                content += choice["delta"].get("content") or ""
                for piece in choice["delta"].get("tool_calls", []):
                    call = calls.setdefault(piece["index"], {"name": None, "arguments": ""})
                    if "id" in piece:
                        assert call["name"] is None and piece["type"] == "function"
                        call["name"] = piece["function"]["name"]
                    call["arguments"] += piece["function"].get("arguments", "")
                finish = choice["finish_reason"] or finish
        assert content == "Let me look.\n" and finish == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == CALLS
