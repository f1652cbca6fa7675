#!/usr/bin/env python3
"""Times filtered sampling (temperature + top-k + top-p, then the seeded draw) on a CUDA device: the torch path
(`sample_filtered_reference`: a full-vocabulary sort, softmax, cumsum, scatter) against the Triton kernel
(`sample_filtered_triton`: one launch, one program per row, no sort).

Times are medians of CUDA-event timings after warm-up. Also prints how many rows drew the same token on both
paths (all of them, short of a top-p cut within float rounding of p).

    python scripts/bench_sampling.py [--top-k 50] [--top-p 0.9] [--temperature 0.8] [--markdown]
"""
from __future__ import annotations

import argparse
import sys

import torch
from cuda_timing import cuda_time_ms  # scripts/ is on sys.path when a script here runs

BATCHES = (1, 32, 256)
VOCABS = (32_000, 128_256)  # Llama 2 and Llama 3 vocabularies


def make_inputs(batch: int, vocab: int, args: argparse.Namespace) -> tuple:
    gen = torch.Generator(device="cuda").manual_seed(batch * 7 + vocab)
    # Language-model-like rows: a broad body and a few much likelier tokens.
    logits = torch.randn(batch, vocab, device="cuda", generator=gen) * 2.0
    top = torch.randint(0, vocab, (batch, 8), device="cuda", generator=gen)
    logits.scatter_add_(1, top, torch.rand(batch, 8, device="cuda", generator=gen) * 12.0)
    return (
        logits,
        torch.full((batch,), args.temperature, device="cuda"),
        torch.full((batch,), args.top_k, dtype=torch.int64, device="cuda"),
        torch.full((batch,), args.top_p, device="cuda"),
        None,  # no min-p
        torch.randint(-(2**62), 2**62, (batch,), device="cuda", generator=gen),
        torch.randint(0, 4096, (batch,), device="cuda", generator=gen),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_sampling: no CUDA device here; nothing to time (the Triton kernel targets NVIDIA GPUs).")
        return 0
    from rayinfer.kernels.sampling import sample_filtered_reference, sample_filtered_triton
    from rayinfer.kernels.triton_compat import HAS_TRITON

    if not HAS_TRITON:
        print("bench_sampling: Triton is not installed; nothing to compare against.")
        return 0

    print(f"# {torch.cuda.get_device_name()}, top_k={args.top_k}, top_p={args.top_p}, T={args.temperature}")
    rows = []
    for vocab in VOCABS:
        for batch in BATCHES:
            inputs = make_inputs(batch, vocab, args)
            torch_ms = cuda_time_ms(lambda: sample_filtered_reference(*inputs))
            triton_ms = cuda_time_ms(lambda: sample_filtered_triton(*inputs))
            same = int((sample_filtered_reference(*inputs) == sample_filtered_triton(*inputs)).sum())
            rows.append((batch, vocab, torch_ms, triton_ms, same))

    header = ("batch", "vocab", "torch ms", "triton ms", "torch/triton", "same tokens")
    lines = [
        (str(b), str(v), f"{t:.4f}", f"{k:.4f}", f"{t / k:.2f}x", f"{same}/{b}") for b, v, t, k, same in rows
    ]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        for line in lines:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
