"""The tool-call parsers' surroundings: the registry, the forced-call schemas (checked with jsonschema against outputs
their parsers read), non-streamed message shapes, stream delta shapes and `parallel_tool_calls`."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from rayinfer.cluster.openai.tool_parsers import (
    PARSERS,
    NamedToolCallParser,
    RequiredToolCallParser,
    ToolCallStream,
    get_tool_call_parser,
    named_tool_schema,
    parse_tool_calls,
    required_tools_schema,
    tool_call_id,
)

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}
TOOLS = [
    {"type": "function",
     "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time"}},  # no parameters: any object
]
TWO_CALLS = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
TWO_HERMES_CALLS = (
    '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
    '<tool_call>{"name": "b", "arguments": {}}</tool_call>')


def test_registry_names_its_parsers() -> None:
    assert {"hermes", "llama3_json", "mistral", "qwen"} <= set(PARSERS)
    for name, parser in PARSERS.items():
        assert parser.name == name and get_tool_call_parser(name).name == name


def test_unknown_parser_name_lists_the_known() -> None:
    with pytest.raises(ValueError) as info:
        get_tool_call_parser("nope")
    assert "nope" in str(info.value) and all(name in str(info.value) for name in PARSERS)


def test_required_schema_shape() -> None:
    schema = required_tools_schema(TOOLS, parallel_tool_calls=False)
    assert schema == {
        "type": "array", "minItems": 1, "maxItems": 1,
        "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"const": "get_weather"}, "parameters": WEATHER_PARAMETERS},
             "required": ["name", "parameters"]},
            {"type": "object", "properties": {"name": {"const": "get_time"}, "parameters": {"type": "object"}},
             "required": ["name", "parameters"]},
        ]},
    }
    assert "maxItems" not in required_tools_schema(TOOLS, parallel_tool_calls=True)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_schema_validates_calls(parallel: bool) -> None:
    schema = required_tools_schema(TOOLS, parallel)
    jsonschema.validate(json.loads('[{"name": "get_time", "parameters": {"tz": "CET"}}]'), schema)
    (jsonschema.validate if parallel else _rejects)(json.loads(TWO_CALLS), schema)
    for bad in ([], [{"name": "nope", "parameters": {}}], [{"name": "get_weather", "parameters": {}}],
                [{"name": "get_time"}], {"name": "get_time", "parameters": {}}):
        _rejects(bad, schema)


def _rejects(instance: object, schema: dict) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(instance, schema)


def test_required_schema_moves_defs_to_the_top() -> None:
    parameters = {"type": "object", "properties": {"at": {"$ref": "#/$defs/place"}}, "required": ["at"],
                  "$defs": {"place": {"type": "string", "minLength": 2}}}
    tools = [{"type": "function", "function": {"name": "go", "parameters": parameters}}]
    schema = required_tools_schema(tools, parallel_tool_calls=True)
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"] and "$defs" in parameters
    jsonschema.validate([{"name": "go", "parameters": {"at": "Paris"}}], schema)
    _rejects([{"name": "go", "parameters": {"at": "P"}}], schema)
    clash = {**parameters, "$defs": {"place": {"type": "integer"}}}
    with pytest.raises(ValueError, match="place"):
        required_tools_schema([*tools, {"type": "function", "function": {"name": "b", "parameters": clash}}], True)


def test_required_parser_reads_what_the_schema_allows() -> None:
    schema = required_tools_schema(TOOLS, parallel_tool_calls=True)
    jsonschema.validate(json.loads(TWO_CALLS), schema)
    content, calls = parse_tool_calls(RequiredToolCallParser(), TWO_CALLS)
    assert content is None
    assert [(call["function"]["name"], call["function"]["arguments"]) for call in calls] == [
        ("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]


def test_named_schema_and_parser() -> None:
    assert named_tool_schema(TOOLS, "get_weather") == WEATHER_PARAMETERS
    assert named_tool_schema(TOOLS, "get_time") == {"type": "object"}
    with pytest.raises(ValueError, match="get_weather, get_time"):
        named_tool_schema(TOOLS, "nope")
    output = '{"city": "Paris", "unit": "celsius"}'
    jsonschema.validate(json.loads(output), named_tool_schema(TOOLS, "get_weather"))
    content, calls = parse_tool_calls(NamedToolCallParser("get_weather"), output)
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": output}


def test_named_call_is_sent_before_its_arguments() -> None:
    tool_stream = ToolCallStream(NamedToolCallParser("get_time"))
    first = tool_stream.feed("")
    assert first.content == "" and first.tool_calls[0]["function"] == {"name": "get_time", "arguments": ""}
    assert tool_stream.feed('{"tz"').tool_calls == [{"index": 0, "function": {"arguments": '{"tz"'}}]
    assert tool_stream.finish('{"tz": "CET"}').tool_calls == [{"index": 0, "function": {"arguments": ': "CET"}'}}]


def test_parse_tool_calls_message_shape() -> None:
    content, calls = parse_tool_calls(get_tool_call_parser("hermes"), "Sure.\n" + TWO_HERMES_CALLS)
    assert content == "Sure.\n"
    assert [call["function"] for call in calls] == [{"name": "a", "arguments": '{"x": 1}'},
                                                    {"name": "b", "arguments": "{}"}]
    assert all(call["type"] == "function" and re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", call["id"])
               for call in calls)
    assert len({call["id"] for call in calls}) == 2
    assert parse_tool_calls(get_tool_call_parser("hermes"), " \n" + TWO_HERMES_CALLS + "\n")[0] is None
    assert parse_tool_calls(get_tool_call_parser("hermes"), "Just text.") == ("Just text.", [])


def test_tool_call_id_format() -> None:
    ids = {tool_call_id() for _ in range(10)}
    assert len(ids) == 10 and all(re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", i) for i in ids)


def test_stream_delta_shapes() -> None:
    tool_stream = ToolCallStream(get_tool_call_parser("hermes"))
    assert tool_stream.feed("Hi <tool").content == "Hi "
    delta = tool_stream.feed('Hi <tool_call>{"name": "a", "arguments": {"x"')
    assert delta.content == "" and delta.tool_calls == [{
        "index": 0, "id": tool_stream.tool_calls[0]["id"], "type": "function",
        "function": {"name": "a", "arguments": '{"x"'}}]
    assert tool_stream.feed('Hi <tool_call>{"name": "a", "arguments": {"x"').tool_calls == []
    delta = tool_stream.finish('Hi <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call> Bye')
    assert delta.content == " Bye" and delta.tool_calls == [{"index": 0, "function": {"arguments": ": 1}"}}]
    assert tool_stream.tool_calls[0]["function"] == {"name": "a", "arguments": '{"x": 1}'}


def test_a_call_that_breaks_at_the_end_stays_as_sent_and_its_text_follows_as_content() -> None:
    tool_stream = ToolCallStream(get_tool_call_parser("hermes"))
    text = 'Ok.<tool_call>{"name": "f", "arguments": {"a": 1'
    assert tool_stream.feed(text).content == "Ok."
    delta = tool_stream.finish(text)  # cut short (max_tokens): not a call after all
    assert delta.content == text[len("Ok."):] and delta.tool_calls == []
    assert tool_stream.tool_calls[0]["function"] == {"name": "f", "arguments": '{"a": 1'}


def test_without_parallel_tool_calls_only_the_first_call_is_kept() -> None:
    parser = get_tool_call_parser("hermes")
    content, calls = parse_tool_calls(parser, TWO_HERMES_CALLS, parallel_tool_calls=False)
    assert content is None and [call["function"]["name"] for call in calls] == ["a"]
    tool_stream = ToolCallStream(parser, parallel_tool_calls=False)
    pieces = [piece for k in range(len(TWO_HERMES_CALLS) + 1)
              for piece in tool_stream.feed(TWO_HERMES_CALLS[:k]).tool_calls]
    pieces += tool_stream.finish(TWO_HERMES_CALLS).tool_calls
    assert {piece["index"] for piece in pieces} == {0}
    assert "".join(piece["function"]["arguments"] for piece in pieces) == '{"x": 1}'
    assert [call["function"]["name"] for call in tool_stream.tool_calls] == ["a"]
