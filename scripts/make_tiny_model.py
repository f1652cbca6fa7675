#!/usr/bin/env python
"""Writes a built-in tiny checkpoint (random weights, real byte-level BPE tokenizer) to a folder."""

from __future__ import annotations

import argparse

from rayinfer.workers.tiny_checkpoint import SIZES, SUPPORTED_TINY_ARCHS, build_tiny_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", choices=SUPPORTED_TINY_ARCHS, default="llama")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default=None, help="e.g. 200KB: write a sharded checkpoint with an index")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda for large shapes)")
    args = parser.parse_args(argv)
    path = build_tiny_checkpoint(
        args.out, arch=args.arch, size=args.size, seed=args.seed, max_shard_size=args.max_shard_size,
        dtype=args.dtype, device=args.device,
    )
    print(f"wrote {args.arch}/{args.size} (seed {args.seed}) checkpoint to {path.resolve()}")


if __name__ == "__main__":
    main()
