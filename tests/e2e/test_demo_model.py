"""The built-in demo model (`rayinfer-demo`): it ships with the package, `LLM()` loads it with no model given, its
greedy output equals transformers', and the words it writes are real words of its training text."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from rayinfer.cluster import LLM, SamplingParams
from rayinfer.workers.demo_model import DEMO_MODEL_NAME, demo_model_dir

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
PROMPTS = ["The", "Return a new list", "This module provides", "If the argument is", "Raise ValueError if"]
# The share of generated words found in the training text. Measured with the shipped weights (BENCHMARKS.md,
# demo model): 100% greedy and 98% sampled; the random tiny model's byte soup far less.
MIN_REAL_WORDS = 0.85


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo() -> LLM:
    llm = LLM(dtype="float32")  # no model given: the built-in one
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def training_words() -> set[str]:
    corpus = _script("demo_corpus")
    train, _ = corpus.split()
    return corpus.words(train)


def test_it_ships_as_package_data() -> None:
    folder = demo_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train_log.json"):
        assert (folder / name).is_file(), name
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    log = json.loads((folder / "train_log.json").read_text())
    assert log["held_out_loss"] and log["train_tokens"] > 1_000_000


def test_llm_without_a_model_is_the_demo_model(demo: LLM) -> None:
    assert demo.engine.config.model == DEMO_MODEL_NAME
    assert demo.engine.model_spec.vocab_size == json.loads((demo_model_dir() / "config.json").read_text())["vocab_size"]


def test_greedy_output_equals_transformers(demo: LLM, hf_greedy) -> None:
    tokenizer = demo.get_tokenizer()
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    expected = hf_greedy(demo_model_dir(), prompt_ids, 24)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in demo.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params,
                                                          use_tqdm=False)]
    assert got == expected


def _share_of_real_words(texts: list[str], vocabulary: set[str]) -> float:
    words = [w.lower() for text in texts for w in re.findall(r"[A-Za-z]+", text)]
    assert len(words) >= 50, texts
    return sum(w in vocabulary for w in words) / len(words)


def test_most_generated_words_are_real_words(demo: LLM, training_words: set[str]) -> None:
    greedy = demo.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0.0), use_tqdm=False)
    sampled = demo.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, n=4, seed=1),
                            use_tqdm=False)
    greedy_texts = [o.outputs[0].text for o in greedy]
    sampled_texts = [c.text for o in sampled for c in o.outputs]
    assert len(set(sampled_texts)) > len(PROMPTS)  # sampling varies: not a fixed string
    assert _share_of_real_words(greedy_texts, training_words) >= MIN_REAL_WORDS, greedy_texts
    assert _share_of_real_words(sampled_texts, training_words) >= MIN_REAL_WORDS, sampled_texts


def test_random_weights_fail_the_word_check(tiny_checkpoint, training_words: set[str]) -> None:
    # The check above can tell a trained model from noise: the random tiny model writes byte soup.
    llm = LLM(str(tiny_checkpoint("llama")))
    try:
        out = llm.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), use_tqdm=False)
        words = [w.lower() for o in out for w in re.findall(r"[A-Za-z]+", o.outputs[0].text)]
        assert sum(w in training_words for w in words) / max(1, len(words)) < MIN_REAL_WORDS
    finally:
        llm.shutdown()
