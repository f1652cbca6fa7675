"""Runs one step on this worker: flatten the step's chunks into one varlen batch, forward, sample."""
from __future__ import annotations

import torch

from rayinfer.scheduler.step_plan import StepPlan
from rayinfer.workers.kv_pool import KVPool
from rayinfer.workers.layers.attention import AttentionMetadata, PagedAttention
from rayinfer.workers.sampler import Sampler, SamplingTensors


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_pool: KVPool, vocab_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.vocab_size = vocab_size
        self.device = device
        self.block_size = kv_pool.block_size
        self.sampler = Sampler()
        attention_layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        if len(attention_layers) != len(kv_pool.layers):
            raise RuntimeError(f"model has {len(attention_layers)} attention layers, pool has {len(kv_pool.layers)}")
        for layer, cache in zip(attention_layers, kv_pool.layers):
            layer.kv_cache = cache

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def prepare(self, plan: StepPlan, sequences: dict) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Builds (input ids, attention metadata, indices of the rows whose logits are needed)."""
        block_size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
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
        return self._tensor(input_ids), meta, self._tensor(sample_rows)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, sequences: dict) -> list[int]:
        """Forward over the step; logits for the chunks that sample; the tokens drawn for them."""
        input_ids, meta, sample_rows = self.prepare(plan, sequences)
        hidden = self.model(input_ids, meta)
        if sample_rows.numel() == 0:
            return []
        logits = self.model.compute_logits(hidden[sample_rows])  # a collective under tensor parallelism
        requests = [sequences[chunk.seq_id].sampling for chunk in plan.chunks if chunk.sample]
        sampling = SamplingTensors.build(requests, self.vocab_size, self.device)
        return self.sampler(logits, sampling).tolist()
