"""The pool of KV blocks as the scheduler sees it: ids, reference counts, per-sequence block tables, and the
prefix cache.

Blocks are shared by reference count: the sequences of one request share their prompt's blocks, and with
prefix caching, requests share the full blocks of a common prefix. A shared block is never written: a sequence
about to write into a shared (partly filled) block gets a copy of it first (copy on write), and the copies to
make are handed to the workers with the step.

Prefix caching keys each full block by a SHA-256 chained over every token up to its end (`block_key`). A block whose last user
leaves stays in the cache on an LRU list and is only reused for other content when no plain free block is left.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from rayinfer.scheduler.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_key(parent: bytes | None, content: tuple[int, ...]) -> bytes:
    """The prefix-cache key of a full block: SHA-256 over its parent's key and its tokens. Python's `hash` of a
    tuple can be made to collide by a client who picks prompts, which would hand one request another's cached
    KV (vLLM moved to SHA-256 after such an advisory); a collision of SHA-256 is not within anyone's reach."""
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", content).tobytes())
    return digest.digest()


@dataclass(frozen=True)
class BlockCopy:
    """A block `seq` was about to write while others shared it: the workers copy `src` into `dst` first."""

    seq: Sequence
    src: int
    dst: int


class BlockManager:
    """Hands out fixed-size blocks; a sequence's block table covers every token whose K/V is (or is about to be) stored.

    `watermark_blocks` stay free when admitting new sequences, so a just-admitted prompt cannot take the
    blocks that running sequences need for their next tokens.
    """

    def __init__(
        self, num_blocks: int, block_size: int, watermark: float = 0.01, enable_prefix_caching: bool = False
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block (got {num_blocks})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        # Prefix cache: key -> block, and each cached block's key and tokens (the tokens are compared on a hit too).
        self._cached: dict[bytes, int] = {}
        self._block_key: dict[int, tuple[bytes, tuple[int, ...]]] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused blocks; oldest first
        self.copies: list[BlockCopy] = []  # copy-on-write copies the next step must make
        self.num_prefix_queries = 0  # prompt tokens looked up in the cache
        self.num_prefix_hits = 0  # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are reused when needed)."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = blocks_for(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table)) + self._needs_copy(seq)

    def _needs_copy(self, seq: Sequence) -> int:
        """1 if the next token lands in a block others share (a request's forked prompt tail)."""
        if seq.num_computed_tokens % self.block_size == 0 or not seq.block_table:
            return 0
        return int(self._ref_counts[seq.block_table[seq.num_computed_tokens // self.block_size]] > 1)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, admitting: bool = False) -> bool:
        reserve = self.watermark_blocks if admitting else 0
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks - reserve

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"asked for {needed} KV blocks with {self.num_free_blocks} free; check can_allocate first")
        if self._needs_copy(seq):
            index = seq.num_computed_tokens // self.block_size
            shared = seq.block_table[index]
            copy = self._take_block()
            self._ref_counts[shared] -= 1
            seq.block_table[index] = copy
            self.copies.append(BlockCopy(seq, shared, copy))
        total = blocks_for(seq.num_computed_tokens + num_new_tokens, self.block_size)
        while len(seq.block_table) < total:
            seq.block_table.append(self._take_block())

    def _take_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # the least recently used cached block gives up its content
            block, _ = self._evictable.popitem(last=False)
            self._uncache(block)
        self._ref_counts[block] = 1
        return block

    def share(self, source: Sequence, target: Sequence) -> None:
        """`target` (a sibling forked from `source`) starts out holding all of `source`'s blocks."""
        for block in source.block_table:
            self._ref_counts[block] += 1
        target.block_table = list(source.block_table)
        target.block_hashes = list(source.block_hashes)

    def free(self, seq: Sequence) -> None:
        # The tail goes back first, so a prefix's early blocks, which more prompts share, are evicted last.
        for block in reversed(seq.block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if block in self._block_key:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table.clear()
        seq.block_hashes.clear()

    # ---------------------------------------------------------------- prefix cache
    def take_cached_prefix(self, seq: Sequence, tokens_to_leave: int = 1) -> int:
        """Gives a sequence that holds no blocks the cached blocks of its text's longest cached prefix; returns
        the number of tokens they hold. `tokens_to_leave` (at least one: it yields the logits) stay uncached."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        tokens, size = seq.token_ids, self.block_size
        limit = max(0, len(tokens) - tokens_to_leave) // size
        self.num_prefix_queries += len(tokens)
        parent = None
        for index in range(limit):
            content = tuple(tokens[index * size : (index + 1) * size])
            key = block_key(parent, content)
            block = self._cached.get(key)
            if block is None or self._block_key[block] != (key, content):
                break
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(key)
            parent = key
        self.num_prefix_hits += len(seq.block_table) * size
        return len(seq.block_table) * size

    def cache_full_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Publishes the blocks of `seq` full of known tokens once its first `num_computed_tokens` are computed.

        The scheduler calls it as it schedules a step, so a sequence admitted later in the same step can already
        reuse them: each layer writes the whole step's K/V before any attention reads it."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        done = min(num_computed_tokens, len(seq.token_ids)) // size
        for index in range(len(seq.block_hashes), done):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            content = tuple(seq.token_ids[index * size : (index + 1) * size])
            key = block_key(parent, content)
            seq.block_hashes.append(key)
            block = seq.block_table[index]
            if key not in self._cached and block not in self._block_key:
                self._cached[key] = block
                self._block_key[block] = (key, content)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached block (the workers' pools were lost); blocks in use stay with their holders."""
        for block in list(self._block_key):
            self._uncache(block)
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._free.append(block)

    def _uncache(self, block: int) -> None:
        key, _ = self._block_key.pop(block)
        if self._cached.get(key) == block:
            del self._cached[key]
