"""The Ray Serve application: an OpenAI-compatible ingress in front of engine replicas.

`EngineDeployment` is one engine replica (the scheduler, with its tensor-parallel workers in the replica's
placement group); `Ingress` validates, tokenizes, applies chat templates and turns output deltas into OpenAI
JSON or server-sent events. Tokens go to the client as soon as the engine produces them: no batching interval.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from rayinfer.cluster import protocol as p
from rayinfer.configs import EngineConfig
from rayinfer.scheduler.actor import EngineActor
from rayinfer.scheduler.outputs import RequestOutput
from rayinfer.scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class EngineDeployment:
    """One engine replica; Serve adds and removes whole replicas, each with its own workers."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = EngineActor(config)

    def info(self) -> dict[str, Any]:
        engine = self.engine.engine
        return {"max_model_len": engine.max_model_len, "model": engine.config.model}

    async def generate(
        self, request_id: str, prompt: str | None, params: SamplingParams, prompt_token_ids: list[int] | None
    ) -> AsyncIterator[RequestOutput]:
        async for delta in self.engine.generate(request_id, prompt, params, prompt_token_ids):
            yield delta

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()


app = FastAPI(title="rayinfer", description="OpenAI-compatible LLM serving on Ray")


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(p.error_body(message, type_, param=param, code=status), status_code=status)


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(p.validation_error_body(exc), status_code=400)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, engine: Any, served_model_name: str, tokenizer_path: str) -> None:
        from transformers import AutoTokenizer

        self.engine = engine
        self.model_name = served_model_name
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.max_model_len: int | None = None

    async def _limits(self) -> int:
        if self.max_model_len is None:
            self.max_model_len = (await self.engine.info.remote())["max_model_len"]
        return self.max_model_len

    def _unknown_model(self, model: str | None) -> JSONResponse | None:
        if model is not None and model != self.model_name:
            return _error(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                          type_="not_found_error", param="model")
        return None

    # ------------------------------------------------------------------ plain routes
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict:
        card = p.ModelCard(id=self.model_name, root=self.model_name, max_model_len=await self._limits())
        return p.ModelList(data=[card]).model_dump()

    @app.post("/tokenize")
    async def tokenize(self, body: p.TokenizeRequest) -> Any:
        if (missing := self._unknown_model(body.model)) is not None:
            return missing
        if body.prompt is not None:
            text = body.prompt
        else:
            text = self._chat_text(body.messages, body.add_generation_prompt)
        tokens = self.tokenizer.encode(text, add_special_tokens=body.use_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return p.TokenizeResponse(count=len(tokens), max_model_len=await self._limits(), tokens=tokens, token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(self, body: p.DetokenizeRequest) -> Any:
        if (missing := self._unknown_model(body.model)) is not None:
            return missing
        return p.DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    # ------------------------------------------------------------------ generation
    @app.post("/v1/completions")
    async def completions(self, body: p.CompletionRequest) -> Any:
        if (missing := self._unknown_model(body.model)) is not None:
            return missing
        prompts = [self._encode(prompt) for prompt in body.prompts()]
        return await self._serve(body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: p.ChatCompletionRequest) -> Any:
        if (missing := self._unknown_model(body.model)) is not None:
            return missing
        text = self._chat_text(body.messages, body.add_generation_prompt)
        return await self._serve(body, [(text, self.tokenizer.encode(text, add_special_tokens=False))], chat=True)

    def _chat_text(self, messages: list[p.ChatMessage], add_generation_prompt: bool) -> str:
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        return self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    async def _serve(self, body: Any, prompts: list[tuple[str | None, list[int]]], chat: bool) -> Any:
        max_model_len = await self._limits()
        for _, ids in prompts:
            if len(ids) >= max_model_len:
                field = "messages" if chat else "prompt"
                return _error(400, f"This model's maximum context length is {max_model_len} tokens, but the "
                                   f"prompt has {len(ids)} tokens (at least one must be left for the output)", param=field)
        try:
            params = [body.to_sampling_params(max_model_len - len(ids)) for _, ids in prompts]
        except p.InvalidRequestError as exc:
            return _error(400, str(exc), param=exc.param)
        except ValueError as exc:
            return _error(400, str(exc))
        request_ids = [f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}" for _ in prompts]
        streams = [
            self.engine.options(stream=True).generate.remote(rid, text, sp, ids)
            for rid, (text, ids), sp in zip(request_ids, prompts, params)
        ]
        if body.stream:
            return StreamingResponse(
                self._sse(body, request_ids[0], streams, params, [len(ids) for _, ids in prompts], chat),
                media_type="text/event-stream",
            )
        try:
            outputs = [[delta async for delta in stream] for stream in streams]
        except ValueError as exc:
            return _error(400, str(exc))
        return self._full_response(body, request_ids[0], outputs, params, chat)

    def _full_response(self, body: Any, response_id: str, outputs: list[list[RequestOutput]], params, chat: bool):
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for prompt_index, deltas in enumerate(outputs):
            n = params[prompt_index].n
            texts, finish, counts = [""] * n, [None] * n, [0] * n
            for delta in deltas:
                if delta.error:
                    return _error(500, f"the engine failed this request: {delta.error}", type_="internal_error")
                for c in delta.outputs:
                    texts[c.index] += c.text
                    counts[c.index] += len(c.token_ids)
                    finish[c.index] = c.finish_reason or finish[c.index]
            prompt_tokens += len(deltas[0].prompt_token_ids) if deltas else 0
            completion_tokens += sum(counts)
            for i in range(n):
                index = prompt_index * n + i
                if chat:
                    message = p.ChatResponseMessage(content=texts[i])
                    choices.append(p.ChatCompletionChoice(index=index, message=message, finish_reason=finish[i]))
                else:
                    choices.append(p.CompletionChoice(index=index, text=texts[i], finish_reason=finish[i]))
        usage = p.UsageInfo.of(prompt_tokens, completion_tokens)
        model = self.model_name
        if chat:
            return p.ChatCompletionResponse(id=response_id, model=model, choices=choices, usage=usage)
        return p.CompletionResponse(id=response_id, model=model, choices=choices, usage=usage)

    async def _sse(self, body, response_id, streams, params, prompt_lens, chat: bool) -> AsyncIterator[str]:
        """Merges the prompts' delta streams into one event stream, each event sent the moment it exists."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(prompt_index: int, stream) -> None:
            try:
                async for delta in stream:
                    await queue.put((prompt_index, delta))
            except Exception as exc:  # surfaced to the client as an error event
                await queue.put((prompt_index, exc))
            finally:
                await queue.put((prompt_index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        model, created = self.model_name, p._now()
        chunk_cls = p.ChatCompletionStreamResponse if chat else p.CompletionStreamResponse
        completion_tokens, open_streams, started = 0, len(streams), set()
        try:
            while open_streams:
                prompt_index, item = await queue.get()
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, Exception):
                    yield f"data: {p.ErrorResponse(**p.error_body(str(item), 'invalid_request_error', code=400)).model_dump_json()}\n\n"
                    continue
                choices = []
                for c in item.outputs:
                    index = prompt_index * params[prompt_index].n + c.index
                    completion_tokens += len(c.token_ids)
                    if chat:
                        delta = p.DeltaMessage(content=c.text)
                        if index not in started:
                            started.add(index)
                            delta = p.DeltaMessage(role="assistant", content=c.text)
                        choices.append(p.ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=c.finish_reason))
                    else:
                        choices.append(p.CompletionChoice(index=index, text=c.text, finish_reason=c.finish_reason))
                if choices:
                    yield p.sse_event(chunk_cls(id=response_id, created=created, model=model, choices=choices))
            if body.include_usage:
                usage = p.UsageInfo.of(sum(prompt_lens), completion_tokens)
                yield p.sse_event(chunk_cls(id=response_id, created=created, model=model, choices=[], usage=usage))
            yield p.SSE_DONE
        finally:
            for task in tasks:
                task.cancel()  # a client that went away cancels its streams, which aborts the requests


def build_app(config: EngineConfig, served_model_name: str | None = None) -> Any:
    """The Serve application: one engine deployment whose replicas own their workers' placement group."""
    from rayinfer.workers.ray_executor import worker_bundles

    if config.distributed_executor_backend is None:
        config = config.model_copy(update={"distributed_executor_backend": "ray"})
    engine = EngineDeployment.options(
        placement_group_bundles=worker_bundles(config), placement_group_strategy=config.placement_strategy
    ).bind(config)
    return Ingress.bind(engine, served_model_name or config.model, config.tokenizer_path)
