"""Whether a request can ever run on this engine: its prompt, its sampling settings and its worst-case KV need,
against the engine's limits. The one place a request is checked past its own parameters' ranges (those are
`SamplingParams`' job); each refusal names the field and the limit."""
from __future__ import annotations

from dataclasses import dataclass

from rayinfer.scheduler.block_manager import blocks_for
from rayinfer.scheduler.request_errors import InvalidRequestError
from rayinfer.scheduler.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int
    vocab_size: int
    max_logprobs: int  # -1: no cap
    max_num_seqs: int
    num_blocks: int
    block_size: int
    max_stop_strings: int = 32
    max_stop_string_length: int = 1024

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises InvalidRequestError when the request could never run."""
        self._check_prompt(prompt_token_ids)
        self._check_sampling(params)
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        self._check_fits_pool(len(prompt_token_ids), max_tokens)

    def check_pooling(self, prompt_token_ids: list[int]) -> None:
        """An embedding request: its whole prompt must fit the context and the pool (no output follows it)."""
        if len(prompt_token_ids) > self.max_model_len:
            raise InvalidRequestError.about(
                "input", f"{len(prompt_token_ids)} tokens is too long; max_model_len is {self.max_model_len} (set "
                "truncate_prompt_tokens to embed the last tokens only)",
            )
        self._check_prompt(prompt_token_ids, leave_room=False)
        if blocks_for(len(prompt_token_ids), self.block_size) > self.num_blocks:
            raise InvalidRequestError.about(
                "input", f"{len(prompt_token_ids)} tokens need more KV cache than the whole pool holds "
                f"({self.num_blocks} blocks of {self.block_size} tokens)",
            )

    def _check_prompt(self, token_ids: list[int], leave_room: bool = True) -> None:
        if not token_ids:
            raise InvalidRequestError.about("prompt", "must not be empty")
        if leave_room and len(token_ids) >= self.max_model_len:
            raise InvalidRequestError.about(
                "prompt",
                f"{len(token_ids)} tokens is too long; max_model_len is {self.max_model_len} and at least one token "
                "must be left for the output",
            )
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError.about(
                "prompt_token_ids", f"ids must be in [0, {self.vocab_size}) for this model (got {bad[:5]})"
            )

    def _check_sampling(self, params: SamplingParams) -> None:
        cap = self.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            requested = getattr(params, name)
            if requested is not None and cap != -1 and requested > cap:
                raise InvalidRequestError.about(name, f"{requested} requested, but this engine's max_logprobs is {cap}")
        for name, token_ids in params.token_ids_to_check().items():
            bad = [t for t in token_ids if t >= self.vocab_size]
            if bad:
                raise InvalidRequestError.about(
                    name, f"token ids must be in [0, {self.vocab_size}) for this model (got {bad[:5]})"
                )
        if len(params.stop) > self.max_stop_strings:
            raise InvalidRequestError.about(
                "stop", f"{len(params.stop)} stop strings given; this engine's max_stop_strings is {self.max_stop_strings}"
            )
        longest = max((len(s) for s in params.stop), default=0)
        if longest > self.max_stop_string_length:
            raise InvalidRequestError.about(
                "stop", f"a stop string of {longest} characters is too long; this engine's max_stop_string_length is "
                f"{self.max_stop_string_length}"
            )
        if params.n > self.max_num_seqs:
            raise InvalidRequestError.about(
                "n", f"{params.n} sequences cannot run together with max_num_seqs={self.max_num_seqs}"
            )
        if params.num_sequences > self.max_num_seqs:
            raise InvalidRequestError.about(
                "best_of", f"{params.num_sequences} sequences cannot run together with max_num_seqs={self.max_num_seqs}"
            )

    def _check_fits_pool(self, prompt_len: int, max_tokens: int) -> None:
        worst_case = min(prompt_len + max_tokens, self.max_model_len)
        if blocks_for(worst_case, self.block_size) > self.num_blocks:
            raise InvalidRequestError.about(
                "max_tokens",
                f"the request may need {worst_case} tokens of KV cache (prompt {prompt_len} + max_tokens "
                f"{max_tokens}), but the whole pool holds {self.num_blocks} blocks of {self.block_size} tokens; "
                "lower max_tokens or give the cache more memory",
            )
