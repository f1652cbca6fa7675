"""The request bodies the OpenAI-compatible routes accept, as pydantic models.

Requests ignore unknown fields (OpenAI clients send extras) but check types strictly (no "0.5" -> 0.5). Value
ranges are not checked here: `SamplingParams` checks them when `sampling_fields` converts a request.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def _check_prompt(value: Any) -> Any:
    """Give one clear message for a bad `prompt` instead of one error per union member."""
    def is_ids(v: Any) -> bool:
        return isinstance(v, list) and len(v) > 0 and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v
        )

    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value) or is_ids(value) or all(is_ids(v) for v in value):
            return value
    raise ValueError(
        "Input should be a string, a non-empty list of strings, a list of token ids, or a list of token-id lists"
    )


Prompt = Annotated[Union[str, list[str], list[int], list[list[int]]], BeforeValidator(_check_prompt)]


def prompt_batch(prompt: Any) -> list[Union[str, list[int]]]:
    """A checked `Prompt` as a batch: each item is a string or a list of token ids."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


class StreamOptions(_Request):
    include_usage: bool = False


class TextContentPart(_Request):
    """One part of a message's `content` list. Only text: the models served read no images, audio or files."""

    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        # One error at `type` (not also "text: Field required" for an image part), in words the client can act on.
        if isinstance(data, dict) and "type" in data and data["type"] != "text":
            error = ValueError(f"content parts of type {repr(data['type'])[:64]} are not supported: only text parts "
                               "(type 'text') are supported")
            raise ValidationError.from_exception_data(cls.__name__, [
                {"type": "value_error", "loc": ("type",), "input": data["type"], "ctx": {"error": error}}])
        return data


class ToolCallFunction(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _arguments_are_json(cls, value: str) -> str:
        # Templates take the arguments as an object (vLLM parses them too); text that is not JSON cannot reach them.
        if value.strip():
            try:
                json.loads(value)
            except ValueError as exc:
                raise ValueError(f"function.arguments must be JSON text (got {value[:80]!r}: {exc})") from None
        return value


class MessageToolCall(_Request):
    """A tool call an earlier assistant turn made, as the client sends the conversation back."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction

    def template_call(self) -> dict[str, Any]:
        arguments = json.loads(self.function.arguments) if self.function.arguments.strip() else {}
        return {"id": self.id, "type": self.type, "function": {"name": self.function.name, "arguments": arguments}}


class FunctionDefinition(_Request):
    name: Annotated[str, Field(min_length=1)]
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema; none: the function takes no arguments
    strict: Optional[bool] = None


class ChatTool(_Request):
    """One entry of `tools`: a function the model may call."""

    type: Literal["function"] = "function"
    function: FunctionDefinition

    def template_tool(self) -> dict[str, Any]:
        """The tool as chat templates take it (`tools=` of `apply_chat_template`): OpenAI's shape, unset keys
        left out."""
        return self.model_dump(exclude_none=True)


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    """`tool_choice` naming the one function the model must call."""

    type: Literal["function"] = "function"
    function: NamedFunction


class ChatMessage(_Request):
    """One chat turn; `content` is a string, a list of text parts (joined by newlines, as vLLM does for templates
    that take string content) or null (an assistant turn that only called tools: an empty string). An assistant
    turn may carry the `tool_calls` it made; a `tool` turn answers one of them by its `tool_call_id`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextContentPart], None] = None
    name: Optional[str] = None  # reaches the chat template, as in vLLM
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[MessageToolCall]] = None

    @model_validator(mode="after")
    def _tool_results_name_their_call(self) -> "ChatMessage":
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the tool_call_id of the call it answers")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls (this one's role is {self.role!r})")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def template_message(self) -> dict[str, Any]:
        """The message as the chat template sees it: role, content as one string, and `name`, an assistant's
        `tool_calls` (arguments as objects, which tool-use templates expect) and a tool result's `tool_call_id`
        when given, as vLLM passes them."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls is not None:
            message["tool_calls"] = [call.template_call() for call in self.tool_calls]
        if self.role == "tool" and self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class JsonSchemaFormat(_Request):
    """`response_format.json_schema`: the schema the output must validate against (`schema`) and its name."""

    name: str
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Request):
    """OpenAI's `response_format`: free text, any JSON object, or JSON that validates against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError("a response_format of type 'json_schema' needs json_schema.schema, the JSON schema")
        return self


class StructuredOutputsField(_Request):
    """vLLM's `structured_outputs` extra field: exactly one of its constraints (checked when it is converted)."""

    json_: Union[str, dict[str, Any], None] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None


class SamplingRequest(_Request):
    """Fields shared by completions and chat: OpenAI's, then vLLM's extra body fields."""

    model: Optional[str] = None
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None
    # vLLM extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # OpenAI sends logit_bias keys as strings ("50256"); SamplingParams turns them into token ids.
    logit_bias: Optional[dict[str, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    # vLLM's older beam search: the beam width is best_of if given, else n; the n best beams come back, best first.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # The output's shape (`structured_fields` turns them into the engine's constraint; at most one may be given):
    # OpenAI's response_format, vLLM's structured_outputs, and vLLM's older guided_* fields.
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsField] = None
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: Optional[StreamOptions], info: ValidationInfo) -> Any:
        if value is not None and info.data.get("stream") is False:
            raise ValueError("stream_options can only be set when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """Body of `POST /v1/completions`."""

    prompt: Prompt
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: Optional[str]) -> Any:
        if value is not None:  # refused rather than ignored: the completion would not be what was asked for
            raise ValueError("suffix (insertion) is not supported by this server")
        return value

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt as a batch: each item is a string or a list of token ids."""
        return prompt_batch(self.prompt)


class ChatCompletionRequest(SamplingRequest):
    """Body of `POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    best_of: Optional[int] = None  # a vLLM extra here, as on completions
    tools: Optional[list[ChatTool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True

    @property
    def effective_tool_choice(self) -> Union[str, NamedToolChoice]:
        """`tool_choice` as vLLM resolves it: unset means "auto" with tools and "none" without; "required" with an
        empty tool list means "none", as OpenAI does."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        if self.tool_choice == "required" and self.tools == []:
            return "none"
        return self.tool_choice

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: Optional[int], info: ValidationInfo) -> Any:
        # As OpenAI; 0 is harmless and accepted without logprobs, as vLLM does.
        if value and info.data.get("logprobs") is False:
            raise ValueError("top_logprobs can only be set when logprobs is true")
        return value


class TokenizeRequest(_Request):
    """Body of `POST /tokenize` (vLLM): exactly one of `prompt` or `messages`."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[ChatTool]] = None  # reach the chat template with the messages, as on chat completions
    add_special_tokens: Optional[bool] = None  # None: True for a prompt, False for messages (template adds them)
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt or messages must be given")
        return self

    @property
    def use_special_tokens(self) -> bool:
        """The effective `add_special_tokens`."""
        return self.add_special_tokens if self.add_special_tokens is not None else self.prompt is not None


class DetokenizeRequest(_Request):
    """Body of `POST /detokenize` (vLLM)."""

    model: Optional[str] = None
    tokens: list[int]


class EmbeddingRequest(_Request):
    """Body of `POST /v1/embeddings`: OpenAI's fields, plus vLLM's `truncate_prompt_tokens`."""

    input: Prompt
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = Field(default=None, ge=1)

    def inputs(self) -> list[Union[str, list[int]]]:
        return prompt_batch(self.input)
