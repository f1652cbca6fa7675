"""Structured outputs and tools on the request side, no server: each way a request names its output's shape
(`response_format`, `structured_outputs`, `guided_*`, a forced `tool_choice`) becomes the engine's
`StructuredOutputsParams`, refusals name the field the client sent, tool messages and tools reach the template, and
tool calls are read out of hand-written outputs, whole and streamed."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from rayinfer.cluster.openai.request_models import ChatCompletionRequest, CompletionRequest
from rayinfer.cluster.openai.sampling_fields import blame, to_beam_search_params, to_sampling_params
from rayinfer.cluster.openai.tool_calls import check_tool_call_parser, tool_calling_for
from rayinfer.cluster.openai.tool_parsers import named_tool_schema, required_tools_schema
from rayinfer.scheduler.request_errors import InvalidRequestError
from rayinfer.scheduler.structured_outputs import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
MESSAGES = [{"role": "user", "content": "x"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})


def constraint(body) -> StructuredOutputsParams | None:
    return to_sampling_params(body, room=100).structured_outputs


@pytest.mark.parametrize("fields, expected", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
     StructuredOutputsParams(json=SCHEMA)),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"regex": "[ab]+"}}, StructuredOutputsParams(regex="[ab]+")),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutputsParams(json=SCHEMA)),
    ({"structured_outputs": {"grammar": 'root ::= "x"'}}, StructuredOutputsParams(grammar='root ::= "x"')),
    ({"structured_outputs": {"json_object": True}}, StructuredOutputsParams(json_object=True)),
    ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_regex": "a|b"}, StructuredOutputsParams(regex="a|b")),
    ({"guided_choice": ["yes", "no"]}, StructuredOutputsParams(choice=["yes", "no"])),
    ({"guided_grammar": 'root ::= "y"'}, StructuredOutputsParams(grammar='root ::= "y"')),
    ({}, None),
])
def test_each_field_becomes_the_engine_constraint_on_both_routes(fields, expected) -> None:
    assert constraint(chat(**fields)) == expected
    assert constraint(CompletionRequest.model_validate({"prompt": "x", **fields})) == expected


def test_forced_tool_choices_constrain_to_the_tools_schemas() -> None:
    required = chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert constraint(required) == StructuredOutputsParams(json=required_tools_schema([WEATHER, TIME], False))
    named = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert constraint(named) == StructuredOutputsParams(json=named_tool_schema([WEATHER, TIME], "get_weather"))
    odd = {"type": "function", "function": {"name": "required", "parameters": SCHEMA}}  # a name, not the mode
    odd_choice = {"type": "function", "function": {"name": "required"}}
    assert constraint(chat(tools=[WEATHER, odd], tool_choice=odd_choice)) == StructuredOutputsParams(json=SCHEMA)
    for free in (chat(tools=[WEATHER]), chat(tools=[WEATHER], tool_choice="none"),
                 chat(tools=[], tool_choice="required")):
        assert constraint(free) is None


def test_more_than_one_constraint_is_refused_naming_them() -> None:
    with pytest.raises(InvalidRequestError) as two:
        to_sampling_params(chat(response_format={"type": "json_object"}, guided_regex="a"), room=100)
    assert two.value.field == "guided_regex" and "response_format and guided_regex" in str(two.value)
    with pytest.raises(InvalidRequestError) as tools:
        to_sampling_params(chat(tools=[WEATHER], tool_choice="required", structured_outputs={"regex": "a"}), room=9)
    assert tools.value.field == "tool_choice" and "structured_outputs" in str(tools.value)
    # "auto" leaves the output free, so a constraint may shape what the model writes
    assert constraint(chat(tools=[WEATHER], tool_choice="auto", guided_regex="a")) == StructuredOutputsParams(regex="a")


@pytest.mark.parametrize("fields, field", [
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": ""}}, "structured_outputs.grammar"),
])
def test_constraints_wrong_on_their_face_name_the_clients_field(fields, field) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        to_sampling_params(chat(**fields), room=100)
    assert refused.value.field == field and str(refused.value).startswith(field)


def test_engine_refusals_of_a_constraint_are_renamed_to_the_clients_field() -> None:
    bad_regex = InvalidRequestError.about("structured_outputs.regex", "the regex cannot be compiled: unbalanced (")
    bad_json = InvalidRequestError.about("structured_outputs.json", "the JSON schema cannot be compiled")
    refusal = blame(chat(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {}}}), bad_json)
    assert refusal.field == "response_format" and str(refusal) == "response_format: the JSON schema cannot be compiled"
    assert blame(chat(guided_regex="("), bad_regex).field == "guided_regex"
    assert blame(chat(structured_outputs={"regex": "("}), bad_regex).field == "structured_outputs.regex"
    assert blame(CompletionRequest(prompt="x", guided_json={}), bad_json).field == "guided_json"
    assert blame(chat(tools=[WEATHER], tool_choice="required"), bad_json).field == "tools"


def test_response_format_json_schema_needs_its_schema() -> None:
    with pytest.raises(ValidationError, match="json_schema.schema"):
        chat(response_format={"type": "json_schema", "json_schema": {"name": "n"}})
    with pytest.raises(ValidationError):
        chat(response_format={"type": "xml"})


def test_beam_search_refuses_constraints_and_tool_calls() -> None:
    beams = {"use_beam_search": True, "n": 1, "best_of": 2}
    for fields, field in (({"guided_choice": ["a"]}, "guided_choice"), ({"response_format": {"type": "json_object"}},
                          "response_format"), ({"tools": [WEATHER]}, "tools"),
                          ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice")):
        with pytest.raises(InvalidRequestError) as refused:
            to_beam_search_params(chat(**beams, **fields), room=10)
        assert refused.value.field == field and "use_beam_search" in str(refused.value)
    to_beam_search_params(chat(**beams, tools=[WEATHER], tool_choice="none", response_format={"type": "text"}), room=9)


def test_tool_choice_resolution() -> None:
    assert chat(tools=[WEATHER]).effective_tool_choice == "auto"
    assert chat().effective_tool_choice == "none"
    assert tool_calling_for(chat(tools=[WEATHER], tool_choice="none"), None) is None
    assert tool_calling_for(chat(tools=[WEATHER], tool_choice="required"), None) is not None
    assert tool_calling_for(chat(tools=[WEATHER]), "hermes") is not None
    refusals = {
        "--tool-call-parser": chat(tools=[WEATHER]),  # auto, and the server has no parser
        "not among the request's tools": chat(tools=[WEATHER], tool_choice={"type": "function",
                                                                           "function": {"name": "nope"}}),
        "needs tools": chat(tool_choice="required"),
    }
    for words, body in refusals.items():
        with pytest.raises(InvalidRequestError, match=words) as refused:
            tool_calling_for(body, None)
        assert refused.value.field == "tool_choice"


def test_unknown_tool_call_parser_fails_at_startup_listing_the_known(llama_dir) -> None:
    from rayinfer.cluster.cli import _served_apps, build_parser

    check_tool_call_parser(None)
    check_tool_call_parser("hermes")
    with pytest.raises(ValueError, match="tool_call_parser.*hermes"):
        check_tool_call_parser("nope")
    flags = ["serve", "--model", str(llama_dir), "--tool-call-parser"]
    assert _served_apps(build_parser().parse_args([*flags, "qwen"]))[2][0].args["tool_call_parser"] == "qwen"
    with pytest.raises(ValueError, match="--tool-call-parser.*llama3_json"):  # before Ray starts
        _served_apps(build_parser().parse_args([*flags, "nope"]))


def test_tool_messages_reach_the_template_with_the_tools(llama_dir) -> None:
    from transformers import AutoTokenizer

    from rayinfer.cluster.openai.chat_template import render_chat

    body = chat(tools=[WEATHER], messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert body.messages[2].template_message()["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    text = render_chat(AutoTokenizer.from_pretrained(llama_dir), body.messages, True, body.tools)
    assert text.startswith("<s><|system|>\nBe brief.\n\n# Tools") and json.dumps(WEATHER, separators=(",", ":")) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call></s>' in text
    assert text.endswith("<|user|>\n<tool_response>\nsunny\n</tool_response></s>\n<|assistant|>\n")
    with pytest.raises(ValidationError, match="only assistant messages carry tool_calls"):
        chat(messages=[{"role": "user", "content": "x", "tool_calls": []}])
    with pytest.raises(ValidationError, match="arguments must be JSON"):
        chat(messages=[{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}])
