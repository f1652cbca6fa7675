#!/usr/bin/env python3
"""Where a decode step's time goes: the model (the worker's execute) against the engine's own bookkeeping.

Runs N sequences (default 64) to steady decode on the in-process engine, then times S steps: the whole
`Engine.step()` and, inside it, the worker's `execute` (forward + sampling) and the part of that spent building
the step's input tensors. Engine bookkeeping (scheduling, block tables, the step plan, appending tokens,
detokenizing, stop checks, building outputs) plus the input building is reported as a share of the step. With --cprofile, the bookkeeping's top functions are listed too (the
worker's execute is stubbed out of that profile by timing it separately).

    python scripts/profile_step.py [--model DIR | --size llama-56m] [--seqs 64] [--steps 100] [--cprofile]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.engine import Engine
from rayinfer.scheduler.sampling_params import SamplingParams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a random one of --size)")
    parser.add_argument("--size", default="llama-56m")
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--cprofile", action="store_true", help="also profile the bookkeeping")
    args = parser.parse_args()

    model = args.model
    if model is None:
        from rayinfer.workers.tiny_checkpoint import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="profile-step-")), size=args.size))
    engine = Engine(EngineConfig(model=model, dtype="float32", max_num_seqs=args.seqs))
    worker = engine.executor.worker
    execute = worker.execute
    execute_times: list[float] = []

    def timed_execute(plan):
        start = time.perf_counter()
        result = execute(plan)
        execute_times.append(time.perf_counter() - start)
        return result

    worker.execute = timed_execute
    prepare = worker.runner.prepare
    prepare_times: list[float] = []

    def timed_prepare(plan, sequences):
        start = time.perf_counter()
        result = prepare(plan, sequences)
        prepare_times.append(time.perf_counter() - start)
        return result

    worker.runner.prepare = timed_prepare
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.steps + 64, ignore_eos=True, seed=0)
    for i in range(args.seqs):
        engine.add_request(f"r{i}", None, params, prompt_token_ids=[10 + (i * 7 + j) % 500 for j in range(args.prompt_len)])
    while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
        engine.step()
    for _ in range(5):
        engine.step()
    execute_times.clear()
    prepare_times.clear()
    step_times = []
    profiler = cProfile.Profile() if args.cprofile else None
    for _ in range(args.steps):
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        engine.step()
        if profiler:
            profiler.disable()
        step_times.append(time.perf_counter() - start)
    step_ms = 1e3 * statistics.median(step_times)
    execute_ms = 1e3 * statistics.median(execute_times)
    bookkeeping = [s - e for s, e in zip(step_times, execute_times)]
    book_ms = 1e3 * statistics.median(bookkeeping)
    prepare_ms = 1e3 * statistics.median(prepare_times)
    print(f"{args.seqs} decoding sequences, {args.steps} steps: step {step_ms:.2f} ms (median), worker {execute_ms:.2f} ms "
          f"(of which building its input tensors {prepare_ms:.3f} ms), engine bookkeeping {book_ms:.3f} ms; "
          f"bookkeeping in all {100 * (book_ms + prepare_ms) / step_ms:.1f}% of the step")
    if profiler:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(20)
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
