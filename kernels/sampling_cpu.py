"""Filtered sampling on a CPU from a short candidate list instead of a full-vocabulary sort, for rows with top-k.

The reference sorts every row of the vocabulary (120-160 ms for 64 rows of 32000 on the 2-core EPYC) and hashes
a uniform for every token. But top-k keeps a prefix of the sorted row, and top-p and min-p only shorten it:
`torch.topk` finds a row's best 128 (or 2048) tokens in a tenth of the time, and only those need uniforms. The
list is enough for a row when its k fits in it and no token left out ties the last candidate (else which members
of a tied group come "first" is not known); top-p's softmax is over the top-k set, which then lies in the list.

Rows whose k is larger try the longer list, and the rest (top-k off, long k, ties at the cut) run the reference
on those rows alone: a row's draw does not depend on the others'. Rows without top-k gain nothing: their top-p set
has no bound known before the sort. Results equal the reference's: the same stable order (equal logits rank by
token id), the same uniforms (`uniforms_at` is `counter_uniforms` at the candidates' ids) and the same
first-index argmax. Greedy rows (temperature 0) settle in any list: the caller discards their draws.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rayinfer.kernels.counter_rng import uniforms_at
from rayinfer.kernels.sampling_reference import sample_filtered_reference

CANDIDATE_COUNTS = (128, 2048)


def sample_filtered_cpu(
    logits: Tensor,
    temperatures: Tensor,
    top_ks: Tensor | None,
    top_ps: Tensor | None,
    min_ps: Tensor | None,
    seeds: Tensor,
    positions: Tensor,
) -> Tensor:
    """Same contract and tokens as `sample_filtered_reference`."""
    args = (logits, temperatures, top_ks, top_ps, min_ps, seeds, positions)
    if top_ks is None:
        return sample_filtered_reference(*args)  # nothing bounds the kept set ahead of time
    batch, vocab = logits.shape
    scaled = logits.to(torch.float32) / torch.where(temperatures > 0, temperatures, 1.0)[:, None]
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    unsettled = torch.ones(batch, dtype=torch.bool, device=logits.device)  # rows still without a draw
    for count in CANDIDATE_COUNTS:
        if count >= vocab:
            break  # a list as long as the row saves nothing
        # Rows whose top-k fits the list (greedy rows fit any list: their draws are discarded).
        rows = torch.nonzero(unsettled & ((top_ks <= count) | (temperatures <= 0))).flatten()
        if rows.numel() == 0:
            continue
        drawn, settled = _draw_from_candidates(scaled[rows], count, *_pick(args, rows)[1:])
        out[rows[settled]] = drawn[settled]
        unsettled[rows[settled]] = False
    rows = torch.nonzero(unsettled).flatten()
    if rows.numel():
        out[rows] = sample_filtered_reference(*_pick(args, rows))
    return out


def _pick(args: tuple, rows: Tensor) -> tuple:
    return tuple(None if a is None else a[rows] for a in args)


def _draw_from_candidates(
    scaled: Tensor,
    count: int,
    temperatures: Tensor,
    top_ks: Tensor | None,
    top_ps: Tensor | None,
    min_ps: Tensor | None,
    seeds: Tensor,
    positions: Tensor,
) -> tuple[Tensor, Tensor]:
    """(the draw from each row's best `count` tokens; which rows it settles: greedy rows, and rows whose top-k
    set lies in the list, i.e. k <= count and no token outside the list ties the last one)."""
    vocab = scaled.shape[1]
    values, ids = scaled.topk(count, dim=-1)
    # The reference's stable order: equal values by token id (topk leaves their order open).
    by_id = ids.argsort(dim=-1)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)

    sampled = temperatures > 0
    k = top_ks.clamp(max=vocab)
    # A token left out that ties the last candidate would make the cut ambiguous.
    unknown = (k > count) | ((scaled >= values[:, -1:]).sum(dim=-1) > count)
    kept = torch.arange(count, device=scaled.device)[None, :] < k[:, None]
    if top_ps is not None:  # top-p's softmax is over the top-k set, all of it in the list
        in_top_k = values.masked_fill(~kept, float("-inf"))
        probs = in_top_k.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = (mass_before >= top_ps[:, None]) & (top_ps[:, None] < 1.0)
        drop[:, 0] = False  # the most likely token always stays
        kept &= ~drop
    if min_ps is not None:
        kept &= ~(values < values[:, :1] + torch.log(min_ps)[:, None])
    uniforms = uniforms_at(seeds, positions, ids)
    scores = (values - torch.log(-torch.log(uniforms))).masked_fill(~kept, float("-inf"))
    best = scores.max(dim=-1, keepdim=True).values
    # torch.argmax over the token-ordered row returns the first (lowest id) of equal scores.
    drawn = torch.where(scores == best, ids, vocab).min(dim=-1).values
    return drawn, ~unknown | ~sampled
