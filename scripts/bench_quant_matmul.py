#!/usr/bin/env python3
"""Times the quantised-weight matmuls against the unquantised F.linear on the same shapes.

CUDA (bfloat16 activations): Llama-3-8B's projections at TP=1 (qkv 4096->6144, o 4096->4096, gate_up 4096->28672,
down 14336->4096) at each batch size: bf16 F.linear, W4A16 (group 128, the Triton kernels), FP8 W8A16 (Triton,
per-channel and 128x128 blocks) and FP8 W8A8 (torch._scaled_mm where the device has it). Each op is captured in a
CUDA graph over enough weight copies to exceed L2, so launch overhead and cache hits stay out of the time. At batch 1
it prints the weight bandwidth (bytes of weights read / time) and its share of --peak-tbps (H100 SXM: 3.35).
Each row also carries the op's max error against its torch reference, relative to the largest output.

CPU (float32, best of 15 runs): the CPU paths (dequantise per call, then F.linear) against F.linear on float weights,
the dequantise alone, and what torch._int_mm would take for 8-bit weights with int8-quantised activations (which the
CPU path does not use: it would change the float32 results).

    python scripts/bench_quant_matmul.py [--batch-sizes 1,8,64,512] [--shapes qkv=4096x6144,...] [--markdown]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F
from cuda_timing import cuda_time_ms  # scripts/ is on sys.path when a script here runs

from rayinfer.kernels import fp8_matmul, quant_matmul, quant_matmul_triton

CUDA_SHAPES = "qkv=4096x6144,o=4096x4096,gate_up=4096x28672,down=14336x4096"  # name=KxN
CPU_SHAPES = "square=2048x2048"
ROTATE_BYTES = 256 << 20  # weight copies cycled per timed op: several times an H100/H200's 50 MB L2
GB = 1e9


def parse_shapes(text: str) -> list[tuple[str, int, int]]:
    shapes = []
    for item in text.split(","):
        name, dims = item.split("=")
        k_in, n_out = (int(d) for d in dims.lower().split("x"))
        shapes.append((name, k_in, n_out))
    return shapes


def int_weight(k_in: int, n_out: int, bits: int, group_size: int, device: str, dtype: torch.dtype, act_order=False):
    """Random packed weight (qweight, scales, zeros, g_idx) in the canonical layout."""
    groups = -(-k_in // group_size)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k_in * bits // 32, n_out), dtype=torch.int32, device=device)
    scales = (torch.rand(groups, n_out, device=device) * 2e-3 + 1e-3).to(dtype)
    zeros = torch.randint(0, 2**bits, (groups, n_out), device=device).to(torch.uint8)
    g_idx = (torch.arange(k_in, device=device) // group_size).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(k_in, device=device)]
    return qweight, scales, zeros, g_idx


def fp8_weight(k_in: int, n_out: int, device: str, block: bool):
    weight = torch.randn(n_out, k_in, device=device).mul(64).clamp(-448, 448).to(torch.float8_e4m3fn)
    shape = (-(-n_out // 128), -(-k_in // 128)) if block else (n_out,)
    return weight, torch.rand(shape, device=device) * 1e-3


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def cpu_best_ms(fn, repeats: int = 15) -> float:
    """Fastest of `repeats` wall-clock runs after two untimed ones: on a shared 2-core machine the median moves with
    the neighbours' load, the minimum much less."""
    fn(), fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def graph_time_ms(op, weights: list) -> float:
    """Time of one op call: a CUDA graph of one call per weight copy, replayed, divided by the copies."""
    for w in weights[:2]:
        op(*w)  # compiles Triton and probes _scaled_mm outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for w in weights:
                op(*w)
    except RuntimeError as error:  # timing without a graph still says something; say which
        print(f"  (no CUDA graph: {error}; eager timing)", file=sys.stderr)
        cycle = itertools.cycle(weights)
        return cuda_time_ms(lambda: op(*next(cycle)))
    return cuda_time_ms(graph.replay, warmup=3, iters=20) / len(weights)


def cuda_formats(k_in: int, n_out: int, group_size: int) -> dict:
    """format -> (make a weight: tuple of tensors, op(x, *weight), reference(x, *weight)), bfloat16 activations."""
    int_op = quant_matmul_triton.int_quant_matmul_triton
    formats = {
        "bf16": (
            lambda: (torch.randn(n_out, k_in, device="cuda", dtype=torch.bfloat16) / k_in**0.5,),
            lambda x, w: F.linear(x, w),
            lambda x, w: F.linear(x.float(), w.float()).to(x.dtype),
        ),
        "w4a16": (
            lambda: int_weight(k_in, n_out, 4, group_size, "cuda", torch.bfloat16),
            lambda x, *w: int_op(x, *w, 4, group_size=group_size),
            lambda x, *w: quant_matmul.int_quant_matmul_reference(x, *w, 4),
        ),
    }
    for fmt, block, act_quant in [("fp8_w8a16", None, False), ("fp8_block_w8a16", (128, 128), False),
                                  ("fp8_w8a8", None, True)]:
        formats[fmt] = (
            lambda block=block: fp8_weight(k_in, n_out, "cuda", block=block is not None),
            lambda x, w, s, block=block, aq=act_quant: fp8_matmul.fp8_matmul_cuda(x, w, s, block, aq),
            lambda x, w, s, block=block, aq=act_quant: fp8_matmul.fp8_matmul_reference(x, w, s, block, aq),
        )
    return formats


def bench_cuda(shapes, batch_sizes: list[int], group_size: int, peak_tbps: float) -> list[dict]:
    rows = []
    for name, k_in, n_out in shapes:
        for fmt, (make, op, reference) in cuda_formats(k_in, n_out, group_size).items():
            first = make()
            weight_bytes = nbytes(first)  # what the layer holds (W4A16's g_idx, 0.2% of it, is not read)
            copies = [first] + [make() for _ in range(-(-ROTATE_BYTES // weight_bytes) - 1)]
            for m_rows in batch_sizes:
                x = torch.randn(m_rows, k_in, device="cuda", dtype=torch.bfloat16)
                error = rel_error(op(x, *first), reference(x, *first))
                ms = graph_time_ms(lambda *w, x=x: op(x, *w), copies)
                gbps = weight_bytes / (ms * 1e-3) / GB
                rows.append({"shape": name, "K": k_in, "N": n_out, "M": m_rows, "format": fmt, "ms": ms,
                             "weight_MB": weight_bytes / 1e6, "GB/s": gbps, "% of peak": 100 * gbps / (peak_tbps * 1e3),
                             "rel_err": error})
            del copies, first
            torch.cuda.empty_cache()
    base = {(r["shape"], r["M"]): r["ms"] for r in rows if r["format"] == "bf16"}
    for row in rows:
        row["speedup vs bf16"] = base[(row["shape"], row["M"])] / row["ms"]
    return rows


def bench_cpu(shapes, batch_sizes: list[int], group_size: int) -> list[dict]:
    rows = []
    for name, k_in, n_out in shapes:
        w_float = torch.randn(n_out, k_in) / k_in**0.5
        w4 = int_weight(k_in, n_out, 4, group_size, "cpu", torch.float32)
        w4_act_order = int_weight(k_in, n_out, 4, group_size, "cpu", torch.float32, act_order=True)
        w8 = int_weight(k_in, n_out, 8, group_size, "cpu", torch.float32)
        w_int8 = torch.randint(-128, 128, (n_out, k_in), dtype=torch.int8).t()  # the [N, K] weight, as [K, N]
        w_int8_scale = torch.rand(n_out) * 1e-3
        fp8 = fp8_weight(k_in, n_out, "cpu", block=False)

        def int8_matmul(x: torch.Tensor) -> torch.Tensor:
            x_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
            x_q = (x / x_scale).round().clamp(-128, 127).to(torch.int8)
            return torch._int_mm(x_q, w_int8).float() * x_scale * w_int8_scale

        for m_rows in batch_sizes:
            x = torch.randn(m_rows, k_in)
            timings = {
                "float32 F.linear": lambda: F.linear(x, w_float),
                "w4 dequantise only": lambda: quant_matmul.dequantize_int_weight(*w4, 4),
                "w4 cpu path": lambda: quant_matmul.int_quant_matmul_cpu(x, *w4, 4),
                "w4 act-order cpu path": lambda: quant_matmul.int_quant_matmul_cpu(x, *w4_act_order, 4),
                "w8 cpu path": lambda: quant_matmul.int_quant_matmul_cpu(x, *w8, 8),
                "w8a8 torch._int_mm (not used)": lambda: int8_matmul(x),
                "fp8 cpu path (w8a16)": lambda: fp8_matmul.fp8_matmul_cpu(x, *fp8),
            }
            base = None
            for fmt, fn in timings.items():
                ms = cpu_best_ms(fn)
                base = base or ms
                rows.append({"shape": name, "K": k_in, "N": n_out, "M": m_rows, "format": fmt, "ms": ms,
                             "x float": ms / base})
    return rows


def print_rows(rows: list[dict], keys: list[str], markdown: bool) -> None:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    if markdown:
        print("| " + " | ".join(keys) + " |")
        print("| " + " | ".join("---" for _ in keys) + " |")
    for row in rows:
        cells = [cell(row[key]) if key in row else "" for key in keys]
        print("| " + " | ".join(cells) + " |" if markdown else "  ".join(f"{c:>16}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--shapes", help=f"name=KxN,... (default {CUDA_SHAPES} on CUDA, {CPU_SHAPES} on CPU)")
    parser.add_argument("--batch-sizes", help="comma-separated M (default 1,8,64,512 on CUDA, 1,64 on CPU)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--peak-tbps", type=float, default=3.35, help="memory bandwidth peak for the share column")
    parser.add_argument("--markdown", action="store_true", help="print a table for BENCHMARKS.md")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    shapes = parse_shapes(args.shapes or (CUDA_SHAPES if on_cuda else CPU_SHAPES))
    batch_sizes = [int(m) for m in (args.batch_sizes or ("1,8,64,512" if on_cuda else "1,64")).split(",")]
    if on_cuda:
        device = torch.cuda.get_device_name()
        rows = bench_cuda(shapes, batch_sizes, args.group_size, args.peak_tbps)
        keys = ["shape", "M", "format", "ms", "speedup vs bf16", "weight_MB", "GB/s", "% of peak", "rel_err"]
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
        rows = bench_cpu(shapes, batch_sizes, args.group_size)
        keys = ["shape", "M", "format", "ms", "x float"]
    print(f"device: {device}  torch {torch.__version__}  group size {args.group_size}")
    print_rows(rows, keys, args.markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "peak_tbps": args.peak_tbps, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
