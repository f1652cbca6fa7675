"""Chat messages whose `content` is a list of parts, over HTTP on the tiny model's server, through the official
`openai` client: text parts mean the same as their text joined by newlines, null assistant content as "", and a
part the model cannot read (an image, audio, a file) is a 400 naming it."""
from __future__ import annotations

import pytest

openai = pytest.importorskip("openai", reason="installed with the 'serve' extra")

GREEDY = {"model": "tiny", "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _answer(client, messages: list) -> str:
    return client.chat.completions.create(messages=messages, **GREEDY).choices[0].message.content


def test_text_parts_answer_as_their_joined_text(client) -> None:
    as_strings = [{"role": "system", "content": "Be brief.\nAnd kind."}, {"role": "user", "content": "Hello\nthere"}]
    as_parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "And kind."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}],
         "name": "bob"},
    ]
    expected = _answer(client, as_strings)
    assert expected
    assert _answer(client, as_parts) == expected
    streamed = client.chat.completions.create(messages=as_parts, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_null_assistant_content_is_an_empty_turn(client) -> None:
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
             {"role": "user", "content": [{"type": "text", "text": "Still there?"}]}]
    assert _answer(client, turns) == _answer(client, [turns[0], {"role": "assistant", "content": ""}, turns[2]])


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-abc"}},
])
def test_a_part_the_model_cannot_read_is_a_400_naming_it(client, part: dict) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    error = refused.value.body
    assert error["param"] == "messages.1.content.0.type" and error["type"] == "invalid_request_error"
    assert f"'{part['type']}'" in error["message"] and "only text parts (type 'text') are supported" in error["message"]
    assert _answer(client, [messages[1] | {"content": [messages[1]["content"][1]]}])  # the server goes on serving
