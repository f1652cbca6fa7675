#!/usr/bin/env python3
"""Times each Triton kernel on a CUDA device and compares it with what the device can do.

Bandwidth-bound ops (RMSNorm, RoPE, SiLU-and-mul, KV write, decode attention) print achieved GB/s next to a
device-to-device copy measured in the same run; prefill attention prints TFLOP/s next to torch's
scaled_dot_product_attention (flash backend) on the same shapes. Times are medians of CUDA-event timings after
warm-up, on inputs larger than L2 so nothing is served from cache.

    python scripts/bench_kernels.py [--dtype bfloat16] [--markdown] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from cuda_timing import cuda_time_ms  # scripts/ is on sys.path when a script here runs

from rayinfer.kernels import activation, attention_triton, norm, rotary

GB = 1e9


def copy_bandwidth(dtype: torch.dtype) -> float:
    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda").view(dtype)  # 512 MiB, far above any L2
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / GB


def _row(name: str, shape: str, ms: float, bytes_moved: float | None = None, flops: float | None = None) -> dict:
    row = {"kernel": name, "shape": shape, "ms": ms}
    if bytes_moved is not None:
        row["GB/s"] = bytes_moved / (ms * 1e-3) / GB
    if flops is not None:
        row["TFLOP/s"] = flops / (ms * 1e-3) / 1e12
    return row


def bench_elementwise(dtype: torch.dtype) -> list[dict]:
    rows = []
    size = torch.empty((), dtype=dtype).element_size()
    tokens, hidden = 32768, 4096
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, dtype=dtype, device="cuda")
    ms = cuda_time_ms(lambda: norm.rms_norm_triton(x, weight, 1e-6))
    rows.append(_row("rms_norm", f"{tokens}x{hidden}", ms, 2 * x.numel() * size))
    ms = cuda_time_ms(lambda: norm.fused_add_rms_norm_triton(x, residual, weight, 1e-6))
    rows.append(_row("fused_add_rms_norm", f"{tokens}x{hidden}", ms, 4 * x.numel() * size))

    intermediate = 14336
    gate_up = torch.randn(tokens // 2, 2 * intermediate, dtype=dtype, device="cuda")
    ms = cuda_time_ms(lambda: activation.silu_and_mul_triton(gate_up))
    rows.append(_row("silu_and_mul", f"{tokens // 2}x{2 * intermediate}", ms, 1.5 * gate_up.numel() * size))

    rope_tokens, q_heads, kv_heads, head_dim = 65536, 32, 8, 128
    qkv = torch.randn(rope_tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, device="cuda")
    q = qkv[:, : q_heads * head_dim].view(rope_tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(rope_tokens, kv_heads, head_dim)
    positions = torch.randint(0, 8192, (rope_tokens,), device="cuda")
    cos = torch.randn(8192, head_dim // 2, device="cuda")
    sin = torch.randn(8192, head_dim // 2, device="cuda")
    ms = cuda_time_ms(lambda: rotary.rotary_embedding_triton(positions, q, k, cos, sin, True))
    moved = 2 * (q.numel() + k.numel()) * size + 2 * rope_tokens * head_dim * 4  # q/k in and out, cos/sin rows
    rows.append(_row("rotary_embedding", f"{rope_tokens}x({q_heads}+{kv_heads})x{head_dim}", ms, moved))
    return rows


def _paged_inputs(seq_lens: list[int], query_lens: list[int], kv_heads: int, q_heads: int, head_dim: int, dtype):
    block_size = 16
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    ids = torch.randperm(num_blocks, device="cuda")
    width = max(blocks_per_seq)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int64, device="cuda")
    start = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = ids[start : start + n]
        start += n
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], device="cuda")
    q = torch.randn(sum(query_lens), q_heads, head_dim, dtype=dtype, device="cuda")
    return q, k_cache, v_cache, tables, starts, torch.tensor(seq_lens, device="cuda")


def bench_attention(dtype: torch.dtype) -> list[dict]:
    rows = []
    size = torch.empty((), dtype=dtype).element_size()
    q_heads, kv_heads, head_dim = 32, 8, 128
    scale = head_dim**-0.5
    for batch, context in ((64, 2048), (16, 8192), (1, 32768)):
        q, kc, vc, tables, starts, lens = _paged_inputs([context] * batch, [1] * batch, kv_heads, q_heads, head_dim, dtype)
        ms = cuda_time_ms(
            lambda: attention_triton.paged_attention_triton(
                q, kc, vc, tables, starts, lens, scale, max_query_len=1, max_seq_len=context
            )
        )
        moved = 2 * batch * context * kv_heads * head_dim * size
        rows.append(_row("decode_attention", f"{batch} seqs x {context} ctx", ms, moved))

    for batch, length in ((8, 2048), (2, 8192)):
        q, kc, vc, tables, starts, lens = _paged_inputs([length] * batch, [length] * batch, kv_heads, q_heads, head_dim, dtype)
        flops = 4 * batch * q_heads * head_dim * length * (length + 1) / 2  # causal: half the score matrix
        ms = cuda_time_ms(
            lambda: attention_triton.paged_attention_triton(
                q, kc, vc, tables, starts, lens, scale, max_query_len=length, max_seq_len=length
            )
        )
        rows.append(_row("prefill_attention", f"{batch} x {length}", ms, flops=flops))
        qd = torch.randn(batch, q_heads, length, head_dim, dtype=dtype, device="cuda")
        kd = torch.randn(batch, kv_heads, length, head_dim, dtype=dtype, device="cuda")
        vd = torch.randn_like(kd)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)

        rows.append(_row("  torch SDPA flash (peer)", f"{batch} x {length}", cuda_time_ms(sdpa), flops=flops))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--markdown", action="store_true", help="print a table for BENCHMARKS.md")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device; nothing measured", file=sys.stderr)
        return 0
    dtype = getattr(torch, args.dtype)
    copy = copy_bandwidth(dtype)
    rows = bench_elementwise(dtype) + bench_attention(dtype)
    device = torch.cuda.get_device_name()
    print(f"device: {device}  dtype: {args.dtype}  device-to-device copy: {copy:.0f} GB/s")
    for row in rows:
        if "GB/s" in row:
            row["% of copy"] = 100 * row["GB/s"] / copy
    if args.markdown:
        print("| kernel | shape | ms | GB/s | % of copy | TFLOP/s |")
        print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        cells = [row["kernel"], row["shape"], f"{row['ms']:.3f}"]
        cells += [f"{row[key]:.1f}" if key in row else "" for key in ("GB/s", "% of copy", "TFLOP/s")]
        print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(f"{c:>24}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "dtype": args.dtype, "copy_GBps": copy, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
