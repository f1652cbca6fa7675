"""Structured outputs through the server with the `openai` client, on the random-weight model sampled at
temperature 1 (which writes noise unless constrained): every way of asking (`response_format`,
`structured_outputs`, `guided_*`) gives outputs of that shape, streamed or not, and a constraint that does not
compile is a 400 naming the field the client sent."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

openai = pytest.importorskip("openai", reason="installed with the 'dev' extra")

CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"enum": ["old", "new"]}, "minItems": 1, "maxItems": 3},
        "mayor": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{2,5}$"}]},
        "where": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 99}},
                  "required": ["x"], "additionalProperties": False},
        "kind": {"const": "city"},
    },
    "required": ["name", "tags", "mayor", "where", "kind"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a city."}]


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_response_format_json_schema_outputs_validate(client) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, n=3, temperature=1.0, max_tokens=128, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}})
    assert len(reply.choices) == 3
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content  # the grammar's end ends the sequence
        jsonschema.validate(json.loads(choice.message.content), CITY)


def test_streamed_json_joins_to_valid_json(client) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, n=2, temperature=1.0, max_tokens=128, seed=2, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}})
    texts, finished = {0: "", 1: ""}, {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert finished == {0: "stop", 1: "stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), CITY)


def test_json_object_on_the_completions_route_parses(client) -> None:
    # Any JSON may nest on and on; the seeded draws below include some that close within the cap.
    reply = client.completions.create(model="tiny", prompt="JSON:", n=6, temperature=1.0, max_tokens=128, seed=3,
                                      extra_body={"response_format": {"type": "json_object"}})
    stopped = [choice.text for choice in reply.choices if choice.finish_reason == "stop"]
    assert stopped, [choice.text for choice in reply.choices]
    for text in stopped:
        json.loads(text)


def test_choice_regex_and_grammar(client) -> None:
    colours = ["red", "green", "blue"]
    chosen = client.chat.completions.create(model="tiny", messages=MESSAGES, n=4, temperature=1.0, max_tokens=8,
                                            extra_body={"guided_choice": colours})
    assert all(choice.message.content in colours for choice in chosen.choices)
    pattern = r"[a-z]{3}-\d{2}"
    matched = client.completions.create(model="tiny", prompt="Code:", n=4, temperature=1.0, max_tokens=16,
                                        extra_body={"guided_regex": pattern})
    assert all(re.fullmatch(pattern, choice.text) for choice in matched.choices)
    grammar = 'root ::= "yes" | "no" | "maybe " [0-9]'
    parsed = client.chat.completions.create(model="tiny", messages=MESSAGES, n=4, temperature=1.0, max_tokens=8,
                                            extra_body={"structured_outputs": {"grammar": grammar}})
    assert all(re.fullmatch(r"yes|no|maybe [0-9]", choice.message.content) for choice in parsed.choices)


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, "response_format"),
    ({"guided_json": {"type": "integer", "minimum": 5, "maximum": 1}}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
])
def test_constraints_that_cannot_work_are_400s_naming_the_field(client, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, extra_body=extra)
    assert refused.value.body["param"] == param, refused.value.body
    assert refused.value.body["message"].startswith(param)
