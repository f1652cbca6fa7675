#!/usr/bin/env python3
"""Per-step cost of the Ray executor against the in-process one: steady decode of 32 sequences, tiny model.

Both engines run the same requests, side by side, in alternating rounds (a run of in-process steps, then a run
of Ray steps, and again) so that drift in the machine's speed hits both alike; steps are never interleaved one
by one, since the Ray worker computes in the background and would slow the in-process step beside it. The
difference of their median step times is what the Ray path adds (serialising the step plan, the compiled-graph
round trip, collecting the tokens), net of what its pipelining hides (the next step is planned while the
worker computes the current one).

    python scripts/bench_step_overhead.py [--model DIR] [--seqs 32] [--steps 200] [--tp 1] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from rayinfer.cluster import LLM, SamplingParams


def start_decoding(llm: LLM, num_seqs: int, num_steps: int) -> None:
    """Adds the requests and runs until every sequence decodes, plus a warm-up."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=num_steps + 64, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request(f"bench-{i}", None, params, prompt_token_ids=[7 + i % 50] * 8)
    while any(seq.num_uncomputed_tokens > 1 for seq in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(10):
        engine.step()


def timed_step(llm: LLM) -> float:
    start = time.perf_counter()
    llm.engine.step()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the built-in tiny model)")
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of the Ray engine")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    import ray
    import torch

    # Ray gives its one-CPU worker one intra-op thread; the in-process engine gets the same, so the two differ
    # only by the executor.
    torch.set_num_threads(1)
    ray.init(num_cpus=max(2, args.tp + 1), include_dashboard=False, log_to_driver=False)
    engines = {
        "in-process": LLM(args.model, max_num_seqs=args.seqs),
        "ray": LLM(
            args.model, max_num_seqs=args.seqs, distributed_executor_backend="ray", tensor_parallel_size=args.tp
        ),
    }
    for llm in engines.values():
        start_decoding(llm, args.seqs, args.steps)
    times: dict[str, list[float]] = {name: [] for name in engines}
    rounds = 5
    for _ in range(rounds):
        for name, llm in engines.items():
            times[name] += [timed_step(llm) for _ in range(args.steps // rounds)]
    for llm in engines.values():
        llm.shutdown()
    results = {
        name: {"mean_ms": 1e3 * statistics.mean(t), "median_ms": 1e3 * statistics.median(t)} for name, t in times.items()
    }
    overhead = results["ray"]["median_ms"] - results["in-process"]["median_ms"]
    for name, r in results.items():
        print(f"{name:>11}: mean {r['mean_ms']:.3f} ms/step, median {r['median_ms']:.3f} ms/step")
    print(f"Ray overhead (tp={args.tp}, {args.seqs} decoding sequences): {overhead:.3f} ms/step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**results, "overhead_ms": overhead, "seqs": args.seqs, "tp": args.tp}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
