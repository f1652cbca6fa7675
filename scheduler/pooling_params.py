"""How an embedding request wants its prompt pooled: `PoolingParams`, the counterpart of `SamplingParams`.

An engine request made with these runs its prompt once (prefill only, chunked like any other) and ends with the
final hidden state of its last token, L2-normalised (vLLM's default pooling for decoder models), instead of
drawing tokens; its KV blocks are freed as soon as that step returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayinfer.scheduler.request_errors import InvalidRequestError


@dataclass
class PoolingParams:
    # Keep only the last k prompt tokens (vLLM's `truncate_prompt_tokens`): for texts longer than the context.
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise InvalidRequestError(f"truncate_prompt_tokens must be an integer >= 1 (got {k!r})",
                                      "truncate_prompt_tokens")

    def truncate(self, token_ids: list[int]) -> list[int]:
        k = self.truncate_prompt_tokens
        return token_ids if k is None else token_ids[-k:]
