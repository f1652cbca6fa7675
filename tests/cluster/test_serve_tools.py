"""Tool calling through the server with the `openai` client, on the random-weight model at temperature 1: forced
calls ("required", a named function) always validate against the tools' schemas, streamed or not and with n>1;
"auto" reads the model's own calls with the server's parser (here hermes, the shared server's); a conversation with
calls and their results goes back through the template; a tool_choice that cannot work is a 400 naming it."""
from __future__ import annotations

import json

import jsonschema
import pytest

openai = pytest.importorskip("openai", reason="installed with the 'dev' extra")

# Lean: the tiny model's 512-token context must hold the template's tool listing (its tokenizer spends a token on
# every two characters of JSON: about 390 tokens with both tools, 270 with one), the request and the calls.
WEATHER_ARGS = {"type": "object", "required": ["city", "unit"],
                "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["C", "F"]}}}
TIME_ARGS = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -9, "maximum": 9}},
             "required": ["zone"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS}}
TOOLS = [WEATHER, {"type": "function", "function": {"name": "get_time", "parameters": TIME_ARGS}}]
SCHEMAS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}
MESSAGES = [{"role": "user", "content": "Weather?"}]


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def assert_valid_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def streamed_calls(stream) -> tuple[dict[int, dict[int, dict]], dict[int, str]]:
    """Each choice's calls from delta pieces (by call index: id, name, joined arguments), and its finish reason."""
    calls: dict[int, dict[int, dict]] = {}
    finished: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(choice.index, {}).setdefault(piece.index, {"arguments": ""})
                if piece.id:
                    assert "id" not in call, "a call is named once"
                    call.update(id=piece.id, name=piece.function.name)
                call["arguments"] += piece.function.arguments or ""
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    return calls, finished


def test_required_calls_validate(client) -> None:
    # One call each (parallel_tool_calls false), from either tool: the output is one of the schemas' anyOf.
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, n=3, temperature=1.0, max_tokens=96, seed=5)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        assert len(choice.message.tool_calls) == 1
        assert_valid_calls(choice.message.tool_calls)


def test_required_parallel_calls_streamed_with_two_choices(client) -> None:
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER], tool_choice="required",
                                            n=2, temperature=1.0, max_tokens=224, seed=7, stream=True)
    calls, finished = streamed_calls(stream)
    assert finished == {0: "tool_calls", 1: "tool_calls"} and set(calls) == {0, 1}
    for choice_calls in calls.values():
        for call in choice_calls.values():
            assert call["name"] == "get_weather"
            jsonschema.validate(json.loads(call["arguments"]), WEATHER_ARGS)


def test_named_function_calls_validate_streamed_and_not(client) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=named,
                                           temperature=1.0, max_tokens=32, seed=8)
    calls = reply.choices[0].message.tool_calls
    assert [call.function.name for call in calls] == ["get_time"]
    assert_valid_calls(calls)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=named,
                                            temperature=1.0, max_tokens=32, seed=8, stream=True)
    streamed, finished = streamed_calls(stream)
    assert [call["name"] for call in streamed[0].values()] == ["get_time"]
    assert streamed[0][0]["arguments"] == calls[0].function.arguments  # same seed, same draw
    assert finished[0] == reply.choices[0].finish_reason == "stop"  # a forced function: "stop", as OpenAI answers


def test_auto_reads_the_models_own_calls_with_the_servers_parser(client) -> None:
    # A random model never writes a call on its own: a regex makes it write hermes' markup, which "auto" must read.
    markup = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,6}", "unit": "C"\}\}\n</tool_call>'
    kwargs = {"model": "tiny", "messages": MESSAGES, "tools": [WEATHER], "temperature": 1.0, "max_tokens": 96,
              "seed": 9, "extra_body": {"guided_regex": markup}}
    reply = client.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    assert [call.function.name for call in choice.message.tool_calls] == ["get_weather"]
    assert_valid_calls(choice.message.tool_calls)
    streamed, finished = streamed_calls(client.chat.completions.create(stream=True, **kwargs))
    assert finished == {0: "tool_calls"}
    assert streamed[0][0]["arguments"] == choice.message.tool_calls[0].function.arguments
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER], temperature=1.0,
                                           max_tokens=8, seed=9, extra_body={"guided_regex": "[a-z ]{1,12}"})
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


def test_a_conversation_with_calls_and_results_goes_back_through_the_template(client) -> None:
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, max_tokens=64, seed=10)
    message = first.choices[0].message
    history = [*MESSAGES, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"sky": "clear"}'}]
    reply = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], tool_choice="none",
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].message.tool_calls is None and reply.usage.completion_tokens <= 4
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


@pytest.mark.parametrize("extra, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_tool_choices_that_cannot_work_are_400s_naming_the_field(client, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, extra_body=extra)
    assert refused.value.body["param"] == param, refused.value.body


def test_tokenize_renders_the_tools_as_chat_does(server: str, client) -> None:
    import requests

    def count(**extra) -> int:
        reply = requests.post(f"{server}/tokenize", json={"model": "tiny", "messages": MESSAGES, **extra}, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()["count"]

    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER], tool_choice="none",
                                          max_tokens=1, temperature=0)
    assert count(tools=[WEATHER]) == chat.usage.prompt_tokens > count()
