"""OpenAI response bodies and server-sent events from the engine's output deltas.

A `Renderer` renders one response: completions choices (the prompt first with `echo`, logprobs in the legacy
format) or chat choices, as a whole response from assembled outputs, or as one stream chunk per delta. Prompt i's
completion j is choice i * n + j. A stream sends each delta as it comes, so a renderer keeps, per choice,
whether it has started (chat's first delta names the role; echo puts the prompt first) and where its next
`text_offset` starts, and the tokens sent so far for the usage chunk. A chat request with tool calling
(`tool_calls.ToolCalling`) has each choice's text read for calls: whole, or streamed as argument deltas.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel

from rayinfer.cluster.openai.logprobs import chat_logprobs, completion_logprobs, next_text_offset
from rayinfer.cluster.openai.request_models import ChatCompletionRequest, SamplingRequest
from rayinfer.cluster.openai.response_models import (
    ChatCompletionChoice,
    ChatCompletionLogProbs,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    UsageInfo,
    now_s,
)
from rayinfer.cluster.openai.tool_calls import ToolCalling, ToolCallStreams
from rayinfer.scheduler.outputs import CompletionOutput, RequestOutput

SSE_DONE = "data: [DONE]\n\n"

# A prompt as the routes give it to the engine: its text (None when the client gave token ids) and its token ids.
PromptInput = tuple[Optional[str], list[int]]
# Echo: the prompt's text (None: decode its ids), its ids and logprobs (None: not asked).
Echo = tuple[Optional[str], list[int], Optional[list]]


def sse_event(chunk: BaseModel) -> str:
    """One server-sent event line for a stream chunk; end the stream with `SSE_DONE`."""
    return f"data: {chunk.model_dump_json()}\n\n"


class Renderer:
    """One response to `body` over `prompts`: its id, `created` time and model name, shared by all its chunks;
    `tool_calling` reads a chat request's outputs for tool calls."""

    def __init__(
        self, body: SamplingRequest, model: str, tokenizer: Any, prompts: list[PromptInput], response_id: str,
        tool_calling: Optional[ToolCalling] = None,
    ) -> None:
        self.body = body
        self.chat = isinstance(body, ChatCompletionRequest)
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.response_id = response_id
        self.created = now_s()
        self._completion_tokens = 0  # a stream's progress, from here on
        self._started: set[int] = set()
        self._prompt_logprobs: dict[int, list] = {}  # by prompt: the engine sends them once
        self._text_offsets: dict[int, int] = {}  # by choice
        self.tool_calling = tool_calling
        self._tool_streams = ToolCallStreams(tool_calling) if tool_calling is not None else None

    # ------------------------------------------------------------------ bodies
    def usage(self, completion_tokens: int) -> UsageInfo:
        return UsageInfo.of(sum(len(ids) for _, ids in self.prompts), completion_tokens)

    def response(self, choices: list, usage: UsageInfo) -> Union[CompletionResponse, ChatCompletionResponse]:
        cls = ChatCompletionResponse if self.chat else CompletionResponse
        return cls(id=self.response_id, created=self.created, model=self.model, choices=choices, usage=usage)

    def chunk(self, choices: list, usage: Optional[UsageInfo] = None) -> str:
        """A stream chunk as its event."""
        cls = ChatCompletionStreamResponse if self.chat else CompletionStreamResponse
        return sse_event(cls(id=self.response_id, created=self.created, model=self.model, choices=choices,
                             usage=usage))

    # ------------------------------------------------------------------ choices
    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion_choice(
        self, index: int, text: str, token_ids: list[int], logprobs: Optional[list], finish_reason: Optional[str],
        echo: Optional[Echo] = None, text_offset: int = 0,
    ) -> tuple[CompletionChoice, int]:
        """A completions choice (or stream chunk choice) and where the next chunk's `text_offset` starts. With
        `echo` the prompt goes first, its first token's logprobs null as nothing predicts it."""
        if echo is not None:
            prompt_text, prompt_ids, prompt_logprobs = echo
            if prompt_text is None:
                prompt_text = self.tokenizer.decode(prompt_ids)
            prompt_logprobs = list(prompt_logprobs) if prompt_logprobs is not None else [None] * len(prompt_ids)
            text = prompt_text + text
            token_ids = [*prompt_ids, *token_ids]
            logprobs = prompt_logprobs + list(logprobs or [])
        data = None
        if self.body.logprobs is not None:
            data = completion_logprobs(token_ids, logprobs, self.body.logprobs, self.decode_token, text_offset)
            text_offset = next_text_offset(data, text_offset)
        return CompletionChoice(index=index, text=text, logprobs=data, finish_reason=finish_reason), text_offset

    def chat_logprobs(self, token_ids: list[int], logprobs: Optional[list]) -> Optional[ChatCompletionLogProbs]:
        if not self.body.logprobs:
            return None
        return chat_logprobs(token_ids, logprobs, self.body.top_logprobs or 0, self.decode_token)

    def _echo(self, prompt_index: int, prompt_logprobs: Optional[list]) -> Optional[Echo]:
        return (*self.prompts[prompt_index], prompt_logprobs) if getattr(self.body, "echo", False) else None

    # ------------------------------------------------------------------ whole responses
    def full_response(self, outputs: list[RequestOutput]) -> Union[CompletionResponse, ChatCompletionResponse]:
        """The response from each prompt's assembled output."""
        n, choices, completion_tokens = self.body.n, [], 0
        for prompt_index, output in enumerate(outputs):
            by_index = {completion.index: completion for completion in output.outputs}
            for i in range(n):
                c = by_index.get(i) or CompletionOutput(i, "", [])
                completion_tokens += len(c.token_ids)
                index = prompt_index * n + i
                if self.chat:
                    message, finish_reason = self._chat_message(c.text, c.finish_reason)
                    choices.append(ChatCompletionChoice(
                        index=index, message=message, logprobs=self.chat_logprobs(c.token_ids, c.logprobs),
                        finish_reason=finish_reason))
                else:
                    choice, _ = self.completion_choice(index, c.text, c.token_ids, c.logprobs, c.finish_reason,
                                                       echo=self._echo(prompt_index, output.prompt_logprobs))
                    choices.append(choice)
        return self.response(choices, self.usage(completion_tokens))

    # ------------------------------------------------------------------ streams
    def delta_event(self, prompt_index: int, delta: RequestOutput) -> Optional[str]:
        """The chunk for one delta of prompt `prompt_index`'s request; None when it adds no choice."""
        if delta.prompt_logprobs is not None:
            self._prompt_logprobs[prompt_index] = delta.prompt_logprobs
        choices = []
        for c in delta.outputs:
            index = prompt_index * self.body.n + c.index
            self._completion_tokens += len(c.token_ids)
            first = index not in self._started
            self._started.add(index)
            if self.chat:
                message, finish_reason = self._chat_delta(index, c.text, c.finish_reason, first)
                choices.append(ChatCompletionStreamChoice(
                    index=index, delta=message, logprobs=self.chat_logprobs(c.token_ids, c.logprobs),
                    finish_reason=finish_reason))
                continue
            echo = self._echo(prompt_index, self._prompt_logprobs.get(prompt_index)) if first else None
            choice, self._text_offsets[index] = self.completion_choice(
                index, c.text, c.token_ids, c.logprobs, c.finish_reason, echo=echo,
                text_offset=self._text_offsets.get(index, 0))
            choices.append(choice)
        return self.chunk(choices) if choices else None

    def _chat_message(self, text: str, finish_reason: Optional[str]) -> tuple[ChatResponseMessage, Optional[str]]:
        """A whole chat choice's message (its tool calls read out of the text) and finish reason."""
        if self.tool_calling is None:
            return ChatResponseMessage(content=text), finish_reason
        content, calls = self.tool_calling.parse(text)
        message = ChatResponseMessage(content=content, tool_calls=calls or None)
        return message, self.tool_calling.finish_reason(finish_reason, bool(calls))

    def _chat_delta(
        self, index: int, text: str, finish_reason: Optional[str], first: bool
    ) -> tuple[DeltaMessage, Optional[str]]:
        """A streamed chat choice's delta (with tool-call pieces, content only where there is some) and finish
        reason."""
        role = "assistant" if first else None
        if self._tool_streams is None:
            return DeltaMessage(role=role, content=text), finish_reason
        piece, finish_reason = self._tool_streams.delta(index, text, finish_reason)
        content = piece.content if piece.content or not piece.tool_calls else None
        return DeltaMessage(role=role, content=content, tool_calls=piece.tool_calls or None), finish_reason

    def usage_event(self) -> str:
        """The stream's closing usage chunk: every prompt's tokens and the completion tokens streamed."""
        return self.chunk([], usage=self.usage(self._completion_tokens))
