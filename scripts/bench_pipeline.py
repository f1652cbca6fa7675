"""Pipeline parallelism on CPU workers: each stage's bubble in steady decode, and PP=2 against PP=1 on the same
cores.

    .venv/bin/python scripts/bench_pipeline.py [--size llama-56m] [--seqs 16] [--tokens 64]

Both runs use Ray workers on this machine's cores: PP=1 is one worker with all of them, PP=2 two workers (one
stage each) with half each, so the comparison is at equal compute. Each stage's bubble is the share of the
decode span it spent not computing (waiting for its plan or for the previous stage's hidden states), read from
the workers' own step timings (`Worker.stage_timings`) after the prompts are in. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

PROMPT = "The default value of the argument"


def _run(model_dir: Path, pp: int, seqs: int, tokens: int, partition: list[int] | None = None) -> dict[str, object]:
    from rayinfer.cluster import LLM, SamplingParams

    llm = LLM(str(model_dir), pipeline_parallel_size=pp, distributed_executor_backend="ray", dtype="float32",
              max_num_seqs=seqs, pipeline_layer_partition=partition)
    try:
        engine = llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        for i in range(seqs):
            engine.add_request(f"warm{i}", PROMPT, SamplingParams(max_tokens=2, temperature=0.0))
        while engine.has_unfinished_requests():
            engine.step()
        for i in range(seqs):
            engine.add_request(str(i), PROMPT, params)
        while any(r.seqs[0].num_computed_tokens < len(r.prompt_token_ids) for r in engine.requests.values()):
            engine.step()  # the prompts: decode is what is measured
        if pp > 1:
            engine.executor.call_workers("reset_stage_timings")
        started = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        elapsed = time.perf_counter() - started
        timings = engine.executor.call_workers("stage_timings") if pp > 1 else []
        return {"tok_s": seqs * (tokens - 1) / elapsed, "elapsed": elapsed,
                "bubbles": [1 - busy / span for busy, span, _ in timings if span > 0],
                "steps": [steps for _, _, steps in timings]}
    finally:
        llm.shutdown()


def main(argv: list[str] | None = None) -> None:
    import ray

    from rayinfer.workers.tiny_checkpoint import build_tiny_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="llama-56m", help="a tiny_checkpoint size preset")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--partitions", default="5,3", help="PP=2 layer splits to run besides the even one, "
                   "semicolon-separated (the last stage also runs the LM head and the sampler)")
    args = p.parse_args(argv)
    splits = [None] + [[int(n) for n in part.split(",")] for part in args.partitions.split(";") if part]
    ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_checkpoint(Path(tmp) / "model", size=args.size)
        rows = [("1", _run(model_dir, 1, args.seqs, args.tokens))]
        rows += [(f"2 ({'even' if split is None else '+'.join(map(str, split))})",
                  _run(model_dir, 2, args.seqs, args.tokens, split)) for split in splits]
    print(f"| pipeline_parallel_size (layers per stage) | decode tok/s ({args.seqs} sequences x {args.tokens - 1} tokens) | "
          "bubble per stage (steady decode) | steps per stage |")
    print("| --- | --- | --- | --- |")
    for pp, row in rows:
        bubbles = ", ".join(f"{b:.1%}" for b in row["bubbles"]) or "-"
        steps = ", ".join(str(s) for s in row["steps"]) or "-"
        print(f"| {pp} | {row['tok_s']:.1f} | {bubbles} | {steps} |", flush=True)


if __name__ == "__main__":
    main()
