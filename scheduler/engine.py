"""The engine loop: admit requests, schedule a step, run it on the executor, turn tokens into outputs."""
from __future__ import annotations

import itertools
import logging
import random
import uuid
from collections.abc import Callable
from typing import Any

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.block_manager import BlockManager, blocks_for
from rayinfer.scheduler.detokenizer import IncrementalDetokenizer
from rayinfer.workers.executor_interface import Executor, WorkerGroupFailure
from rayinfer.scheduler.output_processor import OutputProcessor
from rayinfer.scheduler.logprob_recorder import LogprobRecorder
from rayinfer.scheduler.outputs import CompletionOutput, RequestOutput
from rayinfer.scheduler.sampling_params import SamplingParams
from rayinfer.scheduler.scheduler import Scheduler, SchedulerLimits, SchedulerOutput
from rayinfer.scheduler.sequence import Request, Sequence
from rayinfer.workers.step_output import StepOutput
from rayinfer.workers.step_plan import NewSequence, SampleRequest, SequenceChunk, StepPlan

logger = logging.getLogger(__name__)

_SEED_MASK = (1 << 63) - 1


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
        from rayinfer.workers.model_config import check_tensor_parallel, load_model_spec

        self.config = config
        self.engine_id = engine_id or uuid.uuid4().hex[:8]  # names this engine's Ray actors and placement group
        self.model_spec = load_model_spec(config.model)
        check_tensor_parallel(self.model_spec, config.tensor_parallel_size)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path)
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
        eos = set(self.model_spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.requests: dict[str, Request] = {}
        # What the workers hold: block ids sent per live sequence, and sequences they may forget next step.
        self._sent_blocks: dict[int, int] = {}
        self._forget: list[int] = []
        self.num_aborted_requests = 0
        self._in_flight: tuple[SchedulerOutput, object] | None = None
        self._seed_rng = random.Random(config.seed)
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self.logprob_recorder = LogprobRecorder(self.tokenizer)

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Validates and queues a request; raises ValueError (naming the field and limit) if it can never run."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("prompt: give a string or prompt_token_ids")
            if not prompt:
                raise ValueError("prompt: must not be empty")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        self._validate_prompt(prompt_token_ids)
        self._validate_sampling(params)
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n: {params.n} sequences cannot run together with max_num_seqs={self.config.max_num_seqs}")
        if params.num_sequences > self.config.max_num_seqs:
            raise ValueError(
                f"best_of: {params.num_sequences} sequences cannot run together with "
                f"max_num_seqs={self.config.max_num_seqs}"
            )
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        self._validate_fits_pool(len(prompt_token_ids), max_tokens)
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        request = Request(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            arrival=next(self._arrivals),
            max_tokens=max_tokens,
            stop_token_ids=eos | frozenset(params.stop_token_ids),
            eos_token_ids=eos,
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

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt: must not be empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(token_ids)} tokens is too long; max_model_len is {self.max_model_len} "
                "and at least one token must be left for the output"
            )
        vocab = self.model_spec.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids: ids must be in [0, {vocab}) for this model (got {bad[:5]})")

    def _validate_sampling(self, params: SamplingParams) -> None:
        cap = self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            requested = getattr(params, name)
            if requested is not None and cap != -1 and requested > cap:
                raise ValueError(f"{name}: {requested} requested, but this engine's max_logprobs is {cap}")
        vocab = self.model_spec.vocab_size
        for name, token_ids in params.token_ids_to_check().items():
            bad = [t for t in token_ids if t >= vocab]
            if bad:
                raise ValueError(f"{name}: token ids must be in [0, {vocab}) for this model (got {bad[:5]})")

    def _validate_fits_pool(self, prompt_len: int, max_tokens: int) -> None:
        worst_case = min(prompt_len + max_tokens, self.max_model_len)
        needed = blocks_for(worst_case, self.config.block_size)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"max_tokens: the request may need {worst_case} tokens of KV cache (prompt {prompt_len} + "
                f"max_tokens {max_tokens}), but the whole pool holds {self.block_manager.num_blocks} blocks of "
                f"{self.config.block_size} tokens; lower max_tokens or give the cache more memory"
            )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.num_aborted_requests += 1
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self._release(seq)
        if self._in_flight is None and not self.scheduler.has_work() and self._forget:
            self._flush_forgotten()
        return self._request_output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._in_flight is not None

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    # ---------------------------------------------------------------- steps
    def step(self) -> list[RequestOutput]:
        """Completes one forward over everything scheduled; returns outputs of the requests that advanced.

        With an executor that takes several steps in flight, the next step is planned and sent before this
        one's tokens are awaited (a token still being drawn enters it as PENDING_TOKEN, which the workers fill
        in), so the engine's bookkeeping overlaps the workers' compute.
        """
        if self._in_flight is None:
            self._in_flight = self._launch()
            if self._in_flight is None:
                return []
        following = self._launch() if self.executor.pipelined else None
        plan, handle = self._in_flight
        try:
            result = self.executor.result(handle)
        except WorkerGroupFailure as exc:
            self._in_flight = None  # a step launched after a lost one is lost with it
            return self._recover(exc)
        self._in_flight = following
        outputs = self._process_tokens(plan, result)
        if following is not None and all(s.seq.is_finished for s in following[0].scheduled):
            self._discard_in_flight()  # everything it computes has ended: wait for it now, not next step
        if self._in_flight is None and not self.scheduler.has_work() and self._forget:
            self._flush_forgotten()
        return outputs

    def _discard_in_flight(self) -> None:
        _, handle = self._in_flight
        self._in_flight = None
        try:
            self.executor.result(handle)
        except WorkerGroupFailure as exc:  # nothing depended on it; the next step meets the failure again
            logger.warning("a discarded step failed: %s", exc)

    def _launch(self) -> tuple[SchedulerOutput, object] | None:
        """Schedules a step, sends it to the executor, and books its effects; None when nothing can run."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            if self.scheduler.has_work() and self._in_flight is None:
                raise RuntimeError("scheduler made no progress with requests pending; this is a bug")
            return None
        for seq in plan.preempted:
            if seq.seq_id in self._sent_blocks:
                self._sent_blocks[seq.seq_id] = 0  # its blocks are gone: the table starts over
        copies, self.block_manager.copies = self.block_manager.copies, []
        for copy in copies:
            if copy.seq.seq_id in self._sent_blocks:
                self._sent_blocks[copy.seq.seq_id] = 0  # a block mid-table changed: resend the table
        step_plan = self._step_plan(plan)
        self.logprob_recorder.ask_for_prompt_logprobs(plan, step_plan)
        step_plan.block_copies = [(copy.src, copy.dst) for copy in copies]
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
        if isinstance(result, StepOutput):
            tokens, sample_logprobs = result.token_ids, result.logprobs
            if result.prompt_logprobs:
                self.logprob_recorder.record_prompt(plan, result.prompt_logprobs)
        else:
            tokens, sample_logprobs = result, None
        touched: dict[str, Request] = {}
        sampled = (s.seq for s in plan.scheduled if s.samples)
        for seq, token_id in zip(sampled, tokens, strict=True):
            if seq.is_finished:
                continue  # ended (stopped, aborted or failed) after this step was launched
            request = seq.request
            touched[request.request_id] = request
            try:
                if sample_logprobs is not None and seq.seq_id in sample_logprobs:
                    self.logprob_recorder.record(seq, sample_logprobs[seq.seq_id])
                if self.output_processor.append(seq, token_id):
                    self._release(seq)
            except Exception as exc:  # one request's failure must not take the others down
                logger.exception("request %s failed while processing its output", request.request_id)
                self._fail_request(request, f"{type(exc).__name__}: {exc}")
        outputs = [self._request_output(r) for r in touched.values()]
        for out in outputs:
            if out.finished:
                del self.requests[out.request_id]
        return outputs

    def _flush_forgotten(self) -> None:
        """With nothing left to run, tells the workers now (not at the next step) to drop ended sequences."""
        try:
            self.executor.execute(StepPlan(chunks=[], finished_seq_ids=self._forget))
        except WorkerGroupFailure as exc:
            logger.warning("could not tell workers to drop ended sequences (%s); a restart clears them anyway", exc)
        self._forget = []

    def _step_plan(self, plan: SchedulerOutput) -> StepPlan:
        step = StepPlan(chunks=[], finished_seq_ids=self._forget)
        self._forget = []
        for scheduled in plan.scheduled:
            seq = scheduled.seq
            sent = self._sent_blocks.get(seq.seq_id)
            if sent is None:
                step.new_sequences.append(NewSequence(seq.seq_id, seq.num_prompt_tokens, self._sample_request(seq)))
                sent = 0
            start = seq.num_computed_tokens
            step.chunks.append(
                SequenceChunk(
                    seq_id=seq.seq_id,
                    token_ids=seq.input_tokens(start, scheduled.num_new_tokens),
                    start_position=start,
                    new_blocks=seq.block_table[sent:],
                    reset_blocks=sent == 0,
                    sample=scheduled.samples,
                )
            )
            self._sent_blocks[seq.seq_id] = len(seq.block_table)
        return step

    def _sample_request(self, seq: Sequence) -> SampleRequest:
        request = seq.request
        return SampleRequest(
            params=request.sampling_options,
            seed=seq.seed,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=list(seq.output_token_ids),  # the sampling worker extends its own copy
            stop_ids_for_min_tokens=sorted(request.stop_token_ids) if request.params.min_tokens else [],
        )

    def _release(self, seq: Sequence) -> None:
        """Frees a sequence that ended and tells the workers to drop it with the next step."""
        self.scheduler.finish(seq)
        if self._sent_blocks.pop(seq.seq_id, None) is not None:
            self._forget.append(seq.seq_id)

    def _recover(self, failure: Exception) -> list[RequestOutput]:
        """Brings up a fresh worker group and recomputes every live sequence from its text, or fails them all."""
        logger.error("worker group failed (%s); replacing it", failure)
        self._sent_blocks.clear()
        self._forget = []
        for request in self.requests.values():
            request.prompt_logprobs_asked = request.num_prompt_logprobs  # the lost steps' share is asked again
        self.scheduler.preempt_all()
        self.block_manager.reset_prefix_cache()  # the new workers' pools hold none of it
        try:
            self.executor.restart()
            self.failure = None
        except Exception as exc:
            message = f"the worker group failed ({failure}) and could not be replaced: {exc}"
            logger.error(message)
            self.failure = message
            outputs = []
            for request in list(self.requests.values()):
                self._fail_request(request, message)
                outputs.append(self._request_output(request))
                del self.requests[request.request_id]
            return outputs
        return []

    def _fail_request(self, request: Request, message: str) -> None:
        request.error = message
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "error"
                self._release(seq)

    def _request_output(self, request: Request) -> RequestOutput:
        """The request's outputs; a best_of request shows its n sequences of highest cumulative logprob (so far,
        until it finishes), best first and numbered 0..n-1, as vLLM does."""
        wants_logprobs = request.params.logprobs is not None
        seqs = request.seqs
        if len(seqs) > request.params.n:
            seqs = sorted(seqs, key=lambda seq: -seq.cumulative_logprob)[: request.params.n]  # stable: ties by index
        outputs = [
            CompletionOutput(
                index=index,
                text=seq.output_text,
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
                logprobs=list(seq.logprobs or ()) if wants_logprobs else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for index, seq in enumerate(seqs)
        ]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outputs,
            finished=request.is_finished,
            error=request.error,
            prompt_logprobs=self.logprob_recorder.prompt_output(request),
        )

    def shutdown(self) -> None:
        self.executor.shutdown()

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_free_blocks": self.block_manager.num_free_blocks,
            "num_blocks": self.block_manager.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_aborted_requests": self.num_aborted_requests,
            "prefix_cache_queries": self.block_manager.num_prefix_queries,
            "prefix_cache_hits": self.block_manager.num_prefix_hits,
        }
