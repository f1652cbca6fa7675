"""The LM head's CPU projection (vocabulary slices times hidden^T) against F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rayinfer.workers.layers import embedding
from rayinfer.workers.layers.biased_lm_head import BiasedLMHead
from rayinfer.workers.layers.embedding import ParallelLMHead, project_to_vocab


@pytest.mark.parametrize("rows", [0, 1, 5, 48])
@pytest.mark.parametrize("vocab", [7, 4096, 10001])
def test_projection_equals_linear(rows: int, vocab: int) -> None:
    torch.manual_seed(rows * vocab)
    hidden, weight, bias = torch.randn(rows, 32), torch.randn(vocab, 32), torch.randn(vocab)
    logits = project_to_vocab(hidden, weight)
    assert logits.shape == (rows, vocab) and logits.is_contiguous()
    torch.testing.assert_close(logits, F.linear(hidden, weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(project_to_vocab(hidden, weight, bias), F.linear(hidden, weight, bias), rtol=1e-5, atol=1e-5)


def test_heads_use_the_sliced_projection(monkeypatch) -> None:
    monkeypatch.setattr(embedding, "_CPU_VOCAB_SLICE", 3)  # several slices even for a tiny vocabulary
    for head in (ParallelLMHead(10, 8), BiasedLMHead(10, 8)):
        torch.nn.init.normal_(head.weight)
        if isinstance(head, BiasedLMHead):
            torch.nn.init.normal_(head.bias)
        hidden = torch.randn(4, 8)
        expected = F.linear(hidden, head.weight, getattr(head, "bias", None))
        torch.testing.assert_close(head.compute_logits(hidden), expected, rtol=1e-5, atol=1e-5)
