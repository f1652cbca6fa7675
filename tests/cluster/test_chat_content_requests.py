"""Chat content as the OpenAI API allows it: text parts joined as vLLM joins them, `name` passed to the template,
and any part the model cannot read refused with one error naming it."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from rayinfer.cluster.openai.errors import validation_error_body
from rayinfer.cluster.openai.request_models import ChatCompletionRequest
from rayinfer.scheduler.request_errors import InvalidRequestError


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-1"}},
    {"type": "a_kind_of_its_own", "text": "x"},
    {"type": 5},
])
def test_a_part_the_model_cannot_read_is_one_error_saying_only_text(part) -> None:
    payload = {"messages": [{"role": "system", "content": "s"},
                            {"role": "user", "content": [{"type": "text", "text": "look:"}, part]}]}
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(payload)
    assert len(info.value.errors()) == 2  # the union's string member, and the part's type (not also its text)
    error = validation_error_body(info.value)["error"]
    assert error["param"] == "messages.1.content.1.type"
    assert error["message"] == (f"Invalid request: messages.1.content.1.type: content parts of type {part['type']!r} "
                                "are not supported: only text parts (type 'text') are supported")


def test_message_content_forms_reach_the_template_as_vllm_gives_them() -> None:
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}], "name": "bob"},
        {"role": "assistant", "content": None, "name": "helper"},
        {"role": "tool", "content": [{"type": "text", "text": "42"}], "tool_call_id": "call-1", "name": "calc"},
        {"role": "user", "content": []},
    ]})
    assert [m.template_message() for m in req.messages] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi\nthere", "name": "bob"},  # text parts joined by newlines, as vLLM does
        {"role": "assistant", "content": "", "name": "helper"},
        {"role": "tool", "content": "42", "name": "calc", "tool_call_id": "call-1"},
        {"role": "user", "content": ""},
    ]


def test_render_chat_gives_the_template_names_and_joined_parts(llama_dir) -> None:
    from transformers import AutoTokenizer

    from rayinfer.cluster.openai.chat_template import render_chat

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}|{{ m.get('name', '-') }}]{{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    parts = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "bob"},
        {"role": "assistant", "content": None, "name": "eve"},
    ]}).messages
    assert render_chat(tokenizer, parts, True) == "[system|-]S[user|bob]a\nb[assistant|eve][assistant]"
    as_string = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a\nb", "name": "bob"},
        {"role": "assistant", "content": "", "name": "eve"}]}).messages
    assert render_chat(tokenizer, as_string, False) == render_chat(tokenizer, parts, False)

    tokenizer.chat_template = "{{ raise_exception('no tools here') }}"
    with pytest.raises(InvalidRequestError) as refused:
        render_chat(tokenizer, parts, True)
    assert refused.value.field == "messages" and "no tools here" in str(refused.value)
