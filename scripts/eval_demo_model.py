"""The demo model's quality: held-out perplexity, measured by rayinfer (`prompt_logprobs`) and by transformers on
the same token windows, and how many words of its generations are real words (found in its training text).

    .venv/bin/python scripts/eval_demo_model.py [--model DIR] [--samples 16]

Prints a markdown table for BENCHMARKS.md. Later issues use the same numbers as the baseline that quantised
weights or speculative decoding must keep.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus  # noqa: E402

PROMPTS = [
    "The",
    "Return a new list",
    "This module provides",
    "If the argument is",
    "The default value is",
    "Raise ValueError if",
    "An iterator that",
    "Open the file and",
]


def held_out_windows(tokenizer, window: int) -> list[list[int]]:
    """Each held-out document as BOS + text + EOS (as in training), cut into windows of at most `window` tokens."""
    _, held_out = demo_corpus.split()
    windows = []
    for enc in tokenizer.backend_tokenizer.encode_batch(held_out):
        ids = enc.ids + [tokenizer.eos_token_id]
        windows.extend(ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1)
    return windows


def rayinfer_nll(llm, windows: list[list[int]]) -> tuple[float, int]:
    from rayinfer.cluster import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    total, count = 0.0, 0
    for window, output in zip(windows, outputs):
        for token_id, entry in zip(window[1:], output.prompt_logprobs[1:]):
            total -= entry[token_id].logprob
            count += 1
    return total, count


@torch.inference_mode()
def transformers_nll(model_dir: str, windows: list[list[int]]) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for window in windows:
        ids = torch.tensor([window])
        logits = model(ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(window) - 1
    return total, count


def real_word_share(texts: list[str], vocabulary: set[str]) -> tuple[float, int]:
    words = [w.lower() for text in texts for w in re.findall(r"[A-Za-z]+", text)]
    return (sum(w in vocabulary for w in words) / len(words) if words else 0.0), len(words)


def main(argv: list[str] | None = None) -> None:
    from rayinfer.cluster import LLM, SamplingParams
    from rayinfer.workers.demo_model import demo_model_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(demo_model_dir()))
    p.add_argument("--samples", type=int, default=16, help="sampled generations per prompt for the word check")
    args = p.parse_args(argv)

    llm = LLM(args.model, dtype="float32", max_num_batched_tokens=2048)
    tokenizer = llm.get_tokenizer()
    windows = held_out_windows(tokenizer, llm.engine.max_model_len - 1)
    started = time.perf_counter()
    ours, n = rayinfer_nll(llm, windows)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    theirs, n_hf = transformers_nll(args.model, windows)
    theirs_s = time.perf_counter() - started
    assert n == n_hf
    train_texts, _ = demo_corpus.split()
    vocabulary = demo_corpus.words(train_texts)
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=48, temperature=0.0), use_tqdm=False)
    sampled = llm.generate(PROMPTS, SamplingParams(max_tokens=48, temperature=0.8, top_p=0.95, n=args.samples,
                                                  seed=0), use_tqdm=False)
    greedy_share, greedy_words = real_word_share([o.outputs[0].text for o in greedy], vocabulary)
    sampled_share, sampled_words = real_word_share([c.text for o in sampled for c in o.outputs], vocabulary)
    print(f"| measure | value |\n| --- | --- |")
    print(f"| held-out tokens scored | {n} ({len(windows)} windows of <= {llm.engine.max_model_len - 1}) |")
    print(f"| perplexity, rayinfer `prompt_logprobs` | {math.exp(ours / n):.3f} ({ours_s:.1f} s) |")
    print(f"| perplexity, transformers | {math.exp(theirs / n):.3f} ({theirs_s:.1f} s) |")
    print(f"| mean log-likelihood difference per token | {abs(ours - theirs) / n:.2e} nats |")
    print(f"| real words, greedy (48 tokens x {len(PROMPTS)} prompts) | {greedy_share:.1%} of {greedy_words} |")
    print(f"| real words, sampled (T=0.8, top_p=0.95, {args.samples} x {len(PROMPTS)}) | {sampled_share:.1%} of "
          f"{sampled_words} |")
    for output in greedy[:4]:
        print(f"\n> {output.prompt}**{output.outputs[0].text}**")


if __name__ == "__main__":
    main()
