"""The Ray Serve application: an OpenAI-compatible ingress in front of engine replicas.

`EngineDeployment` is one engine replica (the scheduler, with its tensor-parallel workers in the replica's
placement group); `Ingress` validates, tokenizes, applies chat templates and turns output deltas into OpenAI
JSON or server-sent events. Tokens go to the client as soon as the engine produces them: no batching interval.

A `use_beam_search` request runs its search from the ingress (`rayinfer.cluster.beam_search`, the loop
`LLM.beam_search` runs): each step is one engine call per live beam (`max_tokens=1`, the candidates as logprobs),
all of a step's calls at once, so the beams spread over the engine replicas. Its answer is known only at the end,
so a streamed beam search sends it as one chunk (then the usage chunk if asked, and `[DONE]`), as a `best_of`
stream does.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError

from rayinfer.cluster import protocol as p
from rayinfer.cluster.beam_search import Beam, beam_search_async, step_logprobs
from rayinfer.cluster.metrics import ReplicaMetrics, render_prometheus
from rayinfer.configs import EngineConfig
from rayinfer.scheduler.actor import EngineActor
from rayinfer.scheduler.detokenizer import IncrementalDetokenizer
from rayinfer.scheduler.outputs import PositionLogprobs, RequestOutput
from rayinfer.scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


# Serve's default of 5 ongoing requests per replica would starve continuous batching; the queue in front of
# the replicas is bounded so that overload answers 503 instead of growing without limit.
ENGINE_MAX_ONGOING_REQUESTS = 256
ENGINE_MAX_QUEUED_REQUESTS = 1024
INGRESS_MAX_ONGOING_REQUESTS = 2048
RETRY_AFTER_S = 1


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=ENGINE_MAX_ONGOING_REQUESTS,
    max_queued_requests=ENGINE_MAX_QUEUED_REQUESTS,
)
class EngineDeployment:
    """One engine replica; Serve adds and removes whole replicas, each with its own workers."""

    def __init__(self, config: EngineConfig) -> None:
        from rayinfer.cluster.metrics_board import Publisher
        from rayinfer.workers.tiny_checkpoint import ensure_model_dir

        ensure_model_dir(config.model)  # the built-in tiny model is built on whichever node the replica lands
        self.engine = EngineActor(config)
        self.metrics = ReplicaMetrics()
        context = serve.get_replica_context()
        self.publisher = Publisher(context.app_name, context.replica_tag, self._snapshot)

    def _snapshot(self) -> dict[str, Any]:
        return self.metrics.snapshot(self.engine.stats())

    def info(self) -> dict[str, Any]:
        engine = self.engine.engine
        return {
            "max_model_len": engine.max_model_len,
            "model": engine.config.model,
            "max_logprobs": engine.config.max_logprobs,
            "eos_token_ids": sorted(engine.eos_token_ids),
            "vocab_size": engine.model_spec.vocab_size,
        }

    async def generate(
        self, request_id: str, prompt: str | None, params: SamplingParams, prompt_token_ids: list[int] | None
    ) -> AsyncIterator[RequestOutput]:
        timer = self.metrics.track()
        try:
            async for delta in self.engine.generate(request_id, prompt, params, prompt_token_ids):
                timer.on_delta(delta)
                yield delta
        except ValueError:  # refused before it started: not a served request
            timer = None
            raise
        finally:
            if timer is not None:
                timer.on_end()
                self.publisher.poke()

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def check_health(self) -> None:
        """Serve replaces a replica whose worker group died beyond repair."""
        if self.engine.engine.failure is not None:
            raise RuntimeError(self.engine.engine.failure)

    def __del__(self) -> None:
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            publisher.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


# Serve pickles a deployment's class when it is decorated, with the module globals that exist at that moment:
# every helper the deployments call must be defined above them.
app = FastAPI(title="rayinfer", description="OpenAI-compatible LLM serving on Ray")


def _error(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, headers=None
) -> JSONResponse:
    return JSONResponse(p.error_body(message, type_, param=param, code=status), status_code=status, headers=headers)


def _engine_error(exc: BaseException) -> JSONResponse:
    """The response for a request the engine did not take or could not finish."""
    if isinstance(exc, BackPressureError):
        return _error(503, "the server is at capacity: too many requests are queued; retry shortly",
                      type_="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, ValueError):  # the engine's own validation (Ray re-raises it as a ValueError subclass)
        return _error(400, str(getattr(exc, "cause", None) or exc))
    logger.error("engine call failed: %s", exc)
    return _error(500, f"the engine failed this request: {type(exc).__name__}", type_="internal_error")


def _cancel(streams: list) -> None:
    for stream in streams:
        try:
            stream.cancel()
        except Exception:  # cancel() re-raises why the call failed (refused, say): it is over either way
            pass


def _error_event(response: JSONResponse) -> str:
    """An error as a server-sent event: the stream's status line was already sent."""
    return f"data: {response.body.decode()}\n\n"


async def _all_or_none(coroutines: list) -> list:
    """Runs the coroutines concurrently; their results in order, or the first failure once the others are
    cancelled (as they are when the caller is), so a failed or abandoned beam search stops at once."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return [task.result() for task in tasks]


class _StepFailed(Exception):
    """An engine step of a beam search that ended in an error."""


@app.exception_handler(RayError)
async def _engine_call_failed(request: Request, exc: Exception) -> JSONResponse:
    """An engine call outside the generation path (its limits, say) that was refused or failed."""
    return _engine_error(exc)


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(p.validation_error_body(exc), status_code=400)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
@serve.ingress(app)
class Ingress:
    def __init__(self, engine: Any, served_model_name: str, tokenizer_path: str) -> None:
        from transformers import AutoTokenizer

        self.engine = engine
        self.model_name = served_model_name
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.max_model_len: int | None = None
        self.engine_info: dict[str, Any] | None = None
        self._limits_lock = asyncio.Lock()

    async def _limits(self) -> int:
        async with self._limits_lock:  # one engine call fetches them, however many requests arrive first
            if self.engine_info is None:
                self.engine_info = await self.engine.info.remote()
                self.max_model_len = self.engine_info["max_model_len"]
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

    @app.get("/metrics")
    async def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        from rayinfer.cluster.metrics_board import live_snapshots

        snapshots = live_snapshots(serve.get_replica_context().app_name)
        return Response(render_prometheus(snapshots, self.model_name), media_type=CONTENT_TYPE_LATEST)

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
        try:
            max_model_len = await self._limits()
        except (BackPressureError, RayError) as exc:
            return _engine_error(exc)
        for _, ids in prompts:
            if len(ids) >= max_model_len:
                field = "messages" if chat else "prompt"
                return _error(400, f"This model's maximum context length is {max_model_len} tokens, but the "
                                   f"prompt has {len(ids)} tokens (at least one must be left for the output)", param=field)
        if body.use_beam_search:
            return await self._serve_beam_search(body, prompts, chat, max_model_len)
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
        # The first delta decides the status: a refused, queued-out or failed request must not answer 200.
        try:
            firsts = await asyncio.gather(*(anext(stream) for stream in streams), return_exceptions=True)
        except asyncio.CancelledError:  # the client left while the prompts were being prefilled
            _cancel(streams)
            raise
        failure = next((first for first in firsts if isinstance(first, BaseException)), None)
        if failure is not None:
            _cancel(streams)
            if isinstance(failure, ValueError):  # refused at add time: name the request's own field
                refusal = body.engine_refusal(str(getattr(failure, "cause", None) or failure))
                return _error(400, str(refusal), param=refusal.param)
            return _engine_error(failure)
        if body.stream:
            return StreamingResponse(
                self._sse(body, request_ids[0], firsts, streams, params, prompts, chat),
                media_type="text/event-stream",
            )
        try:
            outputs = [[first] + [delta async for delta in stream] for first, stream in zip(firsts, streams)]
        except Exception as exc:
            _cancel(streams)
            return _engine_error(exc)
        return self._full_response(body, request_ids[0], outputs, params, chat, prompts)

    # ------------------------------------------------------------------ beam search
    async def _serve_beam_search(
        self, body: Any, prompts: list[tuple[str | None, list[int]]], chat: bool, max_model_len: int
    ) -> Any:
        """A `use_beam_search` request: each prompt's search runs here, every step an engine call per live beam."""
        try:
            params = [body.to_beam_search_params(max_model_len - len(ids)) for _, ids in prompts]
        except p.InvalidRequestError as exc:
            return _error(400, str(exc), param=exc.param)
        info = self.engine_info
        eos = info["eos_token_ids"]
        wanted = step_logprobs(params[0], eos, info["vocab_size"])
        cap = info["max_logprobs"]
        if cap != -1 and wanted > cap:
            field = body.beam_width_field
            return _error(400, f"{field}: a beam width of {params[0].beam_width} needs {wanted} candidate logprobs "
                               f"per beam and step, but this engine's max_logprobs is {cap}; lower {field}",
                          param=field)
        # As `LLM.beam_search` asks each step (temperature 0: the beam search of transformers).
        step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=wanted, ignore_eos=True)
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        call_ids = itertools.count()

        async def one(token_ids: list[int]) -> PositionLogprobs:
            stream = self.engine.options(stream=True).generate.remote(
                f"{response_id}-{next(call_ids)}", None, step_params, token_ids)
            entry = None
            try:
                async for delta in stream:
                    if delta.error:
                        raise _StepFailed(delta.error)
                    for c in delta.outputs:
                        if c.logprobs:
                            entry = c.logprobs[0]
            except BaseException:  # failed, or the client left: stop the call
                _cancel([stream])
                raise
            if entry is None:
                raise _StepFailed("the engine returned no logprobs")
            return entry

        async def step(inputs: list[list[int]]) -> list[PositionLogprobs]:
            return await _all_or_none([one(ids) for ids in inputs])

        try:
            results = await _all_or_none([
                beam_search_async(step, [ids], sp, eos, max_model_len) for (_, ids), sp in zip(prompts, params)
            ])
        except _StepFailed as exc:
            return _error(500, f"the engine failed this request: {exc}", type_="internal_error")
        except ValueError as exc:  # refused when added (Ray re-raises the engine's ValueError as a subclass)
            refusal = body.engine_refusal(str(getattr(exc, "cause", None) or exc))
            return _error(400, str(refusal), param=refusal.param)
        except Exception as exc:  # refused for capacity (503), or the engine failed (500)
            return _engine_error(exc)
        beams = [prompt_beams[: body.n] for (prompt_beams,) in results]
        return self._beam_response(body, response_id, prompts, beams, chat)

    def _beam_text(self, body: Any, prompt_ids: list[int], beam: Beam) -> str:
        """A beam's text, detokenized as the engine (and `LLM.beam_search`) does its outputs."""
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=body.skip_special_tokens)
        for token_id in beam.token_ids:
            detokenizer.append(token_id)
        return detokenizer.final_text()

    def _beam_response(
        self, body: Any, response_id: str, prompts: list[tuple[str | None, list[int]]], beams: list[list[Beam]],
        chat: bool,
    ) -> Any:
        """The n best beams of each prompt as choices (prompt i's beam j is choice i * n + j); `usage` counts each
        prompt once and the returned beams' tokens. Streamed: all choices in one chunk."""
        choices, stream_choices = [], []
        for prompt_index, ((_, ids), prompt_beams) in enumerate(zip(prompts, beams)):
            for rank, beam in enumerate(prompt_beams):
                index, text = prompt_index * body.n + rank, self._beam_text(body, ids, beam)
                if chat:
                    choices.append(p.ChatCompletionChoice(index=index, message=p.ChatResponseMessage(content=text),
                                                          finish_reason=beam.finish_reason))
                    stream_choices.append(p.ChatCompletionStreamChoice(
                        index=index, delta=p.DeltaMessage(role="assistant", content=text),
                        finish_reason=beam.finish_reason))
                else:
                    choices.append(p.CompletionChoice(index=index, text=text, finish_reason=beam.finish_reason))
        usage = p.UsageInfo.of(sum(len(ids) for _, ids in prompts),
                               sum(len(beam.token_ids) for prompt_beams in beams for beam in prompt_beams))
        model = self.model_name
        if not body.stream:
            if chat:
                return p.ChatCompletionResponse(id=response_id, model=model, choices=choices, usage=usage)
            return p.CompletionResponse(id=response_id, model=model, choices=choices, usage=usage)
        chunk_cls = p.ChatCompletionStreamResponse if chat else p.CompletionStreamResponse
        created = p._now()
        events = [p.sse_event(chunk_cls(id=response_id, created=created, model=model,
                                        choices=stream_choices if chat else choices))]
        if body.include_usage:
            events.append(p.sse_event(chunk_cls(id=response_id, created=created, model=model, choices=[], usage=usage)))
        events.append(p.SSE_DONE)

        async def send() -> AsyncIterator[str]:
            for event in events:
                yield event

        return StreamingResponse(send(), media_type="text/event-stream")

    # ------------------------------------------------------------------ response building
    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _completion_choice(
        self, body: p.CompletionRequest, index: int, text: str, token_ids: list[int], logprobs, finish_reason,
        echo: tuple[str | None, list[int], list | None] | None = None, text_offset: int = 0,
    ) -> tuple[p.CompletionChoice, int]:
        """A completions choice (or stream chunk choice) and where the next chunk's `text_offset` starts.

        `echo` is (prompt text or None for token ids, prompt ids, prompt logprobs): the prompt goes first, its
        first token's logprobs null as nothing predicts it.
        """
        if echo is not None:
            prompt_text, prompt_ids, prompt_logprobs = echo
            if prompt_text is None:
                prompt_text = self.tokenizer.decode(prompt_ids)
            prompt_logprobs = list(prompt_logprobs) if prompt_logprobs is not None else [None] * len(prompt_ids)
            text = prompt_text + text
            token_ids = [*prompt_ids, *token_ids]
            logprobs = prompt_logprobs + list(logprobs or [])
        data = None
        if body.logprobs is not None:
            data = p.completion_logprobs(token_ids, logprobs, body.logprobs, self._decode_token, text_offset)
            text_offset = p.next_text_offset(data, text_offset)
        return p.CompletionChoice(index=index, text=text, logprobs=data, finish_reason=finish_reason), text_offset

    def _chat_logprobs(self, body: p.ChatCompletionRequest, token_ids: list[int], logprobs):
        if not body.logprobs:
            return None
        return p.chat_logprobs(token_ids, logprobs, body.top_logprobs or 0, self._decode_token)

    def _full_response(
        self, body: Any, response_id: str, outputs: list[list[RequestOutput]], params, chat: bool, prompts
    ):
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for prompt_index, deltas in enumerate(outputs):
            n = params[prompt_index].n
            texts, finish = [""] * n, [None] * n
            token_ids: list[list[int]] = [[] for _ in range(n)]
            logprobs: list[list] = [[] for _ in range(n)]
            prompt_logprobs = None
            for delta in deltas:
                if delta.error:
                    return _error(500, f"the engine failed this request: {delta.error}", type_="internal_error")
                if delta.prompt_logprobs is not None:
                    prompt_logprobs = delta.prompt_logprobs
                for c in delta.outputs:
                    texts[c.index] += c.text
                    token_ids[c.index] += c.token_ids
                    logprobs[c.index] += c.logprobs or []
                    finish[c.index] = c.finish_reason or finish[c.index]
            prompt_tokens += len(deltas[0].prompt_token_ids) if deltas else 0
            completion_tokens += sum(len(ids) for ids in token_ids)
            for i in range(n):
                index = prompt_index * n + i
                if chat:
                    message = p.ChatResponseMessage(content=texts[i])
                    choices.append(p.ChatCompletionChoice(
                        index=index, message=message, logprobs=self._chat_logprobs(body, token_ids[i], logprobs[i]),
                        finish_reason=finish[i]))
                else:
                    echo = (*prompts[prompt_index], prompt_logprobs) if body.echo else None
                    choice, _ = self._completion_choice(
                        body, index, texts[i], token_ids[i], logprobs[i], finish[i], echo=echo)
                    choices.append(choice)
        usage = p.UsageInfo.of(prompt_tokens, completion_tokens)
        model = self.model_name
        if chat:
            return p.ChatCompletionResponse(id=response_id, model=model, choices=choices, usage=usage)
        return p.CompletionResponse(id=response_id, model=model, choices=choices, usage=usage)

    async def _sse(self, body, response_id, firsts, streams, params, prompts, chat: bool) -> AsyncIterator[str]:
        """Merges the prompts' delta streams into one event stream, each event sent the moment it exists."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(prompt_index: int, stream) -> None:
            try:
                await queue.put((prompt_index, firsts[prompt_index]))
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
        prompt_logprobs: dict[int, list] = {}  # by prompt: the engine sends them once, in its first delta
        text_offsets: dict[int, int] = {}  # by choice: where its next chunk's logprobs text_offset starts
        try:
            while open_streams:
                prompt_index, item = await queue.get()
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, Exception):
                    yield _error_event(_engine_error(item))
                    continue
                if item.prompt_logprobs is not None:
                    prompt_logprobs[prompt_index] = item.prompt_logprobs
                choices = []
                for c in item.outputs:
                    index = prompt_index * params[prompt_index].n + c.index
                    completion_tokens += len(c.token_ids)
                    first = index not in started
                    started.add(index)
                    if chat:
                        delta = p.DeltaMessage(role="assistant" if first else None, content=c.text)
                        choices.append(p.ChatCompletionStreamChoice(
                            index=index, delta=delta, logprobs=self._chat_logprobs(body, c.token_ids, c.logprobs),
                            finish_reason=c.finish_reason))
                    else:
                        echo = None
                        if body.echo and first:  # the prompt goes before the choice's first chunk
                            echo = (*prompts[prompt_index], prompt_logprobs.get(prompt_index))
                        choice, text_offsets[index] = self._completion_choice(
                            body, index, c.text, c.token_ids, c.logprobs, c.finish_reason, echo=echo,
                            text_offset=text_offsets.get(index, 0))
                        choices.append(choice)
                if choices:
                    yield p.sse_event(chunk_cls(id=response_id, created=created, model=model, choices=choices))
                if item.error:
                    yield _error_event(_error(500, f"the engine failed this request: {item.error}", "internal_error"))
            if body.include_usage:
                usage = p.UsageInfo.of(sum(len(ids) for _, ids in prompts), completion_tokens)
                yield p.sse_event(chunk_cls(id=response_id, created=created, model=model, choices=[], usage=usage))
            yield p.SSE_DONE
        finally:
            for task in tasks:
                task.cancel()
            _cancel(streams)  # a client that went away aborts its requests, which frees their blocks at once


def build_app(
    config: EngineConfig,
    served_model_name: str | None = None,
    deployment_options: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """The Serve application: one engine deployment whose replicas own their workers' placement group.

    `deployment_options` maps a deployment name (`EngineDeployment`, `Ingress`) to Serve options
    (`autoscaling_config`, `max_ongoing_requests`, ...), as the `deployments:` list of a Serve config file does.
    """
    from rayinfer.workers.ray_executor import worker_bundles

    options = deployment_options or {}
    if config.distributed_executor_backend is None:
        config = config.model_copy(update={"distributed_executor_backend": "ray"})
    engine_options = {
        "placement_group_bundles": worker_bundles(config),
        "placement_group_strategy": config.placement_strategy,
        **options.get("EngineDeployment", {}),
    }
    engine = EngineDeployment.options(**engine_options).bind(config)
    ingress = Ingress.options(**options["Ingress"]) if "Ingress" in options else Ingress
    return ingress.bind(engine, served_model_name or config.model, config.tokenizer_path)


def app_builder(args: dict[str, Any]) -> Any:
    """The `import_path` of Serve config files (`serve run configs/serve/tiny.yaml`); Serve applies the file's
    `deployments:` settings itself, and requires a builder to take exactly this one argument."""
    return build_app_from_args(args)


def build_app_from_args(args: dict[str, Any], deployment_options: dict[str, dict[str, Any]] | None = None) -> Any:
    """The application for a config file's `args`: engine arguments plus `served_model_name`; a missing or null
    `model` serves the built-in tiny checkpoint."""
    engine_args = dict(args)
    served_model_name = engine_args.pop("served_model_name", None)
    model = engine_args.pop("model", None)
    if model is None:
        from rayinfer.workers.tiny_checkpoint import default_tiny_model_dir

        model = str(default_tiny_model_dir())
    config = EngineConfig(model=model, **engine_args)
    return build_app(config, served_model_name=served_model_name, deployment_options=deployment_options)
