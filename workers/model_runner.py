"""Runs one step on this worker: flatten the step's chunks into one varlen batch, forward, sample."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from rayinfer.workers.step_output import StepOutput, TopLogprobs
from rayinfer.workers.step_plan import StepPlan
from rayinfer.workers.cuda_graphs import DecodeGraphs
from rayinfer.workers.grammar import GrammarCompiler
from rayinfer.workers.grammar_matchers import GrammarMatchers
from rayinfer.workers.kv_pool import KVPool
from rayinfer.workers.layers.attention import AttentionMetadata, PagedAttention
from rayinfer.workers.logprobs import top_logprobs
from rayinfer.workers.models.pipeline import IntermediateState
from rayinfer.workers.sampler import Sampler, SamplingTensors, row_of
from rayinfer.workers.sampling_batch import SamplingBatch

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, kv_pool: KVPool, vocab_size: int, device: torch.device, max_num_seqs: int,
        grammar_compiler: Callable[[], GrammarCompiler] | None = None,
    ) -> None:
        """`grammar_compiler` gives the worker's compiler, for sequences with structured outputs."""
        self.model = model
        self.kv_pool = kv_pool
        self.vocab_size = vocab_size
        self.device = device
        self.block_size = kv_pool.block_size
        self.sampler = Sampler()
        # Each live sequence's sampling settings, on the device; the worker feeds it each plan's new and finished
        # sequences, and the runner each step's drawn ids.
        self.sampling_batch = SamplingBatch(vocab_size, device, capacity=max_num_seqs)
        self.grammars = GrammarMatchers(grammar_compiler or _no_grammars, vocab_size, device)
        attention_layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        if len(attention_layers) != len(kv_pool.layers):
            raise RuntimeError(f"model has {len(attention_layers)} attention layers, pool has {len(kv_pool.layers)}")
        for i, (layer, cache) in enumerate(zip(attention_layers, kv_pool.layers)):
            layer.kv_cache = cache
            layer.kv_scales = kv_pool.scales[i] if kv_pool.scales is not None else None
        self.graphs: DecodeGraphs | None = None  # set by the worker once captured (CUDA, single GPU)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def prepare(
        self, plan: StepPlan, sequences: dict
    ) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor, list[int]]:
        """Builds (input ids, attention metadata, indices of the rows whose logits are needed, indices of the rows
        whose hidden state is a pooling chunk's embedding)."""
        block_size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        pool_rows: list[int] = []
        rope_lengths: list[int] = []
        dynamic_rope = getattr(self.model, "uses_dynamic_rope", False)
        tables: list[list[int]] = []
        for chunk in plan.chunks:
            state = sequences[chunk.seq_id]
            begin = chunk.start_position
            end = begin + len(chunk.token_ids)
            table = state.block_table
            tables.append(table)
            input_ids.extend(chunk.token_ids)
            span = range(begin, end)
            positions.extend(span)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
            if dynamic_rope:
                rope_lengths.extend(max(state.num_prompt_tokens, p + 1) for p in span)
            starts.append(starts[-1] + len(chunk.token_ids))
            seq_lens.append(end)
            if chunk.sample:
                sample_rows.append(starts[-1] - 1)
            elif chunk.pool:
                pool_rows.append(starts[-1] - 1)
        width = max(len(table) for table in tables)
        tables = [table + [0] * (width - len(table)) for table in tables]
        meta = AttentionMetadata(
            positions=self._tensor(positions),
            slot_mapping=self._tensor(slots),
            query_start_loc=self._tensor(starts),
            seq_lens=self._tensor(seq_lens),
            block_tables=self._tensor(tables),
            max_query_len=max(len(chunk.token_ids) for chunk in plan.chunks),
            max_seq_len=max(seq_lens),
            rope_lengths=self._tensor(rope_lengths) if dynamic_rope else None,
        )
        return self._tensor(input_ids), meta, self._tensor(sample_rows), pool_rows

    def prompt_logprob_rows(
        self, plan: StepPlan, sequences: dict
    ) -> tuple[list[int], list[int], list[tuple[int, int, int, int]]]:
        """Rows of the flat batch whose logits score a prompt token, for the chunks marked `prompt_logprobs`.

        Row of position p scores prompt token p + 1. Returns (rows, scored token ids, per marked chunk
        (seq_id, first scored position, number of rows, k)).
        """
        rows: list[int] = []
        scored: list[int] = []
        spans: list[tuple[int, int, int, int]] = []
        offset = 0
        for chunk in plan.chunks:
            if chunk.prompt_logprobs:
                state = sequences[chunk.seq_id]
                begin = chunk.start_position
                end = min(begin + len(chunk.token_ids), state.num_prompt_tokens - 1)
                if end > begin:
                    rows.extend(range(offset, offset + end - begin))
                    scored.extend(state.sampling.prompt_token_ids[begin + 1 : end + 1])
                    spans.append((chunk.seq_id, begin + 1, end - begin, state.sampling.params.prompt_logprobs))
            offset += len(chunk.token_ids)
        return rows, scored, spans

    @torch.inference_mode()
    def execute(
        self, plan: StepPlan, sequences: dict, with_logprobs: bool = True, intermediate: IntermediateState | None = None
    ) -> StepOutput | IntermediateState:
        """Forward over the step; logits for the chunks that sample (and for prompt rows whose logprobs were
        asked); the tokens drawn, with logprobs when `with_logprobs` (the rank that reports them).

        Under pipeline parallelism a stage after the first takes the previous stage's `intermediate`, and a stage
        before the last returns its own `IntermediateState` for the next (it draws nothing)."""
        input_ids, meta, sample_rows, pool_rows = self.prepare(plan, sequences)
        graphs = self.graphs
        if graphs is not None and meta.max_query_len == 1 and input_ids.shape[0] <= graphs.max_batch:
            hidden = graphs.run(input_ids, meta)
        elif intermediate is None:
            hidden = self.model(input_ids, meta)
        else:
            hidden = self.model(input_ids, meta, intermediate)
        if isinstance(hidden, IntermediateState):
            return hidden
        prompt_rows: list[int] = []
        prompt_scored: list[int] = []
        spans: list[tuple[int, int, int, int]] = []
        if any(chunk.prompt_logprobs for chunk in plan.chunks):
            prompt_rows, prompt_scored, spans = self.prompt_logprob_rows(plan, sequences)
        embeddings = self._embeddings(plan, hidden, pool_rows) if with_logprobs and pool_rows else None
        if sample_rows.numel() == 0 and not prompt_rows:
            return StepOutput([], embeddings=embeddings)
        rows = torch.cat([sample_rows, self._tensor(prompt_rows)]) if prompt_rows else sample_rows
        logits = self.model.compute_logits(hidden[rows])  # a collective under tensor parallelism
        num_samples = sample_rows.numel()
        sample_logits = logits[:num_samples]
        sampling_seq_ids = [chunk.seq_id for chunk in plan.chunks if chunk.sample]
        out = StepOutput([], embeddings=embeddings)
        if sampling_seq_ids:
            step_rows = self.sampling_batch.step_rows(sampling_seq_ids)
            tensors = self.sampling_batch.tensors(step_rows)
            grammar = self.grammars.step_mask(sampling_seq_ids)
            if grammar is not None:
                tensors.grammar_bitmask, tensors.grammar_may_empty = grammar.bitmask, grammar.may_empty
            token_ids, out.failed = self._sample(sample_logits, tensors, sampling_seq_ids)
            self.sampling_batch.record(step_rows, token_ids)
            if with_logprobs:
                requests = [sequences[seq_id].sampling for seq_id in sampling_seq_ids]
                out.logprobs = self._sample_logprobs(sampling_seq_ids, requests, sample_logits, token_ids)
            out.token_ids = token_ids.tolist()
            if len(self.grammars):
                refused = self.grammars.accept(sampling_seq_ids, out.token_ids)
                if refused:
                    out.failed = {**(out.failed or {}), **refused}
        if with_logprobs and prompt_rows:
            entries = top_logprobs(
                logits[num_samples:], self._tensor(prompt_scored), [k for _, _, n, k in spans for _ in range(n)]
            )
            out.prompt_logprobs = {}
            start = 0
            for seq_id, first_position, n, _ in spans:
                out.prompt_logprobs[seq_id] = (first_position, entries[start : start + n])
                start += n
        return out

    @staticmethod
    def _embeddings(plan: StepPlan, hidden: torch.Tensor, rows: list[int]) -> dict[int, list[float]]:
        """Each pooling chunk's last row of the final hidden state (after the final norm, as transformers'
        `last_hidden_state`), L2-normalised in float32: vLLM's default pooling for decoder models."""
        seq_ids = [chunk.seq_id for chunk in plan.chunks if chunk.pool]
        pooled = torch.nn.functional.normalize(hidden[rows].float(), p=2.0, dim=-1).cpu()
        return dict(zip(seq_ids, pooled.tolist()))

    def _sample(self, logits: torch.Tensor, tensors: SamplingTensors, seq_ids: list[int]
                ) -> tuple[torch.Tensor, dict[int, str] | None]:
        """The batch's draws. Should the batched sampler raise, each row is drawn alone, so that one request's
        bad settings fail that request (its seq_id -> the error, token 0 in its place) and not the whole step."""
        try:
            return self.sampler(logits, tensors), None
        except Exception:  # noqa: BLE001 - whatever it was, the per-row retry below names the rows it comes from
            logger.exception("batched sampling failed; drawing row by row")
        token_ids, failed = torch.zeros(len(seq_ids), dtype=torch.int64, device=logits.device), {}
        for row, seq_id in enumerate(seq_ids):
            try:
                token_ids[row] = self.sampler(logits[row : row + 1], row_of(tensors, row))[0]
            except Exception as exc:  # noqa: BLE001 - reported to the engine, which fails this request alone
                failed[seq_id] = f"sampling failed: {type(exc).__name__}: {exc}"
        return token_ids, failed or None

    def _sample_logprobs(
        self, seq_ids: list[int], requests: list, logits: torch.Tensor, token_ids: torch.Tensor
    ) -> dict[int, TopLogprobs] | None:
        """Logprobs of the drawn tokens, for the sampling rows whose params ask for them; None if none does."""
        asking = [i for i, request in enumerate(requests) if request.params.logprobs is not None]
        if not asking:
            return None
        index = self._tensor(asking)
        entries = top_logprobs(logits[index], token_ids[index], [requests[i].params.logprobs for i in asking])
        return {seq_ids[i]: entry for i, entry in zip(asking, entries)}


def _no_grammars() -> GrammarCompiler:
    raise RuntimeError("this model runner was given no grammar compiler, so it cannot run structured outputs")
