"""scripts/train_demo_model.py: a short run writes a loadable checkpoint, its loss curve and log; two runs with the
same seed write the same weights; the corpus holds out documents it never trains on."""
from __future__ import annotations

import importlib.util
import json
import platform
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rayinfer.workers.demo_model import demo_model_dir

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _script(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))  # train_demo_model imports demo_corpus from beside it
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    trainer = _script("train_demo_model")
    outs = []
    for run in range(2):
        out = tmp_path_factory.mktemp(f"demo-run{run}")
        trainer.main(["--steps", "2", "--batch", "2", "--seq-len", "32", "--eval-every", "2", "--out", str(out),
                      "--loss-png", str(out / "loss.png")])
        outs.append(out)
    return outs


def test_a_short_run_writes_a_checkpoint_curve_and_log(two_runs: list[Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = two_runs[0]
    assert (out / "loss.png").stat().st_size > 1000
    log = json.loads((out / "train_log.json").read_text())
    assert log["train_tokens"] == 2 * 2 * 32 and len(log["held_out_loss"]) == 1
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) and model.config.tie_word_embeddings


def test_same_seed_same_weights(two_runs: list[Path]) -> None:
    first, second = (load_file(out / "model.safetensors") for out in two_runs)
    assert first.keys() == second.keys()
    assert all(first[name].equal(second[name]) for name in first)
    # The shipped tokenizer is what the recipe gives, where the Python version (whose docs are the corpus) matches.
    shipped_log = json.loads((demo_model_dir() / "train_log.json").read_text())
    if shipped_log["python"] == platform.python_version():
        assert (two_runs[0] / "tokenizer.json").read_text() == (demo_model_dir() / "tokenizer.json").read_text()


def test_held_out_documents_are_not_trained_on() -> None:
    corpus = _script("demo_corpus")
    train, held_out = corpus.split()
    assert len(held_out) * (corpus.HELD_OUT_EVERY - 1) <= len(train) + corpus.HELD_OUT_EVERY
    assert not set(held_out) & set(train) - {""} or len(set(held_out) & set(train)) < len(held_out) // 10
    assert sum(map(len, train)) > 1_000_000  # pydoc topics and standard-library docstrings: about 2 MB
