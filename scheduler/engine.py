"""The engine loop: admit requests, schedule a step, run it on the executor, turn its tokens into output deltas.

`step()` returns, for each request that advanced, what the step added (see `output_deltas.py`): a front door
streams these as they are, or assembles whole outputs once (`outputs.OutputAssembler`).
"""
from __future__ import annotations

import itertools
import logging
import random
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.block_manager import BlockManager
from rayinfer.scheduler.detokenizer import IncrementalDetokenizer
from rayinfer.scheduler.failure_triage import FailureTriage
from rayinfer.scheduler.grammar_checks import GrammarChecks
from rayinfer.scheduler.logprob_recorder import LogprobRecorder
from rayinfer.scheduler.output_deltas import request_delta
from rayinfer.scheduler.output_processor import OutputProcessor
from rayinfer.scheduler.outputs import RequestOutput
from rayinfer.scheduler.plan_builder import PlanBuilder
from rayinfer.scheduler.pooling_params import PoolingParams
from rayinfer.scheduler.request_checks import RequestLimits
from rayinfer.scheduler.request_errors import InvalidRequestError
from rayinfer.scheduler.sampling_params import SamplingParams
from rayinfer.scheduler.scheduler import Scheduler, SchedulerLimits, SchedulerOutput
from rayinfer.scheduler.sequence import Request, Sequence
from rayinfer.workers.executor_interface import Executor, WorkerGroupFailure
from rayinfer.workers.step_output import StepOutput
from rayinfer.workers.step_plan import StepPlan

logger = logging.getLogger(__name__)

_SEED_MASK = (1 << 63) - 1
# What an embedding request's one sequence carries to the workers: it never draws, so any valid settings do.
_POOLING_SAMPLING = SamplingParams(max_tokens=1, temperature=0.0)


def _sequence_seed(request_seed: int, index: int) -> int:
    """Sequence 0 keeps the request's seed (so n=1 and the first of n agree); the others get distinct streams."""
    return request_seed if index == 0 else (request_seed * 0x9E3779B1 + index * 0x85EBCA77) & _SEED_MASK


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        executor_factory: Callable[..., Executor] | None = None,
        engine_id: str | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        from rayinfer.configs import resolved_limits
        from rayinfer.workers.model_config import (
            check_pipeline_parallel,
            check_tensor_parallel,
            load_model_spec,
            stop_token_ids,
        )
        from rayinfer.workers.model_source import checkpoint_dir, tokenizer_dir
        from rayinfer.workers.quantization.config import quant_scheme_for

        self.config = config
        self.engine_id = engine_id or uuid.uuid4().hex[:8]  # names this engine's Ray actors and placement group
        self.model_spec = load_model_spec(checkpoint_dir(config))  # config.model may be a Hub id: fetched here
        check_tensor_parallel(self.model_spec, config.tensor_parallel_size)
        check_pipeline_parallel(self.model_spec, config.pipeline_parallel_size, config.pipeline_layer_partition)
        quant_scheme_for(self.model_spec.raw, config.quantization)  # a format this engine cannot read fails here
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(config)))
        self.max_model_len, self.max_num_batched_tokens = resolved_limits(config, self.model_spec.max_model_len_limit)
        if executor_factory is None:
            from rayinfer.workers.executor import default_executor_factory

            executor_factory = default_executor_factory(config)
        self.executor = executor_factory(
            config, self.model_spec, self.max_model_len, self.max_num_batched_tokens, self.engine_id
        )
        self.block_manager = BlockManager(
            self.executor.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        pool_tokens = self.executor.num_blocks * config.block_size
        if pool_tokens < self.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, fewer than max_model_len (%d): longer requests will be refused",
                pool_tokens,
                self.max_model_len,
            )
        limits = SchedulerLimits(config.max_num_seqs, self.max_num_batched_tokens, config.enable_chunked_prefill)
        self.scheduler = Scheduler(limits, self.block_manager)
        self.output_processor = OutputProcessor(self.max_model_len)
        # Set when the worker group died and could not be replaced; a serving replica reports itself unhealthy.
        self.failure: str | None = None
        self.recovering = False  # while a lost worker group is being replaced
        self.triage = FailureTriage(config.max_worker_restarts_per_minute)
        self.eos_token_ids = stop_token_ids(self.model_spec, self.tokenizer)
        self.grammar_checks = GrammarChecks(self.executor)
        self.requests: dict[str, Request] = {}
        self.limits = RequestLimits(
            max_model_len=self.max_model_len,
            vocab_size=self.model_spec.vocab_size,
            max_logprobs=config.max_logprobs,
            max_num_seqs=config.max_num_seqs,
            num_blocks=self.block_manager.num_blocks,
            block_size=config.block_size,
            max_stop_strings=config.max_stop_strings,
            max_stop_string_length=config.max_stop_string_length,
        )
        self.plans = PlanBuilder()  # mirrors what the workers hold
        self.num_aborted_requests = 0
        # Steps sent and not yet answered, oldest first: at most `executor.max_steps_in_flight` of them.
        self._in_flight: deque[tuple[SchedulerOutput, object]] = deque()
        self._seed_rng = random.Random(config.seed)
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self.logprob_recorder = LogprobRecorder(self.tokenizer)

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams | PoolingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Checks and queues a request; raises InvalidRequestError (naming the field and limit) if it can never
        run. With `PoolingParams` it is an embedding request: its prompt runs once and it ends with the embedding."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        if prompt_token_ids is None:
            if prompt is None:
                raise InvalidRequestError.about("prompt", "give a string or prompt_token_ids")
            if not prompt:
                raise InvalidRequestError.about("prompt", "must not be empty")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        pooling = None
        if isinstance(params, PoolingParams):
            pooling, params = params, _POOLING_SAMPLING
            prompt_token_ids = pooling.truncate(prompt_token_ids)
            self.limits.check_pooling(prompt_token_ids)
        else:
            self.limits.check(prompt_token_ids, params)
            if params.structured_outputs is not None:
                self.grammar_checks.check(params.structured_outputs.spec())
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        # A grammar ends at EOS, so a structured output stops there even with ignore_eos.
        ignores_eos = params.ignore_eos and params.structured_outputs is None
        eos = frozenset() if ignores_eos else self.eos_token_ids
        request = Request(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            arrival=next(self._arrivals),
            max_tokens=max_tokens,
            stop_token_ids=eos | frozenset(params.stop_token_ids),
            eos_token_ids=eos,
            pooling=pooling,
        )
        request_seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        for index in range(params.num_sequences):
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request=request,
                index=index,
                seed=_sequence_seed(request_seed, index),
                token_ids=list(prompt_token_ids),
                num_prompt_tokens=len(prompt_token_ids),
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                ),
            )
            request.seqs.append(seq)
        # The siblings of a multi-sequence request fork from its first sequence once that has computed the
        # prompt (all but its last token), sharing its blocks; a one-token prompt has nothing to share.
        self.scheduler.add(request.seqs[0])
        for seq in request.seqs[1:]:
            if len(prompt_token_ids) > 1:
                request.forks_pending.append(seq)
            else:
                self.scheduler.add(seq)
        self.requests[request_id] = request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.num_aborted_requests += 1
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self._release(seq)
        if not self._in_flight and not self.scheduler.has_work() and self.plans.has_forgotten:
            self._flush_forgotten()
        return request_delta(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._in_flight)

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    # ---------------------------------------------------------------- steps
    def step(self) -> list[RequestOutput]:
        """Completes one forward over everything scheduled; returns outputs of the requests that advanced.

        With an executor that takes several steps in flight, the next steps are planned and sent before this
        one's tokens are awaited, so the engine's bookkeeping overlaps the workers' compute: for tensor-parallel
        GPU workers the next step carries a token still being drawn as PENDING_TOKEN, which the workers fill in;
        for pipeline stages each step in flight is a micro-batch of other sequences (`Scheduler.schedule`).
        """
        while len(self._in_flight) < self.executor.max_steps_in_flight:
            launched = self._launch()
            if launched is None:
                break
            self._in_flight.append(launched)
        if not self._in_flight:
            return []
        plan, handle = self._in_flight.popleft()
        try:
            result = self.executor.result(handle)
        except WorkerGroupFailure as exc:
            self._in_flight.clear()  # a step launched after a lost one is lost with it
            return self._recover(exc, plan)
        outputs = self._process_tokens(plan, result)
        while self._in_flight and all(s.seq.is_finished for s in self._in_flight[0][0].scheduled):
            self._discard_oldest()  # everything it computes has ended: wait for it now, not next step
        if not self._in_flight and not self.scheduler.has_work() and self.plans.has_forgotten:
            self._flush_forgotten()
        return outputs

    def _discard_oldest(self) -> None:
        _, handle = self._in_flight.popleft()
        try:
            self.executor.result(handle)
        except WorkerGroupFailure as exc:  # nothing depended on it; the next step meets the failure again
            logger.warning("a discarded step failed: %s", exc)

    def _launch(self) -> tuple[SchedulerOutput, object] | None:
        """Schedules a step, sends it to the executor, and books its effects; None when nothing can run."""
        plan = self.scheduler.schedule(self.executor.micro_batches)
        if plan.is_empty:
            if self.scheduler.has_work() and not self._in_flight:
                raise RuntimeError("scheduler made no progress with requests pending; this is a bug")
            return None
        copies, self.block_manager.copies = self.block_manager.copies, []
        step_plan = self.plans.build(plan, copies)
        self.logprob_recorder.ask_for_prompt_logprobs(plan, step_plan)
        for scheduled in plan.scheduled:
            scheduled.seq.num_computed_tokens += scheduled.num_new_tokens
            if scheduled.samples:
                scheduled.seq.num_pending_tokens += 1
        try:
            handle = self.executor.submit(step_plan)
        except WorkerGroupFailure as exc:
            handle = exc  # reported when the step's result is asked for
        return plan, handle

    def _process_tokens(self, plan: SchedulerOutput, result: StepOutput | list[int]) -> list[RequestOutput]:
        """Appends each drawn token (with its logprobs, when asked) to its sequence; a bare list is tokens only."""
        failed: dict[int, str] = {}
        if isinstance(result, StepOutput):
            tokens, sample_logprobs, failed = result.token_ids, result.logprobs, result.failed or {}
            if result.prompt_logprobs:
                self.logprob_recorder.record_prompt(plan, result.prompt_logprobs)
        else:
            tokens, sample_logprobs = result, None
        touched: dict[str, Request] = {}
        if any(s.pools for s in plan.scheduled):
            embeddings = result.embeddings if isinstance(result, StepOutput) else None
            self._finish_pooled(plan, embeddings or {}, touched)
        sampled = (s.seq for s in plan.scheduled if s.samples)
        for seq, token_id in zip(sampled, tokens, strict=True):
            if seq.is_finished:
                continue  # ended (stopped, aborted or failed) after this step was launched
            request = seq.request
            touched[request.request_id] = request
            if seq.seq_id in failed:  # its draw raised in the worker, which drew the other rows without it
                logger.error("request %s failed: %s", request.request_id, failed[seq.seq_id])
                self._fail_request(request, failed[seq.seq_id])
                continue
            try:
                if sample_logprobs is not None and seq.seq_id in sample_logprobs:
                    self.logprob_recorder.record(seq, sample_logprobs[seq.seq_id])
                if self.output_processor.append(seq, token_id):
                    self._release(seq)
                FailureTriage.note_progress(request)
            except Exception as exc:  # one request's failure must not take the others down
                logger.exception("request %s failed while processing its output", request.request_id)
                self._fail_request(request, f"{type(exc).__name__}: {exc}")
        outputs = []
        for request in touched.values():
            delta = request_delta(request)
            if delta is not None:
                outputs.append(delta)
            if request.is_finished:
                del self.requests[request.request_id]
        return outputs

    def _finish_pooled(self, plan: SchedulerOutput, embeddings: dict[int, list[float]],
                       touched: dict[str, Request]) -> None:
        """Ends the embedding requests whose prompt's last chunk ran in this step, freeing their blocks."""
        for scheduled in plan.scheduled:
            seq = scheduled.seq
            if not scheduled.pools or seq.is_finished:
                continue
            touched[seq.request.request_id] = seq.request
            embedding = embeddings.get(seq.seq_id)
            if embedding is None:
                self._fail_request(seq.request, "the workers returned no embedding for this request")
                continue
            seq.request.embedding = embedding
            seq.finish_reason = "stop"
            self._release(seq)

    def _flush_forgotten(self) -> None:
        """With nothing left to run, tells the workers now (not at the next step) to drop ended sequences."""
        try:
            self.executor.execute(StepPlan(chunks=[], finished_seq_ids=self.plans.take_forgotten()))
        except WorkerGroupFailure as exc:
            logger.warning("could not tell workers to drop ended sequences (%s); a restart clears them anyway", exc)

    def _release(self, seq: Sequence) -> None:
        """Frees a sequence that ended and tells the workers to drop it with the next step."""
        self.scheduler.finish(seq)
        self.plans.release(seq)

    def _recover(self, failure: Exception, plan: SchedulerOutput) -> list[RequestOutput]:
        """Fails the request to blame for a lost step, if one can be told (`failure_triage.py`), then brings up a
        fresh worker group and recomputes every other live sequence from its text, or fails them all."""
        logger.error("worker group failed (%s); replacing it", failure)
        blamed = self.triage.blame(s.seq.request for s in plan.scheduled)
        outputs = self._fail_all(blamed, f"a step with this request failed the worker group twice: {failure}")
        self.plans.workers_lost()
        for request in self.requests.values():
            request.prompt_logprobs_asked = request.num_prompt_logprobs  # the lost steps' share is asked again
        self.scheduler.preempt_all()
        self.block_manager.reset_prefix_cache()  # the new workers' pools hold none of it
        if not self.triage.may_restart():
            self.failure = (f"the worker group failed more than {self.triage.max_restarts_per_minute} times in a "
                            f"minute (max_worker_restarts_per_minute; last: {failure})")
        else:
            self.recovering = True
            try:
                self.executor.restart()
                self.failure = None
                return outputs
            except Exception as exc:
                self.failure = f"the worker group failed ({failure}) and could not be replaced: {exc}"
            finally:
                self.recovering = False
        logger.error(self.failure)
        return outputs + self._fail_all(list(self.requests.values()), self.failure)

    def _fail_all(self, requests: list[Request], message: str) -> list[RequestOutput]:
        outputs = []
        for request in requests:
            self._fail_request(request, message)
            outputs.append(request_delta(request))
            del self.requests[request.request_id]
        return outputs

    def _fail_request(self, request: Request, message: str) -> None:
        request.error = message
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "error"
                self._release(seq)

    def shutdown(self) -> None:
        self.executor.shutdown()

    def stats(self) -> dict[str, Any]:
        return {
            # Requests (an n=4 request is one): running once any of its sequences is; the rest of the live ones wait.
            "num_running": (running := len({id(seq.request) for seq in self.scheduler.running})),
            "num_waiting": len(self.requests) - running,
            "num_running_sequences": len(self.scheduler.running),
            "num_waiting_sequences": len(self.scheduler.waiting),
            "num_free_blocks": self.block_manager.num_free_blocks,
            "num_blocks": self.block_manager.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_aborted_requests": self.num_aborted_requests,
            "prefix_cache_queries": self.block_manager.num_prefix_queries,
            "prefix_cache_hits": self.block_manager.num_prefix_hits,
        }
