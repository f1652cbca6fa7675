"""A `use_beam_search` request, searched by the replica that received it.

The search is `rayinfer.cluster.beam_search` (the loop `LLM.beam_search` runs); here each of its steps is one
engine request per live beam (`max_tokens=1`, the candidates as logprobs), all of a step's requests at once, so
they share one batch and the prompt's cached blocks. The answer is known only at the end, so a streamed beam
search sends it as one chunk (then the usage chunk if asked, and `[DONE]`), as a `best_of` stream does.
"""
from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from rayinfer.cluster.beam_search import Beam, beam_search_async, step_logprobs
from rayinfer.cluster.openai.engine_calls import all_or_none, cancel, open_stream
from rayinfer.cluster.openai.errors import engine_ended, engine_failure, invalid_request
from rayinfer.cluster.openai.rendering import SSE_DONE, Renderer
from rayinfer.cluster.openai.response_models import (
    ChatCompletionChoice,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    CompletionChoice,
    DeltaMessage,
)
from rayinfer.cluster.openai.sampling_fields import beam_width_field, to_beam_search_params
from rayinfer.scheduler.detokenizer import IncrementalDetokenizer
from rayinfer.scheduler.outputs import PositionLogprobs
from rayinfer.scheduler.request_errors import InvalidRequestError
from rayinfer.scheduler.sampling_params import BeamSearchParams, SamplingParams


class _StepFailed(Exception):
    """An engine step of a beam search that ended in an error."""


def _candidates_per_beam(renderer: Renderer, params: BeamSearchParams, info: dict[str, Any]) -> int:
    """The logprobs each step asks per beam; refused, naming the width's field, over the engine's max_logprobs."""
    wanted = step_logprobs(params, info["eos_token_ids"], info["vocab_size"])
    cap = info["max_logprobs"]
    if cap != -1 and wanted > cap:
        field = beam_width_field(renderer.body)
        raise InvalidRequestError(
            f"{field}: a beam width of {params.beam_width} needs {wanted} candidate logprobs per beam and step, "
            f"but this engine's max_logprobs is {cap}; lower {field}",
            field,
        )
    return wanted


async def serve_beam_search(engine: Any, info: dict[str, Any], renderer: Renderer) -> Any:
    """Each prompt's search, every step an engine call per live beam; `info` is the engine's limits
    (`EngineReplica.info`)."""
    body, prompts, max_model_len = renderer.body, renderer.prompts, info["max_model_len"]
    try:
        params = [to_beam_search_params(body, max_model_len - len(ids)) for _, ids in prompts]
        wanted = _candidates_per_beam(renderer, params[0], info)
    except InvalidRequestError as exc:
        return invalid_request(exc)
    # As `LLM.beam_search` asks each step (temperature 0: the beam search of transformers).
    step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=wanted, ignore_eos=True)
    call_ids = itertools.count()

    async def one(token_ids: list[int]) -> PositionLogprobs:
        stream = open_stream(engine, f"{renderer.response_id}-{next(call_ids)}", None, step_params, token_ids)
        entry = None
        try:
            async for delta in stream:
                if delta.error:
                    raise _StepFailed(delta.error)
                for c in delta.outputs:
                    if c.logprobs:
                        entry = c.logprobs[0]
        except BaseException:  # failed, or the client left: stop the call
            cancel([stream])
            raise
        if entry is None:
            raise _StepFailed("the engine returned no logprobs")
        return entry

    async def step(inputs: list[list[int]]) -> list[PositionLogprobs]:
        return await all_or_none([one(ids) for ids in inputs])

    eos = info["eos_token_ids"]
    try:
        results = await all_or_none([
            beam_search_async(step, [ids], sp, eos, max_model_len) for (_, ids), sp in zip(prompts, params)
        ])
    except _StepFailed as exc:
        return engine_ended(str(exc))
    except Exception as exc:  # refused when added (400), for capacity (503), or the engine failed (500)
        # A step's logprobs are the beams' candidates: the width asked for them.
        return engine_failure(exc, body, renames={"logprobs": beam_width_field(body)})
    return _beams_response(renderer, [prompt_beams[: body.n] for (prompt_beams,) in results])


def _beam_text(renderer: Renderer, prompt_ids: list[int], beam: Beam) -> str:
    """A beam's text, detokenized as the engine (and `LLM.beam_search`) does its outputs."""
    detokenizer = IncrementalDetokenizer(renderer.tokenizer, prompt_ids,
                                         skip_special_tokens=renderer.body.skip_special_tokens)
    for token_id in beam.token_ids:
        detokenizer.append(token_id)
    return detokenizer.final_text()


def _beams_response(renderer: Renderer, beams: list[list[Beam]]) -> Any:
    """The n best beams of each prompt as choices (prompt i's beam j is choice i * n + j); `usage` counts each
    prompt once and the returned beams' tokens. Streamed: all choices in one chunk."""
    body, choices, stream_choices = renderer.body, [], []
    for prompt_index, ((_, ids), prompt_beams) in enumerate(zip(renderer.prompts, beams)):
        for rank, beam in enumerate(prompt_beams):
            index, text = prompt_index * body.n + rank, _beam_text(renderer, ids, beam)
            if renderer.chat:
                choices.append(ChatCompletionChoice(index=index, message=ChatResponseMessage(content=text),
                                                    finish_reason=beam.finish_reason))
                stream_choices.append(ChatCompletionStreamChoice(
                    index=index, delta=DeltaMessage(role="assistant", content=text), finish_reason=beam.finish_reason))
            else:
                choices.append(CompletionChoice(index=index, text=text, finish_reason=beam.finish_reason))
    usage = renderer.usage(sum(len(beam.token_ids) for prompt_beams in beams for beam in prompt_beams))
    if not body.stream:
        return renderer.response(choices, usage)
    events = [renderer.chunk(stream_choices if renderer.chat else choices)]
    if body.include_usage:
        events.append(renderer.chunk([], usage=usage))
    events.append(SSE_DONE)

    async def send() -> AsyncIterator[str]:
        for event in events:
            yield event

    return StreamingResponse(send(), media_type="text/event-stream")
