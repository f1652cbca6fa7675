"""workers/grammar_matchers.py and the sampler's grammar mask: a sequence sent again replays its outputs into a
fresh matcher, unconstrained rows are left alone, an ended grammar leaves its row free, a refused token fails
its sequence, and where min_tokens or allowed_token_ids leave the grammar nothing, the grammar decides."""
from __future__ import annotations

import pytest
import torch

from rayinfer.workers.demo_model import demo_model_dir
from rayinfer.workers.grammar import GrammarCompiler, GrammarSpec
from rayinfer.workers.grammar_matchers import GrammarMatchers
from rayinfer.workers.sampler import Sampler
from rayinfer.workers.sampling_batch import build_sampling_tensors
from rayinfer.workers.sampling_options import SamplingOptions
from rayinfer.workers.step_plan import NewSequence, SampleRequest, StepPlan

pytest.importorskip("xgrammar")
REGEX = GrammarSpec("regex", "[0-9]{3}(ab|cd)")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir())


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), stop_token_ids=[tokenizer.eos_token_id])


def _request(spec: GrammarSpec | None, output=(), **options) -> SampleRequest:
    return SampleRequest(SamplingOptions(temperature=1.0, grammar=spec, **options), seed=1, prompt_token_ids=[1],
                         output_token_ids=list(output), stop_ids_for_min_tokens=[])


def _matchers(compiler: GrammarCompiler, *requests: SampleRequest, device: str = "cpu") -> GrammarMatchers:
    matchers = GrammarMatchers(lambda: compiler, compiler.tokenizer_info.vocab_size, torch.device(device))
    matchers.apply(StepPlan(chunks=[], new_sequences=[NewSequence(i, 1, r) for i, r in enumerate(requests)]))
    return matchers


def _allowed(bitmask: torch.Tensor, row: int, vocab: int) -> set[int]:
    bits = (bitmask[row].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(torch.nonzero(bits.flatten()[:vocab]).flatten().tolist())


def _ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(ch) for ch in text]  # one byte-level token per ASCII character


def test_a_sequence_sent_again_replays_its_outputs(compiler, tokenizer) -> None:
    vocab = compiler.tokenizer_info.vocab_size
    stepped = _matchers(compiler, _request(REGEX))
    assert stepped.accept([0], _ids(tokenizer, "1")) is None
    assert stepped.accept([0], _ids(tokenizer, "2")) is None
    replayed = _matchers(compiler, _request(REGEX, output=_ids(tokenizer, "12")))
    expected = _allowed(stepped.step_mask([0]).bitmask, 0, vocab)
    assert _allowed(replayed.step_mask([0]).bitmask, 0, vocab) == expected
    assert all(tokenizer.decode([t])[0].isdigit() for t in expected)  # the third digit is all it may draw


def test_unconstrained_rows_are_free_and_refusals_fail_their_sequence(compiler, tokenizer) -> None:
    vocab = compiler.tokenizer_info.vocab_size
    matchers = _matchers(compiler, _request(None), _request(REGEX), _request(REGEX, output=_ids(tokenizer, "x")))
    mask = matchers.step_mask([0, 1, 2])
    assert _allowed(mask.bitmask, 0, vocab) == set(range(vocab)) and not mask.may_empty
    assert len(_allowed(mask.bitmask, 1, vocab)) < vocab
    failed = matchers.accept([0, 1, 2], _ids(tokenizer, "zzz"))
    assert set(failed) == {1, 2}  # 1 drew a refused token; 2 could not replay its output (it never had a matcher)
    assert "refused" in failed[1] and "breaks the grammar" in failed[2]
    matchers.apply(StepPlan(chunks=[], finished_seq_ids=[0, 1, 2]))
    assert len(matchers) == 0 and matchers.step_mask([0, 1, 2]) is None


def test_an_ended_grammar_leaves_its_row_free(compiler, tokenizer) -> None:
    """Its stop token was drawn; a step planned before the engine saw it draws once more, and that draw is dropped."""
    vocab = compiler.tokenizer_info.vocab_size
    matchers = _matchers(compiler, _request(GrammarSpec.choices(["ok"])))
    assert matchers.accept([0], _ids(tokenizer, "o")) is None and matchers.accept([0], _ids(tokenizer, "k")) is None
    assert _allowed(matchers.step_mask([0]).bitmask, 0, vocab) == {tokenizer.eos_token_id}
    assert matchers.accept([0], [tokenizer.eos_token_id]) is None
    assert _allowed(matchers.step_mask([0]).bitmask, 0, vocab) == set(range(vocab))
    assert matchers.accept([0], [5]) is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("options", [dict(min_tokens=5), dict(allowed_token_ids=[7, 8])], ids=["min-tokens", "allowed"])
def test_the_grammar_decides_when_other_constraints_leave_it_nothing(compiler, tokenizer, options, device) -> None:
    eos = tokenizer.eos_token_id
    request = _request(GrammarSpec.choices(["ok"]), output=_ids(tokenizer, "ok"), **options)
    request.stop_ids_for_min_tokens = [eos] if "min_tokens" in options else []
    matchers = _matchers(compiler, request, device=device)
    vocab = compiler.tokenizer_info.vocab_size
    tensors = build_sampling_tensors([request], vocab, device)
    mask = matchers.step_mask([0])
    assert mask.may_empty
    tensors.grammar_bitmask, tensors.grammar_may_empty = mask.bitmask, mask.may_empty
    for seed in range(3):
        logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed)).to(device)
        assert Sampler()(logits, tensors).tolist() == [eos]
