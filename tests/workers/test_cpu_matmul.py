"""The CPU linear (weight @ x.T for few rows, vocabulary slices for LM heads) against F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rayinfer.workers.layers import cpu_matmul
from rayinfer.workers.layers.biased_lm_head import BiasedLMHead
from rayinfer.workers.layers.cpu_matmul import linear
from rayinfer.workers.layers.embedding import ParallelLMHead
from rayinfer.workers.layers.linear import ColumnParallelLinear, RowParallelLinear


@pytest.mark.parametrize("rows", [0, 1, 2, 5, 8, 9, 48])
@pytest.mark.parametrize("out_features", [7, 1024, 10001])
def test_linear_equals_torch(rows: int, out_features: int) -> None:
    torch.manual_seed(rows * out_features)
    x, weight, bias = torch.randn(rows, 32), torch.randn(out_features, 32), torch.randn(out_features)
    for b in (None, bias):
        out = linear(x, weight, b)
        assert out.shape == (rows, out_features) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_shapes_take_torch_as_is() -> None:
    weight = torch.randn(6, 4)
    for x in (torch.randn(2, 3, 4), torch.randn(1, 4, dtype=torch.float64)):
        expected = F.linear(x, weight.to(x.dtype))
        assert torch.equal(linear(x, weight.to(x.dtype)), expected)


def test_layers_and_heads_use_it(monkeypatch) -> None:
    monkeypatch.setattr(cpu_matmul, "_VOCAB_ROWS", 4)  # take the sliced path even for a tiny vocabulary
    monkeypatch.setattr(cpu_matmul, "_VOCAB_SLICE", 3)
    calls = []
    real = cpu_matmul.linear
    for module in ("rayinfer.workers.layers.linear", "rayinfer.workers.layers.embedding", "rayinfer.workers.layers.biased_lm_head"):
        monkeypatch.setattr(f"{module}.linear", lambda *a, _real=real: calls.append(1) or _real(*a))
    layers = [ColumnParallelLinear(8, 10, bias=True), RowParallelLinear(8, 10), ParallelLMHead(10, 8), BiasedLMHead(10, 8)]
    for layer in layers:
        for param in layer.parameters():
            torch.nn.init.normal_(param)
        for rows in (1, 12):
            hidden = torch.randn(rows, 8)
            expected = F.linear(hidden, layer.weight, getattr(layer, "bias", None))
            got = layer.compute_logits(hidden) if hasattr(layer, "compute_logits") else layer(hidden)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 * len(layers)
