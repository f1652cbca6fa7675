"""`POST /v1/embeddings`: how it runs on the replica's engine (its body and response are in `request_models` and
`response_models`).

Each input is one engine request with `PoolingParams`: its prompt runs once through the same scheduler and
workers as any other (chunked, batched with generation), and the request ends with the final hidden state of
its last token, L2-normalised, as vLLM's default pooling for decoder models gives. `encoding_format: base64`
is the little-endian float32 bytes, which the `openai` client asks for by default and decodes with numpy.
"""
from __future__ import annotations

import base64
import struct
from typing import Any, Optional, Union

from rayinfer.cluster.openai.engine_calls import cancel, first_deltas, open_stream, whole_output
from rayinfer.cluster.openai.errors import engine_ended, engine_failure, invalid_request
from rayinfer.cluster.openai.request_models import EmbeddingRequest
from rayinfer.cluster.openai.response_models import EmbeddingData, EmbeddingResponse, EmbeddingUsage, random_id
from rayinfer.scheduler.pooling_params import PoolingParams
from rayinfer.scheduler.request_errors import InvalidRequestError


def _encode(vector: list[float], encoding_format: str) -> Union[list[float], str]:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _check(body: EmbeddingRequest, items: list, info: dict, max_inputs: int) -> Optional[InvalidRequestError]:
    """What the route refuses before the engine sees the inputs, naming the field and the limit (the engine refuses
    token ids outside the vocabulary and inputs over the context, which `serve_embeddings` blames on `input`)."""
    if len(items) > max_inputs:
        return InvalidRequestError.about("input", f"{len(items)} inputs in one request; this server's "
                                                  f"max_prompts_per_request is {max_inputs}")
    if any(isinstance(item, str) and not item for item in items):  # it would embed the BOS token alone
        return InvalidRequestError.about("input", "must not contain empty strings")
    hidden = info["hidden_size"]
    if body.dimensions is not None and body.dimensions != hidden:
        return InvalidRequestError.about("dimensions", f"this model's embeddings have {hidden} dimensions and cannot "
                                                       f"be shortened (got {body.dimensions})")
    return None


async def serve_embeddings(engine: Any, tokenizer: Any, info: dict, body: EmbeddingRequest, model_name: str,
                           max_inputs: int) -> Any:
    """The whole response for `body`, or the error response: 400 naming the field, 500 if the engine failed."""
    items = body.inputs()
    refusal = _check(body, items, info, max_inputs)
    if refusal is not None:
        return invalid_request(refusal)
    params = PoolingParams(truncate_prompt_tokens=body.truncate_prompt_tokens)
    prompts = [(item, tokenizer.encode(item)) if isinstance(item, str) else (None, list(item)) for item in items]
    streams = [open_stream(engine, random_id("embd"), text, params, ids) for text, ids in prompts]
    try:
        firsts = await first_deltas(streams)
        outputs = [await whole_output(first, stream) for first, stream in zip(firsts, streams)]
    except BaseException as exc:  # refused, failed, or the client left (cancelled): abort what still runs
        cancel(streams)
        if not isinstance(exc, Exception):
            raise
        if isinstance(exc, InvalidRequestError):
            return invalid_request(exc.renamed("truncate_prompt_tokens" if exc.field == "truncate_prompt_tokens"
                                               else "input"))
        return engine_failure(exc)
    failed = next((output.error for output in outputs if output.error), None)
    if failed is not None:
        return engine_ended(failed)
    data = [EmbeddingData(index=i, embedding=_encode(output.embedding, body.encoding_format))
            for i, output in enumerate(outputs)]
    prompt_tokens = sum(len(output.prompt_token_ids or []) for output in outputs)
    usage = EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
    return EmbeddingResponse(model=model_name, data=data, usage=usage).model_dump()

