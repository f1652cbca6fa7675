"""The engine's per-token logprobs in OpenAI's two formats: the legacy completions object (parallel lists with
text offsets) and chat's per-token entries with their `top_logprobs`."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from rayinfer.cluster.openai.response_models import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    CompletionLogProbs,
)

# JSON has no -inf: OpenAI (and vLLM) send this floor for a token the model rules out.
LOGPROB_FLOOR = -9999.0

# One position's candidates as the engine gives them: token id -> an object with `logprob`, `rank` (1-based,
# by raw logit) and `decoded_token` (`rayinfer.scheduler.outputs.Logprob`); the scored token comes first.
PositionLogprobs = Mapping[int, Any]
Positions = Optional[Sequence[Optional[PositionLogprobs]]]


def _json_logprob(value: float) -> float:
    return max(float(value), LOGPROB_FLOOR)


def _token_text(token_id: int, logprob: Any, decode: Callable[[int], str]) -> str:
    text = getattr(logprob, "decoded_token", None)
    return text if text is not None else decode(token_id)


def _position(positions: Positions, i: int) -> Optional[PositionLogprobs]:
    return positions[i] if positions is not None and i < len(positions) else None


def completion_logprobs(
    token_ids: Sequence[int],
    positions: Positions,
    num_top: int,
    decode: Callable[[int], str],
    initial_offset: int = 0,
) -> CompletionLogProbs:
    """The legacy completions `logprobs` object for `token_ids`, as vLLM builds it.

    `positions[i]` holds token i's candidates (None where nothing predicts it: its entries are null).
    `top_logprobs[i]` maps text to logprob for the token itself and the `num_top` most likely ones (so
    `num_top` or `num_top + 1` entries); `text_offset` starts at `initial_offset` and adds each token's text
    length, so a stream's chunks continue one another. `decode(id)` names a token the engine gave no text for.
    """
    out = CompletionLogProbs()
    offset = initial_offset
    for i, token_id in enumerate(token_ids):
        position = _position(positions, i)
        scored = position.get(token_id) if position is not None else None
        token = _token_text(token_id, scored, decode)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if scored is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_json_logprob(scored.logprob))
        top: dict[str, float] = {}
        for candidate_id, candidate in position.items():
            rank = getattr(candidate, "rank", None)
            if candidate_id == token_id or rank is None or rank <= num_top:
                top.setdefault(_token_text(candidate_id, candidate, decode), _json_logprob(candidate.logprob))
        out.top_logprobs.append(top)
    return out


def next_text_offset(logprobs: CompletionLogProbs, initial_offset: int) -> int:
    """Where the next stream chunk's `text_offset` starts after `logprobs`."""
    return initial_offset + sum(len(token) for token in logprobs.tokens)


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(
    token_ids: Sequence[int],
    positions: Positions,
    top_logprobs: int,
    decode: Callable[[int], str],
) -> ChatCompletionLogProbs:
    """A chat choice's `logprobs` for `token_ids`: each token's text, logprob and UTF-8 bytes, and its
    `top_logprobs` list of the `top_logprobs` most likely tokens, by rank (as OpenAI: exactly that many)."""
    content = []
    for i, token_id in enumerate(token_ids):
        position = _position(positions, i)
        scored = position.get(token_id) if position is not None else None
        token = _token_text(token_id, scored, decode)
        if scored is None:
            content.append(ChatCompletionLogProbsContent(token=token, bytes=_token_bytes(token)))
            continue
        candidates = list(position.items())
        if all(getattr(c, "rank", None) is not None for _, c in candidates):
            candidates.sort(key=lambda item: item[1].rank)
        top = []
        for candidate_id, candidate in candidates[: max(top_logprobs, 0)]:
            text = _token_text(candidate_id, candidate, decode)
            top.append(ChatCompletionLogProb(token=text, logprob=_json_logprob(candidate.logprob),
                                             bytes=_token_bytes(text)))
        content.append(ChatCompletionLogProbsContent(
            token=token, logprob=_json_logprob(scored.logprob), bytes=_token_bytes(token), top_logprobs=top))
    return ChatCompletionLogProbs(content=content)
