#!/usr/bin/env python3
"""Offline throughput: this engine against transformers' continuous batching and padded static `generate`.

The same requests (token-id prompts, `ignore_eos`, greedy) run through each engine in one process, one after
another: rayinfer's `LLM.generate`; transformers' continuous batching (`generate_batch`'s manager, fed each
request with its own `max_new_tokens`); and transformers' `generate` on left-padded static batches. Reported per
engine: requests/s, output tokens/s and total (prompt + output) tokens/s, the ratios to rayinfer, and the share
of this machine's float matmul rate the run reached (the workload's FLOPs over a `torch.mm` peak measured in
the same run, with the same threads).

    python scripts/bench_throughput.py [--model DIR | --size llama-56m] [--num-prompts 48]
        [--input-len 16:384] [--output-len 64] [--dataset random|sharegpt-like]
        [--engines rayinfer,generate_batch,generate] [--static-batch-size 48] [--json FILE]

Without --model a random checkpoint of --size (default llama-56m: hidden 512, 8 layers, 8 heads, 4 KV heads,
intermediate 1408, vocab 32000) is built in a temp folder. On a CUDA machine every engine runs on the GPU (default
dtype bfloat16) and the matmul peak is a bfloat16 8192^3 `torch.mm`; on a CPU, float32 and a 1024^3 product.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SHAREGPT_MEAN_PROMPT, SHAREGPT_MEAN_OUTPUT = 202, 179


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def _span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def _lognormal_len(rng: random.Random, mean: int, low: int, high: int) -> int:
    sigma = 0.8  # ShareGPT's lengths are heavy-tailed; mu is set so the (unclipped) mean is `mean`
    return max(low, min(high, int(rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma))))


def make_workload(args: argparse.Namespace, vocab_size: int, max_len: int) -> Workload:
    rng = random.Random(args.seed)
    prompts, outputs = [], []
    for _ in range(args.num_prompts):
        if args.dataset == "sharegpt-like":
            prompt_len = _lognormal_len(rng, SHAREGPT_MEAN_PROMPT, 4, max_len // 2)
            output_len = _lognormal_len(rng, SHAREGPT_MEAN_OUTPUT, 4, max_len - prompt_len)
        else:
            prompt_len, output_len = rng.randint(*_span(args.input_len)), rng.randint(*_span(args.output_len))
        prompts.append([rng.randrange(10, vocab_size) for _ in range(prompt_len)])
        outputs.append(output_len)
    return Workload(prompts, outputs)


def workload_flops(config, workload: Workload) -> float:
    """Forward FLOPs: 2 x weights per token through the layers, the LM head at each output position, and
    attention's QK^T and AV over each token's context."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden + 3 * hidden * config.intermediate_size
    flops = 0.0
    for prompt, output_len in zip(workload.prompts, workload.output_lens):
        tokens = len(prompt) + output_len - 1  # the last drawn token is never fed back
        context_sum = tokens * (tokens + 1) / 2
        flops += 2 * per_layer * layers * tokens + 4 * layers * heads * head_dim * context_sum
        flops += 2 * hidden * config.vocab_size * output_len
    return flops


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak_flops(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """The rate of a large `torch.mm` in the run's dtype, on random data (zeros run faster on some GPUs)."""
    device = _device()
    size = 8192 if device == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    _synchronize()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
        if runs % 10 == 0:
            _synchronize()
    _synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - start)


def _warm_up_prompts(max_len: int) -> list[list[int]]:
    """Prompts from 2 tokens to a quarter of the context: the kernels are compiled (Triton on a GPU) for short and
    long prefill tiles and for split and unsplit decode before the clock starts."""
    lengths = [2, 17, 100, 700, max(4, max_len // 4)]
    return [[5 + (i % 50) for i in range(n)] for n in lengths if n < max_len]


def run_rayinfer(model: str, workload: Workload, args: argparse.Namespace) -> float:
    from rayinfer.cluster import LLM, SamplingParams

    llm = LLM(model, dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    warm = _warm_up_prompts(llm.engine.max_model_len)
    llm.generate([{"prompt_token_ids": p} for p in warm], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    _synchronize()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in workload.prompts], params, use_tqdm=False)
    _synchronize()
    elapsed = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outputs] == workload.output_lens
    llm.shutdown()
    return elapsed


def _hf_model(model: str, args: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    device_map = "cuda" if _device() == "cuda" else None  # load straight onto the GPU
    return AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.dtype), device_map=device_map).eval()


def run_generate_batch(model: str, workload: Workload, args: argparse.Namespace) -> float:
    """transformers' continuous batching manager (what `generate_batch` drives), fed each request with its own
    output length; its warm-up (CUDA graph capture on a GPU) runs before the clock starts."""
    from transformers import GenerationConfig

    hf = _hf_model(model, args)
    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=max(workload.output_lens))
    hf.generate_batch([[5, 6]], generation_config=config, max_new_tokens=2)  # warm-up
    manager = hf.init_continuous_batching(generation_config=config)
    if hasattr(manager, "warmup") and not getattr(manager, "warmed_up", True):
        manager.warmup()
    _synchronize()
    start = time.perf_counter()
    manager.start()
    try:
        for prompt, output_len in zip(workload.prompts, workload.output_lens):
            manager.add_request(prompt, max_new_tokens=output_len)
        done, last_report = 0, start
        while done < len(workload.prompts):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done += 1
            if time.perf_counter() - last_report > 15:  # a slow peer still shows how far it got
                last_report = time.perf_counter()
                print(f"  generate_batch: {done}/{len(workload.prompts)} done after {last_report - start:.0f} s", flush=True)
        _synchronize()
        return time.perf_counter() - start
    finally:
        manager.stop(block=True, timeout=5)


def run_static_generate(model: str, workload: Workload, args: argparse.Namespace) -> float:
    hf = _hf_model(model, args)
    order = sorted(range(len(workload.prompts)), key=lambda i: len(workload.prompts[i]))  # like lengths together
    batches = [order[i : i + args.static_batch_size] for i in range(0, len(order), args.static_batch_size)]
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            width = max(len(workload.prompts[i]) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long, device=hf.device)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):  # left padding, as generate expects for decoder-only models
                prompt = workload.prompts[i]
                ids[row, width - len(prompt) :] = torch.tensor(prompt, device=hf.device)
                mask[row, width - len(prompt) :] = 1
            new = max(workload.output_lens[i] for i in batch)  # a static batch runs to its longest output
            hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                        eos_token_id=None, pad_token_id=0)
    _synchronize()
    return time.perf_counter() - start


RUNNERS = {"rayinfer": run_rayinfer, "generate_batch": run_generate_batch, "generate": run_static_generate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a random one of --size)")
    parser.add_argument("--size", default="llama-56m", help="shape of the random checkpoint built without --model")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", default="16:384", help="prompt length range LOW:HIGH (random dataset)")
    parser.add_argument("--output-len", default="64", help="output length range LOW:HIGH (random dataset)")
    parser.add_argument("--dataset", choices=("random", "sharegpt-like"), default="random")
    parser.add_argument("--engines", default="rayinfer,generate_batch,generate")
    parser.add_argument("--static-batch-size", type=int, default=48)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if _device() == "cuda" else "float32")

    from transformers import AutoConfig

    model = args.model
    if model is None:
        from rayinfer.workers.tiny_checkpoint import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench-throughput-")), size=args.size))
    config = AutoConfig.from_pretrained(model)
    workload = make_workload(args, config.vocab_size, config.max_position_embeddings)
    flops = workload_flops(config, workload)
    peak = matmul_peak_flops(getattr(torch, args.dtype))
    device_name = torch.cuda.get_device_name() if _device() == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.num_prompts} requests, {workload.prompt_tokens} prompt + {workload.output_tokens} output tokens, "
          f"{flops / 1e12:.2f} TFLOP; {args.dtype} torch.mm peak {peak / 1e9:.1f} GFLOP/s on {device_name}")
    results = {}
    for name in args.engines.split(","):
        elapsed = RUNNERS[name](model, workload, args)
        results[name] = {
            "elapsed_s": elapsed,
            "requests_per_s": len(workload.prompts) / elapsed,
            "output_tokens_per_s": workload.output_tokens / elapsed,
            "total_tokens_per_s": (workload.prompt_tokens + workload.output_tokens) / elapsed,
            "share_of_matmul_peak": flops / elapsed / peak,
        }
        r = results[name]
        print(f"{name:>15}: {elapsed:7.2f} s  {r['requests_per_s']:6.2f} req/s  {r['output_tokens_per_s']:8.1f} out tok/s  "
              f"{r['total_tokens_per_s']:8.1f} total tok/s  {100 * r['share_of_matmul_peak']:5.1f}% of matmul peak",
              flush=True)
    if "rayinfer" in results:
        for name, r in results.items():
            if name != "rayinfer":
                ratio = results["rayinfer"]["output_tokens_per_s"] / r["output_tokens_per_s"]
                print(f"rayinfer vs {name}: {ratio:.2f}x output tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": {"num_prompts": args.num_prompts, "prompt_tokens": workload.prompt_tokens,
                                    "output_tokens": workload.output_tokens, "flops": flops},
                       "matmul_peak_flops": peak, "threads": torch.get_num_threads(), "device": device_name,
                       "dtype": args.dtype, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
