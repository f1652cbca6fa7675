"""A chat request's messages through the model's chat template, as vLLM gives them to a template that takes string
content: text parts joined by newlines, null content as "", `name`, an assistant's `tool_calls` (arguments as
objects) and a tool result's `tool_call_id` passed on, and the request's `tools` as the template's `tools`."""
from __future__ import annotations

from typing import Any, Optional

from rayinfer.cluster.openai.request_models import ChatMessage, ChatTool
from rayinfer.scheduler.request_errors import InvalidRequestError


def render_chat(
    tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool, tools: Optional[list[ChatTool]] = None
) -> str:
    """The prompt text for `messages` (and `tools`, which vLLM hands the template whenever a request has them, with
    any tool_choice). A template that refuses them (a role or an order it cannot take: templates raise on purpose)
    or a tokenizer without one is the request's 400 (`InvalidRequestError` on `messages`), not a server error."""
    conversation = [message.template_message() for message in messages]
    extra = {"tools": [tool.template_tool() for tool in tools]} if tools else {}
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **extra)
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError, transformers' ValueError, ...
        raise InvalidRequestError(f"messages: the model's chat template cannot take these messages: "
                                  f"{type(exc).__name__}: {exc}", "messages") from exc
