"""CUDA graphs of the model's forward for decode-only steps.

A decode step launches ~10 kernels per layer; measured on an H200 with a Llama-3-8B shape, launching them from
Python took 23 ms of a 32 ms step at batch 1, so the GPU mostly waited. A graph replays the whole forward in one
launch. Graphs are captured once per batch size in CAPTURE_SIZES (up to max_num_seqs), over static input buffers:
a step of b sequences is padded to the next captured size. Padding rows are one-token sequences that write no K/V
(slot -1) and attend to one key of block 0; their outputs are never read.

Only the forward is captured: logits (for the rows that sample) and sampling stay eager, since their shapes vary.
The attention kernel's launch shape may not depend on the step, so each graph is captured for the longest context
the engine allows (the kernel skips the key ranges a shorter sequence does not have).

The pool is bound to the attention layers before capture and never reallocated, so the graphs read it in place:
for an fp8 / int8 pool that includes its scale pools (`PagedAttention.kv_scales`, written by the captured write_kv)
and any static `k_scale` / `v_scale`, which must therefore be set before capture, as the weight loader does.
"""
from __future__ import annotations

import logging

import torch

from rayinfer.workers.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """CAPTURE_SIZES below max_num_seqs, then max_num_seqs itself (larger decode batches run eagerly)."""
    if max_num_seqs >= CAPTURE_SIZES[-1]:
        return list(CAPTURE_SIZES)
    return [s for s in CAPTURE_SIZES if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    def __init__(
        self, model: torch.nn.Module, max_num_seqs: int, max_blocks_per_seq: int, max_model_len: int, device: torch.device
    ) -> None:
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        largest = self.sizes[-1]
        index = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(largest, **index)
        self.positions = torch.zeros(largest, **index)
        self.slot_mapping = torch.full((largest,), -1, **index)
        self.query_start_loc = torch.arange(largest + 1, **index)
        self.seq_lens = torch.ones(largest, **index)
        self.block_tables = torch.zeros(largest, max_blocks_per_seq, **index)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every size, largest first, into one shared memory pool."""
        pool = None
        for size in reversed(self.sizes):
            graph, hidden, pool = self._capture_one(size, pool)
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def _capture_one(self, size: int, pool: object) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, object]:
        meta = self._meta(size)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles kernels and sets up cuBLAS for this shape outside the capture
            for _ in range(2):
                self.model(self.input_ids[:size], meta)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden = self.model(self.input_ids[:size], meta)
        return graph, hidden, graph.pool()

    def padded_size(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The forward of a decode-only step of `batch` one-token sequences, by graph replay: [batch, hidden]."""
        batch = input_ids.shape[0]
        size = self.padded_size(batch)
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(meta.positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.seq_lens[:batch].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        self.block_tables[:batch, :width].copy_(meta.block_tables)
        if size > batch:  # rows a previous, larger step filled: back to harmless padding
            self.slot_mapping[batch:size].fill_(-1)
            self.seq_lens[batch:size].fill_(1)
            self.block_tables[batch:size].zero_()
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:batch]
