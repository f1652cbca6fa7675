"""Batched sampling: logits of the sequences that sample this step -> one token id each.

Everything is tensor ops over the whole batch (no per-row Python on the hot path), in vLLM's order:
banned ids -> allowed ids -> logit bias -> repetition penalty -> frequency/presence penalties -> grammar mask ->
greedy argmax -> temperature -> top-k -> top-p -> min-p -> draw. Logprobs are not computed here: they come from the raw
logits (see `workers/logprobs.py`), which the sampler never modifies.

The draw is reproducible per request whatever else is in the batch: each row's randomness comes from a
counter-based hash of (seed, output position, token id), not from a shared generator whose state would
depend on which rows ran before. Filters that a row does not use leave its logits bit-for-bit unchanged,
so a row draws the same token alone, in any batch, and in any order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from rayinfer.kernels import sample_filtered
from rayinfer.kernels.counter_rng import counter_uniforms, mix64, signed64
from rayinfer.kernels.sampling_reference import top_k_top_p_reference
from rayinfer.workers.step_plan import SampleRequest

@dataclass
class SamplingTensors:
    """Per-row sampling settings as device tensors, plus batch flags that let the sampler skip work.

    The engine gathers them each step from its `SamplingBatch` (`workers/sampling_batch.py`), which keeps every
    live sequence's row on the device across steps.
    """

    temperatures: Tensor  # [B] float32; 0 for greedy rows
    top_ks: Tensor  # [B] int64; vocab_size where disabled
    top_ps: Tensor  # [B] float32
    min_ps: Tensor  # [B] float32
    presence_penalties: Tensor  # [B] float32
    frequency_penalties: Tensor  # [B] float32
    repetition_penalties: Tensor  # [B] float32
    seeds: Tensor  # [B] int64
    output_positions: Tensor  # [B] int64: number of output tokens so far
    prompt_seen: Tensor | None  # [B, V] bool: ids in the prompt; only with a repetition penalty
    output_counts: Tensor | None  # [B, V] float32: times each id was drawn; only with any penalty
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
    # Structured outputs (`grammar_matchers.py`): [B, ceil(V / 32)] int32, bit j of row i set when row i may draw
    # token j; None when no row is constrained.
    grammar_bitmask: Tensor | None = None
    grammar_may_empty: bool = False  # a constrained row also bans or restricts ids: the grammar may need to decide alone


def row_of(t: SamplingTensors, row: int) -> SamplingTensors:
    """Row `row` of `t` alone, with the batch's flags: a filter another row needs leaves this row unchanged."""
    sliced = {f.name: getattr(t, f.name)[row : row + 1] for f in fields(t) if isinstance(getattr(t, f.name), Tensor)}
    return replace(t, **sliced)


@dataclass(frozen=True)
class RowSettings:
    """A sequence's scalar sampler settings, as its row of `SamplingTensors` holds them for its whole life.

    Greedy rows get every filter disabled: they take the argmax, and a disabled filter costs nothing.
    """

    temperature: float
    top_k: int  # vocab_size where disabled
    top_p: float
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    seed: int  # wrapped to int64, as the counter-based draw hashes it

    @classmethod
    def of(cls, request: SampleRequest, vocab_size: int) -> RowSettings:
        p = request.params
        greedy = p.is_greedy
        return cls(
            temperature=0.0 if greedy else p.temperature,
            top_k=vocab_size if greedy or p.top_k <= 0 else min(p.top_k, vocab_size),
            top_p=1.0 if greedy else p.top_p,
            min_p=0.0 if greedy else p.min_p,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            seed=signed64(request.seed),
        )


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
    if t.output_counts is None:
        raise ValueError("SamplingTensors.any_penalty is set but output_counts is missing")
    counts = t.output_counts
    if t.prompt_seen is not None:
        # HF semantics over prompt + output tokens: shrink positive logits, push negative ones further down.
        seen = t.prompt_seen | (counts > 0)
        rep = t.repetition_penalties[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    # OpenAI semantics over output tokens only.
    return logits - (t.frequency_penalties[:, None] * counts + t.presence_penalties[:, None] * (counts > 0))


def apply_grammar(logits: Tensor, raw: Tensor, t: SamplingTensors) -> Tensor:
    """Masks to -inf the tokens each row's grammar does not accept next (in place on `logits`, float32). Where the
    row's other constraints (stop ids banned below min_tokens, allowed_token_ids) leave no token the grammar accepts,
    the grammar alone decides: that row takes the raw logits under the grammar mask."""
    import xgrammar

    vocab = logits.shape[1]
    fallback = None
    if t.grammar_may_empty:
        fallback = raw.to(torch.float32, copy=True)
        xgrammar.apply_token_bitmask_inplace(fallback, t.grammar_bitmask, vocab_size=vocab)
    xgrammar.apply_token_bitmask_inplace(logits, t.grammar_bitmask, vocab_size=vocab)
    if fallback is not None:
        emptied = torch.isneginf(logits).all(dim=-1, keepdim=True)
        logits = torch.where(emptied, fallback, logits)
    return logits


def apply_top_k_top_p(logits: Tensor, t: SamplingTensors) -> Tensor:
    """Mask to -inf outside each row's top-k, then outside the smallest set reaching top-p mass."""
    return top_k_top_p_reference(logits, t.top_ks if t.any_top_k else None, t.top_ps if t.any_top_p else None)


class Sampler(torch.nn.Module):
    """Turns [B, V] logits into [B] token ids following each row's `SamplingTensors` settings."""

    def forward(self, logits: Tensor, t: SamplingTensors) -> Tensor:
        # A float32 copy: computing in float32 whatever the model dtype, and in-place edits stay ours.
        raw, logits = logits, logits.to(torch.float32, copy=True)
        vocab = logits.shape[1]
        if t.banned_token_ids is not None:
            logits.masked_fill_(_token_mask(t.banned_token_ids, vocab), float("-inf"))
        if t.allowed_token_ids is not None or t.logit_bias_ids is not None:
            logits = apply_allowed_and_bias(logits, t)
        if t.any_penalty:
            logits = apply_penalties(logits, t)
        if t.grammar_bitmask is not None:
            logits = apply_grammar(logits.contiguous(), raw, t)
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
    "RowSettings",
    "Sampler",
    "SamplingTensors",
    "apply_allowed_and_bias",
    "apply_grammar",
    "apply_penalties",
    "apply_top_k_top_p",
    "counter_uniforms",
    "mix64",
    "row_of",
]
