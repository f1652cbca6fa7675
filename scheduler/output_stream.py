"""Turns a request's cumulative outputs into the deltas a stream sends: new tokens (with their logprobs) and new
text only; prompt logprobs once, in the first delta that has them. A best_of request streams only its final
output."""
from __future__ import annotations

from rayinfer.scheduler.outputs import CompletionOutput, RequestOutput
from rayinfer.scheduler.sampling_params import SamplingParams
from rayinfer.scheduler.stop_strings import stop_holdback


class DeltaTracker:
    """Remembers what one request's stream has sent.

    While a completion runs, the last `len(stop) - 1` characters are held back: they may be the start of a
    stop string that would be cut from the final text, and sent text cannot be taken back.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.holdback = stop_holdback(params.stop)
        # A best_of request's outputs are the n best of its sequences, known only once all have ended: like
        # vLLM, its stream sends nothing until then, then everything in one delta.
        self.final_only = params.num_sequences > params.n
        self._sent_tokens: dict[int, int] = {}
        self._sent_chars: dict[int, int] = {}
        self._finished: set[int] = set()
        self._sent_prompt_logprobs = False

    def delta(self, output: RequestOutput) -> RequestOutput | None:
        """The part of `output` not sent yet, or None when there is nothing new."""
        if self.final_only and not output.finished:
            return None
        deltas = []
        for completion in output.outputs:
            index = completion.index
            if index in self._finished:
                continue
            done = completion.finish_reason is not None
            sent_tokens = self._sent_tokens.get(index, 0)
            sent_chars = self._sent_chars.get(index, 0)
            visible = len(completion.text) if done else max(sent_chars, len(completion.text) - self.holdback)
            new_text = completion.text[sent_chars:visible]
            new_tokens = completion.token_ids[sent_tokens:]
            new_logprobs = completion.logprobs[sent_tokens:] if completion.logprobs is not None else None
            if not new_text and not new_tokens and not done:
                continue
            self._sent_tokens[index] = len(completion.token_ids)
            self._sent_chars[index] = max(sent_chars, visible)
            if done:
                self._finished.add(index)
            deltas.append(
                CompletionOutput(
                    index=index,
                    text=new_text,
                    token_ids=new_tokens,
                    cumulative_logprob=completion.cumulative_logprob,
                    logprobs=new_logprobs,
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                )
            )
        prompt_logprobs = None
        if output.prompt_logprobs is not None and not self._sent_prompt_logprobs:
            prompt_logprobs = output.prompt_logprobs
        if not deltas and not output.finished and prompt_logprobs is None:
            return None
        self._sent_prompt_logprobs |= prompt_logprobs is not None
        return RequestOutput(
            request_id=output.request_id,
            prompt=output.prompt,
            prompt_token_ids=output.prompt_token_ids,
            outputs=deltas,
            finished=output.finished,
            error=output.error,
            prompt_logprobs=prompt_logprobs,
        )
