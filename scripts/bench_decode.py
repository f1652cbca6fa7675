#!/usr/bin/env python3
"""Decode step time at given batch sizes against the memory roofline of a GPU.

A decode step must read every weight once (the LM head whole, only the embedding rows it looks up) and each
sequence's cached K/V; nothing else is large. That byte count over the device-to-device copy bandwidth measured in
the same run is the step's floor; the report gives the measured step against it as a percentage. For each batch
size B the in-process engine holds B sequences of --context prompt tokens in steady decode and times --steps
`Engine.step()` calls (median), once replaying the decode CUDA graphs and once eagerly (the same engine with its
graphs set aside). A torch.profiler pass over a few steps sums the kernels' own GPU time, so the difference to the
step time is what the host adds (launches, scheduling, sampling's copy back); --top-kernels lists the largest.

    python scripts/bench_decode.py [--model DIR | --size llama3-8b] [--batch-sizes 1,64] [--context 1024]
        [--steps 40] [--dtype bfloat16] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.engine import Engine
from rayinfer.scheduler.sampling_params import SamplingParams


def copy_bandwidth() -> float:
    """Bytes read plus bytes written per second by a 1 GiB device-to-device copy (median of 20)."""
    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times)


def weight_bytes_per_step(model: torch.nn.Module, batch: int) -> int:
    """Every parameter is read once per step, except the input embedding, of which only `batch` rows are."""
    embed = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head.weight is not embed:  # untied: the table is gathered, not streamed
        total -= embed.numel() * embed.element_size() - batch * embed.shape[1] * embed.element_size()
    return total


def kv_bytes_per_step(engine: Engine, context_lens: list[int]) -> int:
    spec = engine.model_spec
    element = torch.empty((), dtype=engine.executor.worker.dtype).element_size()
    per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * element
    return per_token * sum(context_lens)


def gpu_kernel_ms(engine: Engine, steps: int, top: int = 0) -> float | None:
    """Sum of the kernels' own device time per step, from torch.profiler (None where it is unavailable)."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        # Kernel rows only: a CPU op's row (aten::mm) repeats the device time of the kernels it launched.
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        total_us = sum(e.self_device_time_total for e in events)
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
            print(f"    {e.self_device_time_total / 1e3 / steps:8.3f} ms/step  x{e.count // steps:<4d} {e.key[:90]}")
        return total_us / 1e3 / steps
    except Exception as exc:  # the profiler is a diagnostic: the step times stand without it
        print(f"profiler unavailable: {exc!r}", flush=True)
        return None


def time_steps(engine: Engine, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_batch(engine: Engine, batch: int, context: int, steps: int, bandwidth: float, top: int) -> list[dict]:
    params = SamplingParams(temperature=0.0, max_tokens=steps * 3 + 32, ignore_eos=True)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for i, request_id in enumerate(ids):
        prompt = [100 + (i * 31 + j) % 30000 for j in range(context)]
        engine.add_request(request_id, None, params, prompt_token_ids=prompt)
    scheduler = engine.scheduler
    while scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in scheduler.running):
        engine.step()
    for _ in range(5):  # steady decode, kernels compiled for this shape
        engine.step()
    torch.cuda.synchronize()
    runner = engine.executor.worker.runner
    graphs = runner.graphs
    rows = []
    for mode in ("graphs", "eager") if graphs is not None else ("eager",):
        runner.graphs = graphs if mode == "graphs" else None
        engine.step()
        step_s = time_steps(engine, steps)
        print(f"  batch {batch} {mode}: top kernels", flush=True)
        kernel_ms = gpu_kernel_ms(engine, 5, top)
        context_lens = [s.num_computed_tokens for s in scheduler.running]
        weights = weight_bytes_per_step(runner.model, batch)
        kv = kv_bytes_per_step(engine, context_lens)
        floor_s = (weights + kv) / bandwidth
        rows.append({
            "batch": batch,
            "mode": mode,
            "mean_context": sum(context_lens) / max(1, len(context_lens)),
            "step_ms": 1e3 * step_s,
            "kernel_ms": kernel_ms,
            "weight_GB": weights / 1e9,
            "kv_GB": kv / 1e9,
            "roofline_ms": 1e3 * floor_s,
            "share_of_roofline": floor_s / step_s,
            "kernel_share_of_roofline": None if kernel_ms is None else floor_s / (kernel_ms / 1e3),
            "output_tok_per_s": batch / step_s,
        })
    runner.graphs = graphs
    for request_id in ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a random one of --size)")
    parser.add_argument("--size", default="llama3-8b")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--top-kernels", type=int, default=8, help="list this many kernels by GPU time")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode measures a GPU against its roofline; no CUDA device here", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batch_sizes.split(",")]
    model = args.model
    if model is None:
        from rayinfer.workers.tiny_checkpoint import build_tiny_checkpoint

        out = Path(tempfile.mkdtemp(prefix="bench-decode-"))
        model = str(build_tiny_checkpoint(out, size=args.size, dtype=args.dtype, device="cuda"))
    bandwidth = copy_bandwidth()
    engine = Engine(EngineConfig(model=model, dtype=args.dtype, max_num_seqs=max(batches)))
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); {args.dtype}, context {args.context}")
    rows = []
    for batch in batches:
        rows.extend(run_batch(engine, batch, args.context, args.steps, bandwidth, args.top_kernels))
    for row in rows:
        kernel = "n/a" if row["kernel_ms"] is None else f"{row['kernel_ms']:.2f} ms"
        print(f"batch {row['batch']:4d} {row['mode']:>6}: step {row['step_ms']:.2f} ms (kernels {kernel}), roofline "
              f"{row['roofline_ms']:.2f} ms ({row['weight_GB']:.2f} GB weights + {row['kv_GB']:.2f} GB KV): "
              f"{100 * row['share_of_roofline']:.0f}% of roofline; {row['output_tok_per_s']:.0f} tok/s", flush=True)
    engine.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "copy_bandwidth": bandwidth, "dtype": args.dtype,
                                               "context": args.context, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
