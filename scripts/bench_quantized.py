"""Quantised weights and KV caches on the built-in demo model: memory held, held-out perplexity and CPU decode
speed per format, against the unquantised model measured in the same run.

    .venv/bin/python scripts/bench_quantized.py [--formats float,awq,...] [--kv-cache-dtypes auto,fp8,int8]

Each format is written from the demo checkpoint by round-to-nearest (workers/tiny_checkpoint/quantized.py, no
calibration data: AWQ's and GPTQ's own tools would do better), group size 128. Perplexity is scored by rayinfer's
`prompt_logprobs` over the held-out windows of scripts/eval_demo_model.py. Prints markdown tables for
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_demo_model import held_out_windows, rayinfer_nll  # noqa: E402

# name -> (packer format, options); "float" is the demo checkpoint itself.
FORMATS = {
    "float": (None, {}),
    "awq-w4-g128": ("awq", {"group_size": 128}),
    "gptq-w4-g128": ("gptq", {"group_size": 128}),
    "gptq-w8-g128": ("gptq", {"bits": 8, "group_size": 128}),
    "gptq-w4-g128-act-order": ("gptq", {"group_size": 128, "act_order": True}),
    "ct-w4a16-g128": ("ct-int", {"group_size": 128, "symmetric": True}),
    "fp8-per-tensor": ("fp8", {}),
    "fp8-block-128": ("fp8", {"block": (128, 128)}),
    "ct-fp8-channel": ("ct-fp8", {"per_channel": True}),
}
PROMPT = "The default value is"
KV_CACHE_BYTES = 32 * 2**20  # one pool size for every run, so the KV dtypes compare by blocks held


def _linear_bytes(llm) -> tuple[int, int]:
    """(bytes the decoder's linears hold, bytes they would hold unquantised) on the in-process worker."""
    model = llm.engine.executor.worker.model
    held = unquantized = 0
    for module in model.modules():
        if not hasattr(module, "matmul") or not hasattr(module, "in_features"):
            continue
        unquantized += module.in_features * module.out_features * 4
        q = getattr(module, "quantized", None)
        held += q.held_bytes() if q is not None else module.weight.numel() * module.weight.element_size()
    return held, unquantized


def _decode_tokens_per_s(llm, batch: int, tokens: int) -> float:
    from rayinfer.cluster import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([PROMPT] * batch, SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)  # warm
    started = time.perf_counter()
    llm.generate([PROMPT] * batch, params, use_tqdm=False)
    return batch * tokens / (time.perf_counter() - started)


def measure(model_dir: Path, kv_cache_dtype: str, speed: bool) -> dict[str, float]:
    from rayinfer.cluster import LLM

    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=2048, kv_cache_dtype=kv_cache_dtype,
              kv_cache_memory_bytes=KV_CACHE_BYTES)
    try:
        windows = held_out_windows(llm.get_tokenizer(), llm.engine.max_model_len - 1)
        nll, count = rayinfer_nll(llm, windows)
        held, unquantized = _linear_bytes(llm)
        row = {"ppl": math.exp(nll / count), "tokens": count, "held": held, "unquantized": unquantized,
               "kv_blocks": llm.engine.block_manager.num_blocks}
        if speed:
            row["tps1"] = _decode_tokens_per_s(llm, 1, 64)
            row["tps16"] = _decode_tokens_per_s(llm, 16, 64)
        return row
    finally:
        llm.shutdown()


def main(argv: list[str] | None = None) -> None:
    from rayinfer.workers.demo_model import demo_model_dir
    from rayinfer.workers.tiny_checkpoint.quantized import write_quantized_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--kv-cache-dtypes", default="auto,fp8,int8")
    args = p.parse_args(argv)
    src = Path(demo_model_dir())
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"weights: demo model, {src}; CPU float32; torch threads {torch.get_num_threads()}\n")
    print("| format | linear weights held | vs float32 | held-out perplexity | decode tok/s, batch 1 | batch 16 |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.formats.split(","):
            fmt, options = FORMATS[name]
            model_dir = src if fmt is None else write_quantized_checkpoint(src, Path(tmp) / name, fmt, **options)[0]
            row = measure(model_dir, "auto", speed=True)
            print(f"| {name} | {row['held'] / 2**20:.2f} MiB | {row['held'] / row['unquantized']:.1%} | "
                  f"{row['ppl']:.3f} | {row['tps1']:.1f} | {row['tps16']:.1f} |", flush=True)
    print("\n| KV cache dtype | held-out perplexity | KV blocks in the same memory |")
    print("| --- | --- | --- |")
    for kv_dtype in args.kv_cache_dtypes.split(","):
        row = measure(src, kv_dtype, speed=False)
        print(f"| {kv_dtype} | {row['ppl']:.3f} | {row['kv_blocks']} |", flush=True)


if __name__ == "__main__":
    main()
