"""What a request's stream gets after a step: the new tokens (with their logprobs) and new text of each of its
sequences, the prompt and its ids in the first delta only, the prompt logprobs once, and the finish reason.

Built from what each sequence has sent so far, so a step costs what it added, not the request's whole output.
While a sequence runs, the last `len(stop) - 1` characters of its text are held back: they may begin a stop
string that would be cut from the final text, and sent text cannot be taken back. A best_of request sends only
its final output, in one delta (its n best sequences are known only at the end), as vLLM does.
"""
from __future__ import annotations

from rayinfer.scheduler.logprob_recorder import LogprobRecorder
from rayinfer.scheduler.outputs import CompletionOutput, RequestOutput
from rayinfer.scheduler.sequence import Request, Sequence
from rayinfer.scheduler.stop_strings import stop_holdback


def best_sequences(request: Request) -> list[Sequence]:
    """The request's n sequences of highest cumulative logprob, best first (all of them unless best_of > n)."""
    seqs = request.seqs
    if len(seqs) > request.params.n:
        seqs = sorted(seqs, key=lambda seq: -seq.cumulative_logprob)[: request.params.n]  # stable: ties by index
    return seqs


def request_delta(request: Request) -> RequestOutput | None:
    """The part of the request's output not sent yet, or None when there is nothing new."""
    params = request.params
    finished = request.is_finished
    if request.pooling is not None:
        return _pooling_delta(request) if finished else None
    if params.num_sequences > params.n and not finished:
        return None
    holdback = stop_holdback(params.stop)
    wants_logprobs = params.logprobs is not None
    completions = []
    for index, seq in enumerate(best_sequences(request)):
        completion = _sequence_delta(seq, index, holdback, wants_logprobs)
        if completion is not None:
            completions.append(completion)
    prompt_logprobs = None
    if not request.prompt_logprobs_sent:
        prompt_logprobs = LogprobRecorder.prompt_output(request)
    if not completions and not finished and prompt_logprobs is None:
        return None
    request.prompt_logprobs_sent |= prompt_logprobs is not None
    first = not request.prompt_sent
    request.prompt_sent = True
    return RequestOutput(
        request_id=request.request_id,
        prompt=request.prompt if first else None,
        prompt_token_ids=request.prompt_token_ids if first else None,
        outputs=completions,
        finished=finished,
        error=request.error,
        prompt_logprobs=prompt_logprobs,
    )


def _pooling_delta(request: Request) -> RequestOutput:
    """An embedding request's one delta: the prompt's ids and the embedding (or the error)."""
    request.prompt_sent = True
    return RequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        prompt_token_ids=request.prompt_token_ids,
        finished=True,
        error=request.error,
        embedding=request.embedding,
    )


def _sequence_delta(seq: Sequence, index: int, holdback: int, wants_logprobs: bool) -> CompletionOutput | None:
    if seq.finish_sent:
        return None
    done = seq.finish_reason is not None
    text = seq.output_text
    sent_chars = seq.num_sent_chars
    visible = len(text) if done else max(sent_chars, len(text) - holdback)
    sent_tokens = seq.num_sent_tokens
    if not done and visible == sent_chars and len(seq.output_token_ids) == sent_tokens:
        return None
    new_tokens = seq.output_token_ids[sent_tokens:]
    seq.num_sent_tokens += len(new_tokens)
    seq.num_sent_chars = max(sent_chars, visible)
    seq.finish_sent = done
    return CompletionOutput(
        index=index,
        text=text[sent_chars:visible],
        token_ids=new_tokens,
        cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
        logprobs=(seq.logprobs or [])[sent_tokens:] if wants_logprobs else None,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
    )
