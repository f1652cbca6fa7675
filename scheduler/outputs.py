"""What a request returns, shaped as vLLM returns it.

The engine emits deltas: each `RequestOutput` it returns carries only what a step added (new token ids, text and
logprobs per completion), the prompt and its ids in the first delta only (None after). A front door that wants
the whole output assembles it once, with `RequestOutput.add`, as the offline `LLM` and a non-streamed HTTP
response do.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One candidate token at one position: its log-probability under the model's raw logits (before penalties,
    temperature, top-k/p and logit_bias), its 1-based rank by raw logit (1 = argmax), and its own text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: token id -> Logprob, for the top k tokens plus the token actually there (so k or k + 1 entries).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # sum of the drawn tokens' logprobs; None unless logprobs asked
    logprobs: list[PositionLogprobs] | None = None  # one dict per token of token_ids, when logprobs asked
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it; None for EOS

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None  # None in every delta but a request's first
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    error: str | None = None  # why the request ended early, when it did
    # One entry per prompt token when prompt_logprobs asked (the first None: nothing predicts it).
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # An embedding request's result (`PoolingParams`): the final hidden state of the prompt's last token,
    # L2-normalised; it has no `outputs`.
    embedding: list[float] | None = None

    def add(self, delta: RequestOutput) -> None:
        """Appends a later delta of the same request to this (assembled) output."""
        by_index = {completion.index: completion for completion in self.outputs}
        for piece in delta.outputs:
            completion = by_index.get(piece.index)
            if completion is None:
                completion = by_index[piece.index] = CompletionOutput(piece.index, "", [])
                self.outputs.append(completion)
            completion.text += piece.text
            completion.token_ids.extend(piece.token_ids)
            if piece.logprobs is not None:
                if completion.logprobs is None:
                    completion.logprobs = []
                completion.logprobs.extend(piece.logprobs)
            completion.cumulative_logprob = piece.cumulative_logprob
            completion.finish_reason = piece.finish_reason
            completion.stop_reason = piece.stop_reason
        self.outputs.sort(key=lambda completion: completion.index)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.embedding is not None:
            self.embedding = delta.embedding
        self.finished = delta.finished
        self.error = delta.error or self.error


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """What `LLM.embed` returns per prompt, shaped as vLLM's."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


class OutputAssembler:
    """Whole outputs from a stream of deltas of many requests: `add` returns a request's output once it ends."""

    def __init__(self) -> None:
        self._partial: dict[str, RequestOutput] = {}

    def add(self, delta: RequestOutput) -> RequestOutput | None:
        output = self._partial.get(delta.request_id)
        if output is None:
            output = self._partial[delta.request_id] = RequestOutput(
                delta.request_id, delta.prompt, list(delta.prompt_token_ids or [])
            )
        output.add(delta)
        if not output.finished:
            return None
        del self._partial[delta.request_id]
        return output
