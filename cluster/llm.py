"""The offline front door: `LLM(model).generate(prompts, SamplingParams(...))`, shaped like vLLM's."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any, Union

from tqdm.auto import tqdm

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.engine import Engine
from rayinfer.scheduler.detokenizer import IncrementalDetokenizer
from rayinfer.scheduler.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    OutputAssembler,
    PositionLogprobs,
    RequestOutput,
)
from rayinfer.scheduler.pooling_params import PoolingParams
from rayinfer.scheduler.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)

PromptType = Union[str, dict[str, Any]]
ChatMessages = list[dict[str, str]]


def _normalise_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"], None
    raise ValueError(f"prompts: each prompt is a string or a dict with 'prompt_token_ids' (got {type(prompt).__name__})")


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        if model is None:
            from rayinfer.workers.demo_model import DEMO_MODEL_NAME

            model = DEMO_MODEL_NAME
        self.engine = Engine(EngineConfig(model=model, **engine_args))
        self._request_ids = itertools.count()

    def shutdown(self) -> None:
        """Releases the engine's workers (and, under Ray, its actors and placement group)."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params: got {len(params_list)} for {len(prompts)} prompts; give one or one per prompt"
                )
        request_ids = self._add_all(prompts, params_list)
        return self._run(request_ids, use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """Each prompt's embedding, in input order: the final hidden state of its last token, L2-normalised (vLLM's
        default pooling for decoder models). The prompts run through the engine like any other (prefill only) and
        free their KV blocks as they finish."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = pooling_params or PoolingParams()
        outputs = self._run(self._add_all(prompts, [params] * len(prompts)), use_tqdm)
        failed = next((output for output in outputs if output.error), None)
        if failed is not None:
            raise RuntimeError(f"embedding request {failed.request_id} failed: {failed.error}")
        return [
            EmbeddingRequestOutput(output.request_id, output.prompt_token_ids, EmbeddingOutput(output.embedding))
            for output in outputs
        ]

    def chat(
        self,
        messages: ChatMessages | Sequence[ChatMessages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to one conversation or a list of them, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.engine.tokenizer
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
            )
            # The template already holds any BOS token, so it is not added a second time.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Beam search, as vLLM V1's `LLM.beam_search` runs it (see `rayinfer.cluster.beam_search`): one
        `RequestOutput` per prompt, in input order, whose `outputs` are the `beam_width` best beams, best first by
        `cumulative_logprob / generated_len ** length_penalty` (transformers' score), each with its text, token ids
        (an EOS that ended it included), cumulative logprob, per-token logprobs (the candidates of its step) and
        finish reason ("stop" at EOS, "length" at max_tokens).

        Each step runs every live beam for one token as a request of its own (`max_tokens=1`,
        `logprobs=2 * beam_width`; more with several EOS ids), so beam_width must leave that within the engine's
        `max_logprobs`. The beams share their prompt and common prefix through the prefix cache: if this LLM was
        made without `enable_prefix_caching`, it is switched on for the search and off (its cache emptied)
        after, so a step only recomputes what lies past each beam's last full KV block.
        """
        from rayinfer.cluster.beam_search import beam_search, num_candidates

        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        engine = self.engine
        tokenizer = engine.tokenizer
        normalised = [_normalise_prompt(prompt) for prompt in prompts]
        if any(ids is None and not text for text, ids in normalised):
            raise ValueError("prompt: must not be empty")
        token_lists = [ids if ids is not None else tokenizer.encode(text) for text, ids in normalised]
        eos = frozenset() if params.ignore_eos else engine.eos_token_ids
        wanted = min(num_candidates(params.beam_width, len(eos)), engine.model_spec.vocab_size)
        cap = engine.config.max_logprobs
        if cap != -1 and wanted > cap:
            raise ValueError(
                f"beam_width: {params.beam_width} needs {wanted} candidate logprobs per beam and step, but this "
                f"engine's max_logprobs is {cap}; lower beam_width or raise max_logprobs"
            )
        step_params = SamplingParams(temperature=params.temperature, max_tokens=1, logprobs=wanted, ignore_eos=True)

        def step(inputs: list[list[int]]) -> list[PositionLogprobs]:
            request_ids = self._add_all([{"prompt_token_ids": ids} for ids in inputs], [step_params] * len(inputs))
            outputs = self._run(request_ids, use_tqdm=False)
            for output in outputs:
                if output.error:
                    raise RuntimeError(f"beam search: an engine step failed: {output.error}")
            return [output.outputs[0].logprobs[0] for output in outputs]

        manager = engine.block_manager
        switched_on = not manager.enable_prefix_caching
        manager.enable_prefix_caching = True
        bar = tqdm(total=params.max_tokens, desc="Beam search steps", disable=not use_tqdm)
        try:
            results = beam_search(
                step, token_lists, params, engine.eos_token_ids, engine.max_model_len, on_step=lambda: bar.update(1)
            )
        finally:
            bar.close()
            if switched_on:
                manager.enable_prefix_caching = False
                manager.reset_prefix_cache()
        outputs = []
        for (text, _), prompt_ids, beams in zip(normalised, token_lists, results):
            completions = []
            for index, beam in enumerate(beams):
                detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
                for token_id in beam.token_ids:
                    detokenizer.append(token_id)
                completions.append(
                    CompletionOutput(
                        index=index,
                        text=detokenizer.final_text(),
                        token_ids=list(beam.token_ids),
                        cumulative_logprob=beam.cumulative_logprob,
                        logprobs=list(beam.logprobs),
                        finish_reason=beam.finish_reason,
                    )
                )
            outputs.append(
                RequestOutput(
                    request_id=str(next(self._request_ids)),
                    prompt=text,
                    prompt_token_ids=prompt_ids,
                    outputs=completions,
                    finished=True,
                )
            )
        return outputs

    def _add_all(self, prompts: list[PromptType], params_list: Sequence[SamplingParams | PoolingParams]) -> list[str]:
        request_ids: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list):
                text, token_ids = _normalise_prompt(prompt)
                request_id = str(next(self._request_ids))
                self.engine.add_request(request_id, text, params, prompt_token_ids=token_ids)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return request_ids

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        assembler = OutputAssembler()  # the engine emits deltas; whole outputs are assembled once, here
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while pending:
                for delta in self.engine.step():
                    output = assembler.add(delta)
                    if output is not None and output.request_id in pending:
                        pending.discard(output.request_id)
                        finished[output.request_id] = output
                        bar.update(1)
                        if output.error:
                            logger.error("request %s failed: %s", output.request_id, output.error)
        except BaseException:
            for request_id in pending:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in request_ids]
