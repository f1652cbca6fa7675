"""Filtered sampling as one Triton launch, one program per row, with no sort and no host sync: the same tokens as
`sampling_reference.sample_filtered_reference`, whose full-vocabulary sort is the slow part on a GPU. The notes
above `_sample_filtered_kernel` say how the filters are found by search instead, and where results can differ.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rayinfer.kernels.counter_rng_triton import row_key, token_uniforms
from rayinfer.kernels.triton_compat import HAS_TRITON, tl, triton

libdevice = None
if HAS_TRITON:
    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover - older Triton layouts
        try:
            from triton.language.extra.cuda import libdevice
        except ImportError:
            libdevice = None


@triton.jit
def _log(x, PRECISE: tl.constexpr):
    """Natural log; on GPUs libdevice's logf, the function torch's CUDA log runs, so the bits agree."""
    if PRECISE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _scaled(row_ptr, idx, vocab, temperature):
    """A tile of logits / temperature in float32 (IEEE division, as torch's), -inf past the vocabulary."""
    valid = idx < vocab
    x = tl.load(row_ptr + idx, mask=valid, other=float("-inf")).to(tl.float32)
    return tl.math.div_rn(x, temperature), valid


@triton.jit
def _order_key(z):
    """int32 keys whose integer order is the float order of z (-0.0 and +0.0 share a key, as they compare equal)."""
    bits = tl.where(z == 0.0, 0, z.to(tl.int32, bitcast=True))
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _from_order_key(key):
    """The float32 whose order key is `key` (the mapping is its own inverse on the bits)."""
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _pivots(lo, hi, NUM_PIVOTS: tl.constexpr):
    """NUM_PIVOTS non-decreasing int32 keys spread over (lo, hi]: all inside when hi - lo >= 2, all hi when 1."""
    steps = tl.arange(0, NUM_PIVOTS).to(tl.int64)
    return (lo + 1 + ((hi - lo - 1) * steps) // NUM_PIVOTS).to(tl.int32)


@triton.jit
def _narrow(pivots, low_side, counts, lo, hi, lo_count, hi_count):
    """Keeps the sub-interval between the last pivot on the low side and the first one past it.

    low_side is a prefix (the tested quantity falls as the pivot rises); counts[j] = tokens above pivot j.
    """
    pivots = pivots.to(tl.int64)
    new_lo = tl.max(tl.where(low_side, pivots, lo), axis=0)
    new_hi = tl.min(tl.where(low_side, hi, pivots), axis=0)
    new_lo_count = tl.min(tl.where(low_side, counts, lo_count), axis=0)
    new_hi_count = tl.max(tl.where(low_side, hi_count, counts), axis=0)
    return new_lo, new_hi, new_lo_count, new_hi_count


# How the kernel finds the reference's tokens without sorting. Each step streams the row again (logits /
# temperature, recomputed, never stored):
#
# 1. one pass for the row maximum and the range of its order keys (float32 bits mapped to int32 so that integer
#    order is float order, -0.0 and +0.0 merged);
# 2. top-k: a multi-way bisection on the order key, i.e. a radix select 4 bits per pass: each pass counts the
#    tokens above NUM_PIVOTS = 16 keys spread over the current interval and keeps the sub-interval where the
#    count crosses k. It stops as soon as exactly k tokens lie above the low end (a few passes for float logits);
# 3. top-p: the same search on a probability threshold: per pivot, the softmax mass (over the top-k set) above
#    it, against p. The low end always has mass >= p above it, the high end < p; the search stops once the
#    lowest token above the low end is itself kept (mass above it < p), and then keeps exactly the tokens whose
#    mass_before < p, the reference's rule (the top token always has mass_before 0);
# 4. min-p: drop logit < max + log(min_p), the reference's comparison;
# 5. the draw: uniforms hashed in-kernel (`counter_rng_triton`, bit for bit `counter_rng.counter_uniforms`), and a
#    running argmax that keeps the first index among equal scores, as torch.argmax does.
#
# Equal logits: the reference's stable sort ranks equal logits by token id. When a cut falls inside a group
# of equal logits (k-th and (k+1)-th largest tied; frequent with bf16 logits), the search ends on that group's
# key, and the draw pass keeps the group's members in token order while their rank is under the top-k quota and
# mass_before (mass above the group + rank * member probability) is under p: the same tokens as the reference.
#
# Where results can still differ from the reference:
# - a top-p boundary within float rounding of p: the reference sums probabilities with a cumsum in sorted order,
#   the kernel with tree reductions (and exp2-based exp on GPUs); the sums differ by ~1e-7 relative (more for a
#   long float32 cumsum on CPU), so a row whose mass_before at the cut lands that close to p may keep one token
#   more or one fewer. Random logits make this rare, not impossible: with ~100k near-equal probabilities the
#   steps in mass_before are ~1e-5, and a few rows in 256 can be affected;
# - under TRITON_INTERPRET on CPU, numpy's log can differ from torch's in the last bit, which only matters if
#   two draw scores tie to 1 ulp; on GPUs the kernel calls libdevice logf, the function torch's CUDA log runs;
# - NaN or +inf logits are not supported (-inf, e.g. banned tokens, is); a row needs one finite logit. top_ks
#   must be >= 1 and top_ps in (0, 1], as SamplingParams guarantees.
@triton.jit
def _sample_filtered_kernel(
    logits_ptr,
    stride_row,
    temperatures_ptr,
    top_ks_ptr,
    top_ps_ptr,
    min_ps_ptr,
    seeds_ptr,
    positions_ptr,
    out_ptr,
    vocab,
    HAS_TOP_K: tl.constexpr,
    HAS_TOP_P: tl.constexpr,
    HAS_MIN_P: tl.constexpr,
    BLOCK: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    PRECISE_LOG: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    temperature = tl.load(temperatures_ptr + row)
    temperature = tl.where(temperature > 0, temperature, 1.0)
    offs = tl.arange(0, BLOCK)
    search_offs = tl.arange(0, SEARCH_BLOCK)

    # What survives top-k and top-p: every token with key > cut, plus, when the cut falls inside a group of tokens
    # with equal logits, the first of that group (key == tie_key) in token order, as the reference's stable sort
    # ranks them: rank < tie_limit (top-k) and tie_mass + rank * tie_weight < p (top-p's mass before the token).
    # Min-p then drops z < threshold.
    no_tie = -(2**40)
    cut = tl.full([], -(2**31) - 1, tl.int64)
    tie_key = tl.full([], no_tie, tl.int64)
    tie_limit = tl.full([], 2**62, tl.int64)
    tie_mass = tl.full([], float("-inf"), tl.float32)
    tie_weight = tl.full([], 0.0, tl.float32)
    p = tl.full([], 1.0, tl.float32)
    threshold = tl.full([], float("-inf"), tl.float32)
    if (HAS_TOP_K or HAS_TOP_P) or HAS_MIN_P:
        max_acc = tl.full([BLOCK], float("-inf"), tl.float32)
        kmin_acc = tl.full([BLOCK], 2**31 - 1, tl.int32)
        kmax_acc = tl.full([BLOCK], -(2**31), tl.int32)
        for start in range(0, vocab, BLOCK):
            z, valid = _scaled(row_ptr, start + offs, vocab, temperature)
            key = _order_key(z)
            max_acc = tl.maximum(max_acc, z)
            kmin_acc = tl.minimum(kmin_acc, tl.where(valid, key, 2**31 - 1))
            kmax_acc = tl.maximum(kmax_acc, tl.where(valid, key, -(2**31)))
        row_max = tl.max(max_acc, axis=0)
        kmax = tl.max(kmax_acc, axis=0).to(tl.int64)
        low = tl.min(kmin_acc, axis=0).to(tl.int64) - 1  # every candidate token has key > low
        cut = low

        if HAS_TOP_K:
            k = tl.load(top_ks_ptr + row).to(tl.int64)
            lo = low
            hi = kmax
            lo_count = tl.full([], 0, tl.int64) + vocab  # tokens with key > lo
            hi_count = tl.full([], 0, tl.int64)
            # Invariant: >= k tokens above lo, < k above hi. Done when exactly k lie above lo, or when hi = lo + 1:
            # then the k-th largest logit is tied with the next, and the group at hi is cut by token order.
            # k >= vocab: no pass.
            while (hi - lo > 1) & (lo_count > k):
                pivots = _pivots(lo, hi, NUM_PIVOTS)
                counts = tl.zeros([SEARCH_BLOCK, NUM_PIVOTS], tl.int32)
                for start in range(0, vocab, SEARCH_BLOCK):
                    z, valid = _scaled(row_ptr, start + search_offs, vocab, temperature)
                    key = _order_key(z)
                    counts += ((key[:, None] > pivots[None, :]) & valid[:, None]).to(tl.int32)
                count = tl.sum(counts, axis=0).to(tl.int64)
                lo, hi, lo_count, hi_count = _narrow(pivots, count >= k, count, lo, hi, lo_count, hi_count)
            tied = lo_count > k
            low = lo
            cut = tl.where(tied, hi, lo)
            tie_key = tl.where(tied, hi, no_tie)
            tie_limit = tl.where(tied, k - hi_count, 2**62)

        if HAS_TOP_P:
            p = tl.load(top_ps_ptr + row)
            # The top-k set's total weight: tokens above cut, plus tie_limit of a tied group (equal weights).
            tie_key_weight = tl.exp(_from_order_key(tie_key.to(tl.int32)) - row_max)
            tied_extra = tl.where(tie_key != no_tie, tie_limit.to(tl.float32) * tie_key_weight, 0.0)
            lo = low
            hi = kmax
            lo_mass = tl.full([], 1.0, tl.float32)  # share of the top-k mass above lo
            hi_mass = tl.full([], 0.0, tl.float32)  # share above hi
            total = tl.full([], 1.0, tl.float32)
            first = tl.full([], 1, tl.int32)
            done = tl.full([], 0, tl.int32)
            # Invariant: mass above lo >= p (at first, all of it), mass above hi < p. Done once the lowest token
            # above lo is itself kept (mass above it < p): then exactly the tokens above lo are kept. Otherwise the
            # search ends at hi = lo + 1 with a group of equal logits at hi that the cut splits. The first pass
            # always runs, for the total.
            while (p < 1.0) & (done == 0) & ((hi - lo > 1) | (first == 1)):
                pivots = _pivots(lo, hi, NUM_PIVOTS)
                masses = tl.zeros([SEARCH_BLOCK, NUM_PIVOTS], tl.float32)
                nearest = tl.full([SEARCH_BLOCK, NUM_PIVOTS], 2**31 - 1, tl.int32)
                cut_masses = tl.zeros([SEARCH_BLOCK], tl.float32)
                for start in range(0, vocab, SEARCH_BLOCK):
                    z, valid = _scaled(row_ptr, start + search_offs, vocab, temperature)
                    key = _order_key(z)
                    weight = tl.exp(z - row_max)
                    cut_masses += tl.where(valid & (key > cut), weight, 0.0)
                    above = (key[:, None] > pivots[None, :]) & valid[:, None]
                    masses += tl.where(above, weight[:, None], 0.0)
                    nearest = tl.minimum(nearest, tl.where(above, key[:, None], 2**31 - 1))
                total = tl.where(first == 1, tl.sum(cut_masses, axis=0) + tied_extra, total)
                first = first * 0
                mass = tl.math.div_rn(tl.sum(masses, axis=0), tl.zeros([NUM_PIVOTS], tl.float32) + total)
                low_side = mass >= p  # a prefix: mass falls as the pivot rises
                any_low = tl.max(low_side.to(tl.int32), axis=0)
                lo = tl.max(tl.where(low_side, pivots.to(tl.int64), lo), axis=0)
                hi = tl.min(tl.where(low_side, hi, pivots.to(tl.int64)), axis=0)
                lo_mass = tl.min(tl.where(low_side, mass, lo_mass), axis=0)
                hi_mass = tl.max(tl.where(low_side, hi_mass, mass), axis=0)
                # The lowest token above the new lo (one of them if several are equal: the test is then stricter).
                next_key = tl.max(tl.where(low_side, tl.min(nearest, axis=0), -(2**31)), axis=0)
                next_weight = tl.math.div_rn(tl.exp(_from_order_key(next_key) - row_max), total)
                done = ((any_low == 1) & (lo_mass - next_weight < p)).to(tl.int32)
            split = (p < 1.0) & (done == 0)
            reached = (p < 1.0) & (done == 1)
            # A split group at hi keeps the top-k limit only if it is the group top-k split.
            tie_limit = tl.where(split & (hi != tie_key), 2**62, tie_limit)
            tie_key = tl.where(split, hi, tl.where(reached, no_tie, tie_key))
            cut = tl.where(split, hi, tl.where(reached, lo, cut))
            tie_mass = tl.where(split, hi_mass, tie_mass)
            split_weight = tl.math.div_rn(tl.exp(_from_order_key(hi.to(tl.int32)) - row_max), total)
            tie_weight = tl.where(split, split_weight, tie_weight)

        if HAS_MIN_P:
            # min_p <= 0 (or NaN) drops nothing, as the reference's threshold of -inf (or NaN) does.
            min_p = tl.load(min_ps_ptr + row)
            log_min_p = _log(tl.where(min_p > 0, min_p, 1.0), PRECISE_LOG)
            threshold = tl.where(min_p > 0, row_max + log_min_p, float("-inf"))

    stream = row_key(tl.load(seeds_ptr + row), tl.load(positions_ptr + row))
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    tied_seen = tl.full([], 0, tl.int32)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        z, valid = _scaled(row_ptr, idx, vocab, temperature)
        key = _order_key(z).to(tl.int64)
        keep = valid & ~(z < threshold)
        if HAS_TOP_K or HAS_TOP_P:
            in_group = (valid & (key == tie_key)).to(tl.int32)
            rank = (tied_seen + tl.cumsum(in_group, axis=0) - in_group).to(tl.int64)
            tied_seen += tl.sum(in_group, axis=0)
            group_kept = (rank < tie_limit) & (tie_mass + rank.to(tl.float32) * tie_weight < p)
            keep = keep & ((key > cut) | ((in_group == 1) & group_kept))
        gumbel = _log(-_log(token_uniforms(stream, idx), PRECISE_LOG), PRECISE_LOG)
        score = tl.where(keep, z - gumbel, float("-inf"))
        tile_best, tile_idx = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best  # strict: an equal score later in the row loses, as in torch.argmax
        best_idx = tl.where(better, start + tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    tl.store(out_ptr + row, best_idx.to(tl.int64))


def sample_filtered_triton(
    logits: Tensor,
    temperatures: Tensor,
    top_ks: Tensor | None,
    top_ps: Tensor | None,
    min_ps: Tensor | None,
    seeds: Tensor,
    positions: Tensor,
) -> Tensor:
    """`sample_filtered_reference` in one Triton launch (one program per row, no sort, no host sync)."""
    if not HAS_TRITON:
        raise RuntimeError("sample_filtered_triton needs Triton, which is not installed on this platform")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab] (got shape {tuple(logits.shape)})")
    batch, vocab = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    if vocab == 0 or vocab >= 2**31:
        raise ValueError(f"vocab size must be in [1, 2**31) (got {vocab})")
    if logits.stride(1) != 1:
        logits = logits.contiguous()

    def vec(t: Tensor, dtype: torch.dtype) -> Tensor:
        return t.to(device=logits.device, dtype=dtype).contiguous()

    temps = vec(temperatures, torch.float32)
    num_warps = 8 if vocab >= 4096 else 4
    block = min(2048, max(16, triton.next_power_of_2(vocab)))
    # Search passes hold [SEARCH_BLOCK, NUM_PIVOTS] accumulators: 16 per thread keeps an sm_90 build near 120
    # registers with 8 warps (two programs per SM), without spills.
    search_block = min(block, 32 * num_warps)
    _sample_filtered_kernel[(batch,)](
        logits,
        logits.stride(0),
        temps,
        vec(top_ks, torch.int64) if top_ks is not None else temps,
        vec(top_ps, torch.float32) if top_ps is not None else temps,
        vec(min_ps, torch.float32) if min_ps is not None else temps,
        vec(seeds, torch.int64),
        vec(positions, torch.int64),
        out,
        vocab,
        HAS_TOP_K=top_ks is not None,
        HAS_TOP_P=top_ps is not None,
        HAS_MIN_P=min_ps is not None,
        BLOCK=block,
        SEARCH_BLOCK=search_block,
        NUM_PIVOTS=16,
        PRECISE_LOG=logits.is_cuda and libdevice is not None,
        num_warps=num_warps,
    )
    return out


__all__ = ["sample_filtered_triton"]
