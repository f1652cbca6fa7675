"""Logprobs as vLLM reports them: log_softmax of the raw logits (before any sampling setting), top k by logit.

One batched log_softmax and topk over the rows that asked, then one copy to the host per result tensor; rows
that did not ask cost nothing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rayinfer.workers.step_output import TopLogprobs


def top_logprobs(logits: Tensor, scored_ids: Tensor, nums: Sequence[int]) -> list[TopLogprobs]:
    """For each row of `logits` [R, V]: the scored token's logprob and rank, then the row's top `nums[i]`.

    `scored_ids` [R] is the token each row is scored on (the one drawn, or the prompt token that followed).
    Ranks are 1-based by raw logit: 1 + how many ids have a strictly larger logit.
    """
    logits = logits.to(torch.float32)
    logprobs = torch.log_softmax(logits, dim=-1)
    scored = scored_ids.to(device=logits.device, dtype=torch.int64)[:, None]
    scored_logits = logits.gather(1, scored)
    ranks = (logits > scored_logits).sum(dim=-1, keepdim=True) + 1
    floats = [logprobs.gather(1, scored)]
    ints = [scored, ranks]
    num = min(max(nums), logits.shape[1])
    if num > 0:
        top_values, top_ids = torch.topk(logprobs, num, dim=-1)
        floats.append(top_values)
        ints.append(top_ids)
    float_rows = torch.cat(floats, dim=1).tolist()
    int_rows = torch.cat(ints, dim=1).tolist()
    out = []
    for k, lps, ids in zip(nums, float_rows, int_rows):
        k = min(k, num)
        out.append(
            TopLogprobs(token_ids=[ids[0], *ids[2 : 2 + k]], logprobs=lps[: 1 + k], ranks=[ids[1], *range(1, k + 1)])
        )
    return out
