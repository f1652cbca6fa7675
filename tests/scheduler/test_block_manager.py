"""BlockManager: block accounting, table sizes, the admission watermark, freeing, and refusing to over-allocate."""

from __future__ import annotations

import random

import pytest

import hashlib
from array import array

from rayinfer.scheduler.block_manager import BlockManager, block_key, blocks_for
from rayinfer.scheduler.sampling_params import SamplingParams
from rayinfer.scheduler.sequence import Request, Sequence


def make_seq(seq_id: int, num_tokens: int) -> Sequence:
    prompt = [10 + (seq_id + i) % 100 for i in range(num_tokens)]
    request = Request(
        request_id=f"r{seq_id}",
        prompt=None,
        prompt_token_ids=prompt,
        params=SamplingParams(max_tokens=16),
        arrival=seq_id,
        max_tokens=16,
        stop_token_ids=frozenset(),
        eos_token_ids=frozenset(),
    )
    seq = Sequence(
        seq_id=seq_id, request=request, index=0, seed=0, token_ids=list(prompt), num_prompt_tokens=num_tokens
    )
    request.seqs.append(seq)
    return seq


def check_accounting(bm: BlockManager, seqs: list[Sequence]) -> None:
    """Every block is either free or in exactly one table, each table covers exactly its tokens, ids are in range."""
    held = [block for seq in seqs for block in seq.block_table]
    assert len(held) == len(set(held)), "a block id is in two block tables"
    assert all(0 <= block < bm.num_blocks for block in held)
    free = list(bm._free)
    assert len(free) == len(set(free)), "a block id is free twice"
    assert not set(free) & set(held), "a block is both free and held"
    assert len(held) + bm.num_free_blocks == bm.num_blocks
    assert bm.usage == pytest.approx(len(held) / bm.num_blocks)


@pytest.mark.parametrize(
    ("num_tokens", "block_size", "expected"),
    [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (16, 16, 1), (17, 16, 2), (7, 1, 7)],
)
def test_blocks_for_is_ceil(num_tokens: int, block_size: int, expected: int) -> None:
    assert blocks_for(num_tokens, block_size) == expected


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_allocate_covers_exactly_ceil_tokens_over_block_size(block_size: int) -> None:
    bm = BlockManager(num_blocks=64, block_size=block_size, watermark=0.0)
    for num_tokens in range(1, 3 * block_size + 2):
        seq = make_seq(0, num_tokens)
        assert bm.blocks_needed(seq, num_tokens) == blocks_for(num_tokens, block_size)
        bm.allocate(seq, num_tokens)
        assert len(seq.block_table) == blocks_for(num_tokens, block_size)
        assert bm.num_free_blocks == 64 - len(seq.block_table)
        assert bm.blocks_needed(seq, num_tokens) == 0  # already covered: nothing more to take
        bm.allocate(seq, num_tokens)  # and allocating again takes nothing
        assert len(seq.block_table) == blocks_for(num_tokens, block_size)
        bm.free(seq)
        assert seq.block_table == [] and bm.num_free_blocks == 64


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_append_one_token_at_a_time_takes_a_block_only_at_boundaries(block_size: int) -> None:
    bm = BlockManager(num_blocks=32, block_size=block_size, watermark=0.0)
    seq = make_seq(0, 1)
    for computed in range(min(32 * block_size, 200)):
        seq.num_computed_tokens = computed
        before = len(seq.block_table)
        expected_new = 1 if computed % block_size == 0 else 0
        assert bm.blocks_needed(seq, 1) == expected_new
        bm.allocate(seq, 1)
        assert len(seq.block_table) == before + expected_new
        assert len(seq.block_table) == blocks_for(computed + 1, block_size)
        assert len(seq.block_table) * block_size >= computed + 1
        check_accounting(bm, [seq])
    bm.free(seq)
    assert bm.num_free_blocks == 32


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_chunked_growth_of_many_sequences_keeps_tables_exact_and_disjoint(block_size: int) -> None:
    rng = random.Random(block_size)
    bm = BlockManager(num_blocks=200, block_size=block_size, watermark=0.0)
    seqs = [make_seq(i, 1) for i in range(8)]
    for _ in range(300):
        seq = rng.choice(seqs)
        chunk = rng.randint(1, 3 * block_size)
        if bm.can_allocate(seq, chunk):
            bm.allocate(seq, chunk)
            seq.num_computed_tokens += chunk
            assert len(seq.block_table) == blocks_for(seq.num_computed_tokens, block_size)
        elif rng.random() < 0.5:
            bm.free(seq)
            seq.num_computed_tokens = 0
        check_accounting(bm, seqs)
    for seq in seqs:
        bm.free(seq)
    check_accounting(bm, seqs)
    assert bm.num_free_blocks == bm.num_blocks
    assert sorted(bm._free) == list(range(bm.num_blocks))


def test_free_returns_every_block_and_is_idempotent() -> None:
    bm = BlockManager(num_blocks=10, block_size=4, watermark=0.0)
    a, b = make_seq(0, 9), make_seq(1, 12)
    bm.allocate(a, 9)
    bm.allocate(b, 12)
    assert (len(a.block_table), len(b.block_table), bm.num_free_blocks) == (3, 3, 4)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 7
    assert set(a_blocks) <= set(bm._free)
    bm.free(a)  # a second free of an empty table changes nothing
    assert bm.num_free_blocks == 7
    check_accounting(bm, [a, b])
    # Freed blocks are handed out again.
    c = make_seq(2, 28)
    bm.allocate(c, 28)
    assert len(c.block_table) == 7 and bm.num_free_blocks == 0
    check_accounting(bm, [a, b, c])
    bm.free(b)
    bm.free(c)
    assert bm.num_free_blocks == 10 and bm.usage == 0.0


def test_watermark_is_kept_on_admission_but_not_for_running_growth() -> None:
    bm = BlockManager(num_blocks=100, block_size=1, watermark=0.1)
    assert bm.watermark_blocks == 10
    fits, too_big = make_seq(0, 90), make_seq(1, 91)
    # Admission leaves the watermark free ...
    assert bm.can_allocate(fits, 90, admitting=True)
    assert not bm.can_allocate(too_big, 91, admitting=True)
    # ... while a running sequence may grow into it, down to the last block.
    assert bm.can_allocate(too_big, 91)
    bm.allocate(fits, 90)
    running = fits
    running.num_computed_tokens = 90
    newcomer = make_seq(2, 1)
    assert not bm.can_allocate(newcomer, 1, admitting=True)  # 10 free == watermark: no admission
    for _ in range(10):
        assert bm.can_allocate(running, 1)
        bm.allocate(running, 1)
        running.num_computed_tokens += 1
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(running, 1)
    bm.free(running)
    assert bm.num_free_blocks == 100


def test_watermark_is_a_whole_number_of_blocks() -> None:
    assert BlockManager(num_blocks=50, block_size=16).watermark_blocks == 0  # 1% of 50 rounds down
    assert BlockManager(num_blocks=1000, block_size=16).watermark_blocks == 10
    assert BlockManager(num_blocks=1000, block_size=16, watermark=0.0).watermark_blocks == 0


def test_over_allocation_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, watermark=0.0)
    a, b = make_seq(0, 12), make_seq(1, 8)
    bm.allocate(a, 12)
    assert not bm.can_allocate(b, 8)
    with pytest.raises(RuntimeError, match="2 KV blocks with 1 free"):
        bm.allocate(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1  # no partial allocation
    check_accounting(bm, [a, b])
    seq = make_seq(2, 100)
    with pytest.raises(RuntimeError):
        bm.allocate(seq, 100)
    bm.allocate(b, 4)  # what does fit still works
    assert bm.num_free_blocks == 0


@pytest.mark.parametrize("num_blocks", [0, -3])
def test_an_empty_pool_is_refused(num_blocks: int) -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(num_blocks=num_blocks, block_size=16)


# ---------------------------------------------------------------- sharing, copy on write, prefix cache


def computed(seq: Sequence, bm: BlockManager, num_tokens: int) -> None:
    """Allocates and marks `num_tokens` more of `seq` computed, as a scheduled step does."""
    bm.allocate(seq, num_tokens)
    bm.cache_full_blocks(seq, seq.num_computed_tokens + num_tokens)
    seq.num_computed_tokens += num_tokens


def test_shared_partial_block_is_copied_before_the_first_write() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    leader, sibling = make_seq(0, 7), make_seq(1, 7)
    computed(leader, bm, 6)  # blocks 0 (full) and 1 (2 of 4 slots)
    bm.share(leader, sibling)
    sibling.num_computed_tokens = 6
    assert [bm.ref_count(b) for b in leader.block_table] == [2, 2]
    assert bm.blocks_needed(leader, 1) == 1  # the copy
    computed(leader, bm, 1)
    (copy,) = bm.copies
    assert copy.seq is leader and copy.src == sibling.block_table[1] and copy.dst == leader.block_table[1]
    assert leader.block_table[0] == sibling.block_table[0] and bm.ref_count(leader.block_table[0]) == 2
    assert bm.ref_count(copy.src) == 1  # the sibling now owns the original alone, and writes it in place
    assert bm.blocks_needed(sibling, 1) == 0
    computed(sibling, bm, 1)
    assert len(bm.copies) == 1
    bm.free(leader)
    bm.free(sibling)
    assert bm.num_free_blocks == 8


def test_prefix_cache_reuses_full_blocks_and_leaves_the_last_token() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = make_seq(0, 10)
    computed(first, bm, 10)  # full blocks 0..1 cached; the third is partial
    again = make_seq(0, 10)  # the same text
    assert bm.take_cached_prefix(again) == 8
    assert again.block_table == first.block_table[:2] and bm.ref_count(first.block_table[0]) == 2
    exact = make_seq(0, 8)  # a text of exactly two blocks still computes its last token
    assert bm.take_cached_prefix(exact) == 4
    assert (bm.num_prefix_queries, bm.num_prefix_hits) == (18, 12)


def test_prefix_cache_compares_tokens_so_a_hash_collision_misses() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = make_seq(0, 9)
    computed(first, bm, 9)
    block = first.block_table[0]
    key, _ = bm._block_key[block]
    bm._block_key[block] = (key, (1, 2, 3, 4))  # as if other tokens had hashed to the same key
    assert bm.take_cached_prefix(make_seq(0, 9)) == 0


def test_block_keys_are_sha256_chained_over_the_whole_prefix() -> None:
    first = block_key(None, (1, 2, 3, 4))
    assert first == hashlib.sha256(array("q", [1, 2, 3, 4]).tobytes()).digest()
    assert block_key(first, (5, 6, 7, 8)) == hashlib.sha256(first + array("q", [5, 6, 7, 8]).tobytes()).digest()
    # The same block after another prefix is another key, and ids past 2**32 are not folded onto small ones.
    assert block_key(block_key(None, (9, 9, 9, 9)), (5, 6, 7, 8)) != block_key(first, (5, 6, 7, 8))
    assert block_key(None, (1 + (1 << 32), 2, 3, 4)) != first
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    seq = make_seq(0, 9)
    computed(seq, bm, 9)
    assert seq.block_hashes == [block_key(None, tuple(seq.token_ids[:4])),
                                block_key(seq.block_hashes[0], tuple(seq.token_ids[4:8]))]


def test_freed_cached_blocks_stay_cached_until_no_plain_block_is_left() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    old, new = make_seq(0, 5), make_seq(50, 5)
    computed(old, bm, 4)
    bm.free(old)
    computed(new, bm, 2)  # takes the plain free blocks first
    assert bm.num_free_blocks == 3
    bm.free(new)
    hit = make_seq(0, 5)
    assert bm.take_cached_prefix(hit) == 4  # still cached after being freed
    bm.free(hit)
    other = make_seq(90, 8)
    computed(other, bm, 8)  # needs all four: every cached block is evicted for it
    assert bm.take_cached_prefix(make_seq(0, 5)) == 0
    bm.free(other)
    assert bm.num_free_blocks == 4


def test_reset_forgets_the_cache_but_not_blocks_in_use() -> None:
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    kept, gone = make_seq(0, 5), make_seq(50, 5)
    computed(kept, bm, 4)
    computed(gone, bm, 4)
    bm.free(gone)
    bm.reset_prefix_cache()
    assert bm.num_free_blocks == 4 and not bm._evictable
    assert bm.take_cached_prefix(make_seq(50, 5)) == 0 and bm.take_cached_prefix(make_seq(0, 5)) == 0
    bm.free(kept)
    assert bm.num_free_blocks == 6
