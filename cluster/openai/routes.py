"""The `LLMServer` deployment: one engine replica that serves the OpenAI-compatible HTTP routes itself.

Serve's HTTP proxy hands each request to a replica; the replica checks its body, tokenizes it (applying the chat
template), resolves its sampling settings and adds one engine request per prompt to its own engine
(`EngineReplica`), then answers with the whole response or sends each output delta as a server-sent event the
moment the engine produces it (no batching interval). What the engine refuses comes back as a 400 naming the
client's field. The routes and the engine share a replica because each hop between Serve replicas costs a Ray
call per token: with a separate ingress deployment in front, the serving path added 5-8 ms to every token of
llama-56m on the 2-core machine (BENCHMARKS.md, serving path).
"""
# No `from __future__ import annotations` here: Serve pickles the decorated class by value, with only the globals
# its code names, so FastAPI could not resolve a body's type from its name; real annotations travel with it.
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import BackpressureConfig

from rayinfer.cluster.engine_replica import EngineReplica
from rayinfer.cluster.metrics import render_prometheus
from rayinfer.cluster.openai import api_key, body_checks, openapi_docs
from rayinfer.cluster.openai.beam_search import serve_beam_search
from rayinfer.cluster.openai.chat_template import render_chat
from rayinfer.cluster.openai.embeddings import serve_embeddings
from rayinfer.cluster.openai.engine_calls import cancel, first_deltas, merged, open_stream, whole_output
from rayinfer.cluster.openai.errors import (
    engine_ended,
    engine_failure,
    error_event,
    error_response,
    install_error_handlers,
    invalid_request,
)
from rayinfer.cluster.openai.rendering import SSE_DONE, PromptInput, Renderer
from rayinfer.cluster.openai.request_models import (
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    SamplingRequest,
    TokenizeRequest,
)
from rayinfer.cluster.openai.response_models import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    random_id,
)
from rayinfer.cluster.openai.sampling_fields import to_sampling_params
from rayinfer.cluster.openai.tool_calls import ToolCalling, check_tool_call_parser, tool_calling_for
from rayinfer.configs import EngineConfig
from rayinfer.scheduler.request_errors import InvalidRequestError

# Serve's default of 5 ongoing requests per replica would starve continuous batching; the queue in front of the
# replicas is bounded so that overload answers 503 (with Retry-After) instead of growing without limit.
MAX_ONGOING_REQUESTS = 256
MAX_QUEUED_REQUESTS = 1024
RETRY_AFTER_S = 1

# Serve pickles a deployment's class when it is decorated: the app, its handlers and every helper the class calls
# must exist by then (here, above it, or in modules it imports).
app = FastAPI(title="rayinfer", description="OpenAI-compatible LLM serving on Ray")
install_error_handlers(app)
app.add_middleware(body_checks.BodyChecks)
app.add_middleware(api_key.ApiKeyCheck)  # added last, so it runs first: no body is read for a wrong key
openapi_docs.install_openapi(app)


async def _sse(renderer: Renderer, firsts: list, streams: list) -> AsyncIterator[str]:
    """The prompts' delta streams as one event stream, each event sent the moment it exists; a failure after the
    status line went out is an error event, and the stream still ends with `[DONE]`."""
    async with contextlib.aclosing(merged(firsts, streams)) as deltas:  # closing it aborts what still runs
        async for prompt_index, delta in deltas:
            if isinstance(delta, Exception):
                yield error_event(engine_failure(delta, renderer.body))
                continue
            event = renderer.delta_event(prompt_index, delta)
            if event is not None:
                yield event
            if delta.error:
                yield error_event(engine_ended(delta.error))
    if renderer.body.include_usage:
        yield renderer.usage_event()
    yield SSE_DONE


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    max_queued_requests=MAX_QUEUED_REQUESTS,
    backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
)
@serve.ingress(app)
class LLMServer:
    """Serve adds and removes whole replicas, each with its engine and workers. `engine_factory` builds the engine
    from `config` (an `EngineReplica` unless a test stands one in)."""

    def __init__(self, config: EngineConfig, served_model_name: str, engine_factory: Any = None) -> None:
        from transformers import AutoTokenizer

        body_checks.configure(config.max_request_body_bytes, config.max_json_depth)
        api_key.configure(config.api_key.get_secret_value() if config.api_key else None)
        self.engine = (engine_factory or EngineReplica)(config)
        self.model_name = served_model_name
        self.max_prompts = config.max_prompts_per_request
        check_tool_call_parser(config.tool_call_parser)
        self.tool_call_parser = config.tool_call_parser  # reads the model's own calls for tool_choice "auto"
        from rayinfer.workers.model_source import tokenizer_dir

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(config)))  # the model may be a Hub id
        self._engine_info = self.engine.info()

    def check_health(self) -> None:
        self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def _unknown_model(self, model: Optional[str]) -> Optional[JSONResponse]:
        if model is not None and model != self.model_name:
            return error_response(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                                  type_="not_found_error", param="model")
        return None

    # ------------------------------------------------------------------ plain routes
    @app.get("/health", responses=openapi_docs.HEALTH)
    async def health(self) -> Any:
        """200 while the engine can serve; 503 (with the reason) while it is failed, replacing its workers, or
        stalled, so that a load balancer sends requests elsewhere."""
        problem = self.engine.health_problem()
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", responses=openapi_docs.METRICS)
    async def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        from rayinfer.cluster.metrics_board import live_snapshots

        snapshots = live_snapshots(serve.get_replica_context().app_name)
        return Response(render_prometheus(snapshots, self.model_name), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=openapi_docs.LISTING)
    async def models(self) -> dict:
        max_model_len = self._engine_info["max_model_len"]
        return ModelList(data=[ModelCard(id=self.model_name, root=self.model_name, max_model_len=max_model_len)]
                         ).model_dump()

    @app.post("/tokenize", responses=openapi_docs.body_route(TokenizeResponse))
    async def tokenize(self, body: TokenizeRequest) -> Any:
        if (missing := self._unknown_model(body.model)) is not None:
            return missing
        try:
            if body.prompt is not None:
                text = body.prompt
            else:
                text = self._chat_text(body.messages, body.add_generation_prompt, body.tools)
        except InvalidRequestError as exc:
            return invalid_request(exc)
        tokens = self.tokenizer.encode(text, add_special_tokens=body.use_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=self._engine_info["max_model_len"],
                                tokens=tokens, token_strs=strs)

    @app.post("/detokenize", responses=openapi_docs.body_route(DetokenizeResponse))
    async def detokenize(self, body: DetokenizeRequest) -> Any:
        if (missing := self._unknown_model(body.model)) is not None:
            return missing
        vocab = len(self.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            return error_response(400, f"tokens: ids must be in [0, {vocab}) for this tokenizer (got {bad[:5]})",
                                  param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    @app.post("/v1/embeddings", responses=openapi_docs.body_route(EmbeddingResponse))
    async def embeddings(self, body: EmbeddingRequest) -> Any:
        """Each input's final hidden state at its last token, L2-normalised (`openai/embeddings.py`)."""
        if (missing := self._unknown_model(body.model)) is not None:
            return missing
        return await serve_embeddings(self.engine, self.tokenizer, self._engine_info, body, self.model_name,
                                      self.max_prompts)

    # ------------------------------------------------------------------ generation
    @app.post("/v1/completions", responses=openapi_docs.generation(CompletionResponse))
    async def completions(self, body: CompletionRequest) -> Any:
        if (missing := self._unknown_model(body.model)) is not None:
            return missing
        prompts = body.prompts()
        if len(prompts) > self.max_prompts:
            return error_response(400, f"{len(prompts)} prompts in one request; this server's max_prompts_per_request "
                                       f"is {self.max_prompts}", param="prompt")
        return await self._serve(body, [self._encode(prompt) for prompt in prompts])

    @app.post("/v1/chat/completions", responses=openapi_docs.generation(ChatCompletionResponse))
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        if (missing := self._unknown_model(body.model)) is not None:
            return missing
        try:
            tool_calling = tool_calling_for(body, self.tool_call_parser)
            text = self._chat_text(body.messages, body.add_generation_prompt, body.tools)
        except InvalidRequestError as exc:
            return invalid_request(exc)
        return await self._serve(body, [(text, self.tokenizer.encode(text, add_special_tokens=False))], tool_calling)

    def _chat_text(
        self, messages: list[ChatMessage], add_generation_prompt: bool, tools: Optional[list[ChatTool]] = None
    ) -> str:
        """The conversation (and tools) through the model's chat template (`chat_template.render_chat`: names and
        tool calls reach it; one it refuses is an `InvalidRequestError`, the request's 400)."""
        return render_chat(self.tokenizer, messages, add_generation_prompt, tools)

    def _encode(self, prompt: str | list[int]) -> PromptInput:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    async def _serve(
        self, body: SamplingRequest, prompts: list[PromptInput], tool_calling: Optional[ToolCalling] = None
    ) -> Any:
        """One request's prompts through the engine; whether each fits the context is the engine's to say.
        `tool_calling` reads a chat request's outputs for tool calls."""
        info = self._engine_info
        prefix = "chatcmpl" if isinstance(body, ChatCompletionRequest) else "cmpl"
        request_ids = [random_id(prefix) for _ in prompts]
        renderer = Renderer(body, self.model_name, self.tokenizer, prompts, response_id=request_ids[0],
                            tool_calling=tool_calling)
        if body.use_beam_search:
            return await serve_beam_search(self.engine, info, renderer)
        try:
            params = [to_sampling_params(body, info["max_model_len"] - len(ids)) for _, ids in prompts]
        except InvalidRequestError as exc:
            return invalid_request(exc)
        streams = [
            open_stream(self.engine, rid, text, sp, ids) for rid, (text, ids), sp in zip(request_ids, prompts, params)
        ]
        try:
            firsts = await first_deltas(streams)
        except Exception as exc:
            return engine_failure(exc, body)
        if body.stream:
            return StreamingResponse(_sse(renderer, firsts, streams), media_type="text/event-stream")
        try:
            outputs = [await whole_output(first, stream) for first, stream in zip(firsts, streams)]
        except BaseException as exc:  # failed, or the client left (cancelled): abort what still runs
            cancel(streams)
            if not isinstance(exc, Exception):
                raise
            return engine_failure(exc, body)
        failed = next((output.error for output in outputs if output.error), None)
        if failed is not None:
            return engine_ended(failed)
        return renderer.full_response(outputs)
