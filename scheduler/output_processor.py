"""Turns a sampled token into text and decides whether its sequence stops."""
from __future__ import annotations

from rayinfer.scheduler.sequence import Sequence
from rayinfer.scheduler.stop_strings import find_stop_string


def _cut_at_stop(text: str, stop: str, include: bool) -> str:
    start = text.find(stop)
    if start < 0:
        return text
    return text[: start + len(stop)] if include else text[:start]


class OutputProcessor:
    def __init__(self, max_model_len: int) -> None:
        self.max_model_len = max_model_len

    def append(self, seq: Sequence, token_id: int) -> bool:
        """Adds the token, extends the text, and returns whether the sequence has finished."""
        request = seq.request
        params = request.params
        seq.append_token(token_id)
        new_text = seq.detokenizer.append(token_id) if seq.detokenizer is not None else ""
        seq.output_text += new_text
        # A structured output's grammar allows EOS only where it ends: that ends the sequence, min_tokens or not.
        grammar_ended = params.structured_outputs is not None and token_id in request.eos_token_ids
        if len(seq.output_token_ids) >= params.min_tokens or grammar_ended:
            if token_id in request.stop_token_ids:
                stop_reason = None if token_id in request.eos_token_ids and token_id not in params.stop_token_ids else token_id
                return self._finish(seq, "stop", stop_reason)
            if params.stop and new_text:
                hit = find_stop_string(seq.output_text, len(new_text), params.stop)
                if hit is not None:
                    return self._finish(seq, "stop", hit[0])
        if len(seq.output_token_ids) >= request.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length", None)
        return False

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason: int | str | None) -> bool:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq.detokenizer is not None:
            # The final text is the tokenizer's own decode of the whole output, so it never differs from it.
            text = seq.detokenizer.final_text()
            if isinstance(stop_reason, str):
                text = _cut_at_stop(text, stop_reason, seq.request.params.include_stop_str_in_output)
            seq.output_text = text
        return True
