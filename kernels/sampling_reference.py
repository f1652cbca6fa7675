"""Filtered sampling in plain torch (temperature -> top-k -> top-p -> min-p -> draw, the filters over a stable
full-vocabulary sort): the definition that the Triton and CPU samplers must match token for token. The draw is an
exponential race, argmax(logit_i - log(-log u_i)), with u from `counter_rng`, so a row's draw is reproducible and
does not depend on the batch it runs in.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rayinfer.kernels.counter_rng import counter_uniforms


def top_k_top_p_reference(logits: Tensor, top_ks: Tensor | None, top_ps: Tensor | None) -> Tensor:
    """Mask to -inf outside each row's top-k, then outside the smallest set reaching top-p mass.

    None disables a filter for the whole batch; per row, k >= vocab and p >= 1 disable it.
    """
    vocab = logits.shape[1]
    # stable=True: ties rank by token id, so the kept set is unique whatever kernel the shape picks.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    if top_ks is not None:
        ranks = torch.arange(vocab, device=logits.device)
        sorted_logits.masked_fill_(ranks[None, :] >= top_ks[:, None], float("-inf"))
    if top_ps is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = (mass_before >= top_ps[:, None]) & (top_ps[:, None] < 1.0)
        drop[:, 0] = False  # the most likely token always stays
        sorted_logits.masked_fill_(drop, float("-inf"))
    # Scattering back is an exact permutation, so rows with both filters off come back unchanged.
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample_filtered_reference(
    logits: Tensor,
    temperatures: Tensor,
    top_ks: Tensor | None,
    top_ps: Tensor | None,
    min_ps: Tensor | None,
    seeds: Tensor,
    positions: Tensor,
) -> Tensor:
    """[B] int64 token ids drawn from [B, V] logits after temperature, top-k, top-p and min-p.

    temperatures [B] float32 (rows at 0 are greedy rows whose result the caller discards: they divide by 1),
    top_ks [B] int64 (>= 1; >= V disables), top_ps [B] float32 (1 disables), min_ps [B] float32 (0 disables),
    seeds and positions [B] int64. Passing None for a filter skips it for the whole batch.
    """
    logits = logits.to(torch.float32)
    logits = logits / torch.where(temperatures > 0, temperatures, 1.0)[:, None]
    if top_ks is not None or top_ps is not None:
        logits = top_k_top_p_reference(logits, top_ks, top_ps)
    if min_ps is not None:
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); log(0) = -inf drops nothing.
        threshold = logits.max(dim=-1, keepdim=True).values + torch.log(min_ps)[:, None]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    # Exponential race argmax(p_i / E_i), E_i = -log(u_i) ~ Exp(1), which picks i with probability p_i.
    # Taken in log space, argmax(logit_i - log E_i): elementwise only, so no softmax reduction whose
    # rounding could depend on the batch shape; filtered tokens stay at -inf and never win.
    uniforms = counter_uniforms(seeds, positions, logits.shape[1])
    return (logits - torch.log(-torch.log(uniforms))).argmax(dim=-1)


__all__ = ["sample_filtered_reference", "top_k_top_p_reference"]
