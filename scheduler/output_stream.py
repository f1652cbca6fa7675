"""Turns a request's cumulative outputs into the deltas a stream sends: new tokens and new text only."""
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
        self._sent_tokens: dict[int, int] = {}
        self._sent_chars: dict[int, int] = {}
        self._finished: set[int] = set()

    def delta(self, output: RequestOutput) -> RequestOutput | None:
        """The part of `output` not sent yet, or None when there is nothing new."""
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
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                )
            )
        if not deltas and not output.finished:
            return None
        return RequestOutput(
            request_id=output.request_id,
            prompt=output.prompt,
            prompt_token_ids=output.prompt_token_ids,
            outputs=deltas,
            finished=output.finished,
            error=output.error,
        )
