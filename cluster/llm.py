"""The offline front door: `LLM(model).generate(prompts, SamplingParams(...))`, shaped like vLLM's."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any, Union

from tqdm.auto import tqdm

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.engine import Engine
from rayinfer.scheduler.outputs import RequestOutput
from rayinfer.scheduler.sampling_params import SamplingParams

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
            from rayinfer.cluster.tiny_model import default_tiny_model_dir

            model = str(default_tiny_model_dir())
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

    def _add_all(self, prompts: list[PromptType], params_list: list[SamplingParams]) -> list[str]:
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
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while pending:
                for output in self.engine.step():
                    if output.finished and output.request_id in pending:
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
