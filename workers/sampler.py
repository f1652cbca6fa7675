"""Batched sampling: logits of the sequences that sample this step -> one token id each.

Everything is tensor ops over the whole batch (no per-row Python on the hot path), in vLLM's order:
banned ids -> allowed ids -> logit bias -> repetition penalty -> frequency/presence penalties -> greedy argmax
-> temperature -> top-k -> top-p -> min-p -> draw. Logprobs are not computed here: they come from the raw
logits (see `workers/logprobs.py`), which the sampler never modifies.

The draw is reproducible per request whatever else is in the batch: each row's randomness comes from a
counter-based hash of (seed, output position, token id), not from a shared generator whose state would
depend on which rows ran before. Filters that a row does not use leave its logits bit-for-bit unchanged,
so a row draws the same token alone, in any batch, and in any order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from rayinfer.kernels import sample_filtered
from rayinfer.kernels.counter_rng import counter_uniforms, mix64
from rayinfer.kernels.counter_rng import signed64 as _signed64  # the name the body below uses
from rayinfer.kernels.sampling_reference import top_k_top_p_reference
from rayinfer.workers.step_plan import SampleRequest

@dataclass
class SamplingTensors:
    """Per-row sampling settings as device tensors, plus batch flags that let the sampler skip work."""

    temperatures: Tensor  # [B] float32; 0 for greedy rows
    top_ks: Tensor  # [B] int64; vocab_size where disabled
    top_ps: Tensor  # [B] float32
    min_ps: Tensor  # [B] float32
    presence_penalties: Tensor  # [B] float32
    frequency_penalties: Tensor  # [B] float32
    repetition_penalties: Tensor  # [B] float32
    seeds: Tensor  # [B] int64
    output_positions: Tensor  # [B] int64: number of output tokens so far
    prompt_token_ids: Tensor | None  # [B, Lp] int64 padded with vocab_size; only with a repetition penalty
    output_token_ids: Tensor | None  # [B, Lo] int64 padded with vocab_size; only with any penalty
    banned_token_ids: Tensor | None  # [B, K] int64 padded with vocab_size; stop ids while below min_tokens
    allowed_token_ids: Tensor | None  # [B, K] int64 padded with vocab_size; only when a row restricts its ids
    restricted_rows: Tensor | None  # [B] bool: rows with allowed_token_ids (the others allow everything)
    logit_bias_ids: Tensor | None  # [B, K] int64 padded with vocab_size; only when a row has a logit_bias
    logit_bias_values: Tensor | None  # [B, K] float32 padded with 0
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_penalty: bool

    @classmethod
    def build(cls, rows: Sequence[SampleRequest], vocab_size: int, device: torch.device | str) -> SamplingTensors:
        if not rows:
            raise ValueError("SamplingTensors.build needs at least one row")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 (got {vocab_size})")
        temperatures: list[float] = []
        top_ks: list[int] = []
        top_ps: list[float] = []
        min_ps: list[float] = []
        banned: list[list[int]] = []
        allowed: list[list[int]] = []
        bias_ids: list[list[int]] = []
        bias_values: list[list[float]] = []
        any_repetition = any_penalty = False
        for row in rows:
            p = row.params
            greedy = p.is_greedy
            # Greedy rows get every filter disabled: they take argmax, and disabled filters cost nothing.
            temperatures.append(0.0 if greedy else p.temperature)
            top_ks.append(vocab_size if greedy or p.top_k <= 0 else min(p.top_k, vocab_size))
            top_ps.append(1.0 if greedy else p.top_p)
            min_ps.append(0.0 if greedy else p.min_p)
            banned.append(list(row.stop_ids_for_min_tokens) if len(row.output_token_ids) < p.min_tokens else [])
            allowed.append(p.allowed_token_ids or [])
            bias_ids.append(list(p.logit_bias) if p.logit_bias else [])
            bias_values.append(list(p.logit_bias.values()) if p.logit_bias else [])
            any_repetition |= p.repetition_penalty != 1.0
            any_penalty |= p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

        def floats(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        def ints(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(
            temperatures=floats(temperatures),
            top_ks=ints(top_ks),
            top_ps=floats(top_ps),
            min_ps=floats(min_ps),
            presence_penalties=floats([r.params.presence_penalty for r in rows]),
            frequency_penalties=floats([r.params.frequency_penalty for r in rows]),
            repetition_penalties=floats([r.params.repetition_penalty for r in rows]),
            seeds=ints([_signed64(r.seed) for r in rows]),
            output_positions=ints([len(r.output_token_ids) for r in rows]),
            prompt_token_ids=_padded([r.prompt_token_ids for r in rows], vocab_size, device)
            if any_repetition
            else None,
            output_token_ids=_padded([r.output_token_ids for r in rows], vocab_size, device) if any_penalty else None,
            banned_token_ids=_padded(banned, vocab_size, device) if any(banned) else None,
            allowed_token_ids=_padded(allowed, vocab_size, device) if any(allowed) else None,
            restricted_rows=torch.tensor([bool(a) for a in allowed], device=device) if any(allowed) else None,
            logit_bias_ids=_padded(bias_ids, vocab_size, device) if any(bias_ids) else None,
            logit_bias_values=_padded_floats(bias_values, device) if any(bias_ids) else None,
            all_greedy=all(t == 0.0 for t in temperatures),
            any_top_k=any(k < vocab_size for k in top_ks),
            any_top_p=any(p < 1.0 for p in top_ps),
            any_min_p=any(p > 0.0 for p in min_ps),
            any_penalty=any_penalty,
        )


def _padded(lists: Sequence[Sequence[int]], pad: int, device: torch.device | str) -> Tensor:
    """[B, max len] int64, short rows filled with `pad` (= vocab_size, a column the sampler drops)."""
    width = max(1, max(len(ids) for ids in lists))
    return torch.tensor([list(ids) + [pad] * (width - len(ids)) for ids in lists], dtype=torch.int64, device=device)


def _padded_floats(lists: Sequence[Sequence[float]], device: torch.device | str) -> Tensor:
    """[B, max len] float32, short rows filled with 0 (matching `_padded`'s pad ids)."""
    width = max(1, max(len(values) for values in lists))
    return torch.tensor([list(v) + [0.0] * (width - len(v)) for v in lists], dtype=torch.float32, device=device)


def _token_mask(token_ids: Tensor, vocab_size: int) -> Tensor:
    """[B, V] bool, True at the ids listed per row; the pad id lands in an extra column that is cut off."""
    mask = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    return mask.scatter_(1, token_ids, True)[:, :vocab_size]


def apply_allowed_and_bias(logits: Tensor, t: SamplingTensors) -> Tensor:
    """Masks ids outside each restricted row's allowed set to -inf, then adds each row's logit_bias (in place)."""
    vocab = logits.shape[1]
    if t.allowed_token_ids is not None:
        disallowed = ~_token_mask(t.allowed_token_ids, vocab) & t.restricted_rows[:, None]
        logits.masked_fill_(disallowed, float("-inf"))
    if t.logit_bias_ids is not None:
        bias = torch.zeros(logits.shape[0], vocab + 1, dtype=logits.dtype, device=logits.device)
        logits += bias.scatter_add_(1, t.logit_bias_ids, t.logit_bias_values)[:, :vocab]
    return logits


def apply_penalties(logits: Tensor, t: SamplingTensors) -> Tensor:
    """Repetition penalty (prompt + output tokens) then frequency/presence penalties (output tokens)."""
    batch, vocab = logits.shape
    if t.output_token_ids is None:
        raise ValueError("SamplingTensors.any_penalty is set but output_token_ids is missing")
    out_ids = t.output_token_ids
    counts = torch.zeros(batch, vocab + 1, dtype=torch.float32, device=logits.device)
    counts = counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float32))[:, :vocab]
    if t.prompt_token_ids is not None:
        # HF semantics over prompt + output tokens: shrink positive logits, push negative ones further down.
        seen = _token_mask(t.prompt_token_ids, vocab) | (counts > 0)
        rep = t.repetition_penalties[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    # OpenAI semantics over output tokens only.
    return logits - (t.frequency_penalties[:, None] * counts + t.presence_penalties[:, None] * (counts > 0))


def apply_top_k_top_p(logits: Tensor, t: SamplingTensors) -> Tensor:
    """Mask to -inf outside each row's top-k, then outside the smallest set reaching top-p mass."""
    return top_k_top_p_reference(logits, t.top_ks if t.any_top_k else None, t.top_ps if t.any_top_p else None)


class Sampler(torch.nn.Module):
    """Turns [B, V] logits into [B] token ids following each row's `SamplingTensors` settings."""

    def forward(self, logits: Tensor, t: SamplingTensors) -> Tensor:
        # A float32 copy: computing in float32 whatever the model dtype, and in-place edits stay ours.
        logits = logits.to(torch.float32, copy=True)
        vocab = logits.shape[1]
        if t.banned_token_ids is not None:
            logits.masked_fill_(_token_mask(t.banned_token_ids, vocab), float("-inf"))
        if t.allowed_token_ids is not None or t.logit_bias_ids is not None:
            logits = apply_allowed_and_bias(logits, t)
        if t.any_penalty:
            logits = apply_penalties(logits, t)
        greedy_ids = logits.argmax(dim=-1)
        if t.all_greedy:
            return greedy_ids

        # Temperature -> top-k -> top-p -> min-p -> draw: one Triton launch on GPUs, the torch reference elsewhere.
        # The draw hashes (seed, position, token id), so a row's token does not depend on the rest of the batch.
        sampled_ids = sample_filtered(
            logits,
            t.temperatures,
            t.top_ks if t.any_top_k else None,
            t.top_ps if t.any_top_p else None,
            t.min_ps if t.any_min_p else None,
            t.seeds,
            t.output_positions,
        )
        sampled_rows = t.temperatures > 0
        return torch.where(sampled_rows, sampled_ids, greedy_ids)


__all__ = [
    "Sampler",
    "SamplingTensors",
    "apply_allowed_and_bias",
    "apply_penalties",
    "apply_top_k_top_p",
    "counter_uniforms",
    "mix64",
]
