"""The pool of KV blocks as the scheduler sees it: ids, reference counts and per-sequence block tables."""
from __future__ import annotations

from collections import deque

from rayinfer.scheduler.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Hands out fixed-size blocks; a sequence's block table covers every token whose K/V is (or is about to be) stored.

    `watermark_blocks` stay free when admitting new sequences, so a just-admitted prompt cannot take the
    blocks that running sequences need for their next tokens.
    """

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block (got {num_blocks})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = blocks_for(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, admitting: bool = False) -> bool:
        reserve = self.watermark_blocks if admitting else 0
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free) - reserve

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"asked for {needed} KV blocks with {len(self._free)} free; check can_allocate first")
        for _ in range(needed):
            block = self._free.popleft()
            self._ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)
        seq.block_table.clear()
