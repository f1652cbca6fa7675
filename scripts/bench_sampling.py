#!/usr/bin/env python3
"""Times filtered sampling (temperature + top-k + top-p, then the seeded draw): the torch path
(`sample_filtered_reference`: a full-vocabulary sort, softmax, cumsum, scatter) against, on a CUDA device, the
Triton kernel (`sample_filtered_triton`: one launch, one program per row, no sort) and, on a CPU, the candidate
path (`sample_filtered_cpu`: a topk of the row, falling back to the reference when the filters reach past it).

Times are medians of CUDA-event timings (GPU) or wall-clock timings (CPU) after warm-up. Also prints how many
rows drew the same token on both paths (all of them, short of a top-p cut within float rounding of p).
`--top-k 0` turns top-k off, so top-p alone decides; `--body-scale` is the standard deviation of the logits'
random body: the higher, the more peaked the rows (at 0.5 top-p 0.9 keeps most of the vocabulary, at 4 a few
tokens).

    python scripts/bench_sampling.py [--top-k 50] [--top-p 0.9] [--temperature 0.8] [--body-scale 2] [--markdown]
"""
from __future__ import annotations

import argparse
import sys

import torch
from cuda_timing import cpu_time_ms, cuda_time_ms  # scripts/ is on sys.path when a script here runs

BATCHES = {"cuda": (1, 32, 256), "cpu": (1, 32, 64)}
VOCABS = (32_000, 128_256)  # Llama 2 and Llama 3 vocabularies


def make_inputs(batch: int, vocab: int, args: argparse.Namespace, device: str) -> tuple:
    gen = torch.Generator(device=device).manual_seed(batch * 7 + vocab)
    # Language-model-like rows: a broad body and a few much likelier tokens.
    logits = torch.randn(batch, vocab, device=device, generator=gen) * args.body_scale
    top = torch.randint(0, vocab, (batch, 8), device=device, generator=gen)
    logits.scatter_add_(1, top, torch.rand(batch, 8, device=device, generator=gen) * 12.0)
    return (
        logits,
        torch.full((batch,), args.temperature, device=device),
        torch.full((batch,), args.top_k or vocab, dtype=torch.int64, device=device),
        torch.full((batch,), args.top_p, device=device),
        None,  # no min-p
        torch.randint(-(2**62), 2**62, (batch,), device=device, generator=gen),
        torch.randint(0, 4096, (batch,), device=device, generator=gen),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--body-scale", type=float, default=2.0, help="std of the logits' random body (higher: peakier)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()

    from rayinfer.kernels.sampling_cpu import sample_filtered_cpu
    from rayinfer.kernels.sampling_reference import sample_filtered_reference
    from rayinfer.kernels.sampling_triton import sample_filtered_triton
    from rayinfer.kernels.triton_compat import HAS_TRITON

    if torch.cuda.is_available():
        if not HAS_TRITON:
            print("bench_sampling: Triton is not installed; nothing to compare against.")
            return 0
        device, fast_name, fast, timed = "cuda", "triton", sample_filtered_triton, cuda_time_ms
        where = torch.cuda.get_device_name()
    else:
        device, fast_name, fast, timed = "cpu", "cpu path", sample_filtered_cpu, cpu_time_ms
        where = f"CPU, {torch.get_num_threads()} threads"
    print(f"# {where}, top_k={args.top_k or 'off'}, top_p={args.top_p}, T={args.temperature}, body scale={args.body_scale}")
    rows = []
    for vocab in VOCABS:
        for batch in BATCHES[device]:
            inputs = make_inputs(batch, vocab, args, device)
            torch_ms = timed(lambda: sample_filtered_reference(*inputs))
            fast_ms = timed(lambda: fast(*inputs))
            same = int((sample_filtered_reference(*inputs) == fast(*inputs)).sum())
            rows.append((batch, vocab, torch_ms, fast_ms, same))

    header = ("batch", "vocab", "torch ms", f"{fast_name} ms", f"torch/{fast_name}", "same tokens")
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
