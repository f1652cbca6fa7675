"""Filtered sampling on a CPU from a short candidate list instead of a full-vocabulary sort.

The reference sorts every row of the vocabulary (160 ms for 64 rows of 32000 on the 2-core EPYC) and hashes a
uniform for every token (46 ms). But top-k and top-p keep a prefix of the sorted row, and a language model's
top-p set is usually a few dozen tokens: `torch.topk` finds a row's best few hundred in a tenth of the time, and
only those need uniforms. A prefix is enough when the filters provably stop inside it:

- no token outside the candidates ties the last one (else which of a tied group are "first" is not known);
- top-k: k fits in the candidates;
- top-p: its softmax is over the top-k set, so that set must lie inside the candidates, or be the whole row (top-k
  off: the normaliser is then the row's logsumexp); and the candidates' mass must reach p, or k must end first.

Otherwise the next, longer candidate list is tried, and then the reference. Results equal the reference's: the
same stable order (equal logits rank by token id), the same uniforms (`uniforms_at` is `counter_uniforms` at the
candidates' ids) and the same first-index argmax; only a top-p boundary within float rounding of p may fall one
token apart, because the normaliser is summed in another order (the Triton kernel has the same caveat). Greedy
rows (temperature 0) are ignored: the caller discards their draws.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rayinfer.kernels.sampling import sample_filtered_reference, uniforms_at

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
    if top_ks is not None or top_ps is not None:
        scaled = logits.to(torch.float32) / torch.where(temperatures > 0, temperatures, 1.0)[:, None]
        row_lse = torch.logsumexp(scaled, dim=-1)
        top_prob = torch.exp(scaled.max(dim=-1).values - row_lse)
        for count in CANDIDATE_COUNTS:
            if count >= scaled.shape[1]:
                break  # the whole row: the reference's sort is as cheap
            if not _may_fit(count, scaled.shape[1], top_prob, temperatures, top_ks, top_ps):
                continue
            drawn = _draw_from_candidates(scaled, row_lse, count, temperatures, top_ks, top_ps, min_ps, seeds, positions)
            if drawn is not None:
                return drawn
    return sample_filtered_reference(logits, temperatures, top_ks, top_ps, min_ps, seeds, positions)


def _may_fit(count: int, vocab: int, top_prob: Tensor, temperatures: Tensor, top_ks: Tensor | None, top_ps: Tensor | None) -> bool:
    """A cheap necessary condition for every sampled row's kept set to lie in its best `count` tokens: top-k
    within them, or top-k off and top-p reachable (`count` tokens hold at most count x the top probability). Flat
    rows fail it, so they go to the reference without paying for a topk first."""
    k = torch.full_like(temperatures, vocab, dtype=torch.int64) if top_ks is None else top_ks.clamp(max=vocab)
    fits = k <= count
    if top_ps is not None:
        fits |= (k >= vocab) & (top_ps < 1.0) & (top_prob * count >= top_ps)
    return bool((fits | (temperatures <= 0)).all())


def _draw_from_candidates(
    scaled: Tensor,
    row_lse: Tensor,
    count: int,
    temperatures: Tensor,
    top_ks: Tensor | None,
    top_ps: Tensor | None,
    min_ps: Tensor | None,
    seeds: Tensor,
    positions: Tensor,
) -> Tensor | None:
    """The draw from each row's best `count` tokens, or None when some sampled row's filters may reach past them."""
    vocab = scaled.shape[1]
    values, ids = scaled.topk(count, dim=-1)
    # The reference's stable order: equal values by token id (topk leaves their order open).
    by_id = ids.argsort(dim=-1)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)

    sampled = temperatures > 0
    unknown = (scaled >= values[:, -1:]).sum(dim=-1) > count  # a token left out ties the last candidate
    ranks = torch.arange(count, device=scaled.device)[None, :]
    k = torch.full_like(temperatures, vocab, dtype=torch.int64) if top_ks is None else top_ks.clamp(max=vocab)
    kept = ranks < k[:, None]
    if top_ps is None:
        unknown |= k > count
    else:
        k_inside, whole_row = k <= count, k >= vocab
        unknown |= ~(k_inside | whole_row) & (top_ps < 1.0)
        in_top_k = values.masked_fill(~kept, float("-inf"))
        normaliser = torch.where(k_inside, torch.logsumexp(in_top_k, dim=-1), row_lse)
        probs = torch.exp(in_top_k - normaliser[:, None])
        mass_before = probs.cumsum(dim=-1) - probs
        drop = (mass_before >= top_ps[:, None]) & (top_ps[:, None] < 1.0)
        drop[:, 0] = False  # the most likely token always stays
        kept &= ~drop
        # Every candidate kept and the row's top-k longer: the next token is kept too unless the mass reached p.
        candidates_mass = mass_before[:, -1] + probs[:, -1]
        unknown |= kept[:, -1] & (k > count) & ((top_ps >= 1.0) | (candidates_mass < top_ps))
    if bool((unknown & sampled).any()):
        return None
    if min_ps is not None:
        kept &= ~(values < values[:, :1] + torch.log(min_ps)[:, None])
    uniforms = uniforms_at(seeds, positions, ids)
    scores = (values - torch.log(-torch.log(uniforms))).masked_fill(~kept, float("-inf"))
    best = scores.max(dim=-1, keepdim=True).values
    # torch.argmax over the token-ordered row returns the first (lowest id) of equal scores.
    return torch.where(scores == best, ids, vocab).min(dim=-1).values
