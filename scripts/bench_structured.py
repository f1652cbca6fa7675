#!/usr/bin/env python3
"""Structured outputs: output tokens/s under a JSON schema against the same requests unconstrained, the grammar
mask's time per step, and compile time per schema, cold and cached.

Fair comparison: each round first runs the batch constrained (temperature 1, one seed per request) and records each
request's output length, then runs the same prompts unconstrained with `max_tokens` = that length and `ignore_eos`,
so both runs do the same forward work over the same shrinking batch; only the grammar (fill the bitmask, apply it,
advance the matchers) and what it changes in sampling differ. Rounds alternate (A B A B ...) and medians are kept,
so drift in a shared machine's speed hits both alike. A warm-up pair before the rounds compiles the grammar.

The mask's cost is timed in one more constrained run per batch size, with `GrammarMatchers.step_mask` (fill),
`sampler.apply_grammar` (apply) and `GrammarMatchers.accept` (accept) wrapped in timers (synchronised on a GPU),
so the throughput rounds run unwrapped. Compile times use a fresh `GrammarCompiler` per repeat (its construction
is the one-off TokenizerInfo build) and compile each schema on it twice: cold, then from its cache.

    python scripts/bench_structured.py [--model DIR] [--dtype auto] [--batch-sizes 1,64] [--max-tokens 256]
        [--repeats 5] [--compile-repeats 5] [--json FILE]

Without --model it runs the built-in demo model (`rayinfer-demo`). Runs in-process (no Ray), on a GPU when there is one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# A record a service might ask a model to fill: typed fields, an enum, a bounded array, a nested object. Strings
# are length-bounded so a model at temperature 1 ends them (an unbounded string rarely closes).
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999999},
        "name": {"type": "string", "minLength": 1, "maxLength": 32},
        "status": {"enum": ["active", "inactive", "pending", "archived"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "verified": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 16},
                 "minItems": 1, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string", "maxLength": 40}, "city": {"type": "string", "maxLength": 24},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
        },
        "summary": {"type": "string", "minLength": 8, "maxLength": 96},
    },
    "required": ["id", "name", "status", "score", "verified", "tags", "address", "summary"],
}

_FIELD_TYPES: list[dict[str, Any]] = [
    {"type": "string", "maxLength": 16}, {"type": "integer", "minimum": 0, "maximum": 1000}, {"type": "number"},
    {"type": "boolean"}, {"enum": ["a", "b", "c"]},
]
COMPILE_SCHEMAS: dict[str, dict[str, Any]] = {
    "small object (2 fields)": {"type": "object", "required": ["name", "age"],
                                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}},
    "bench schema (8 fields, nested)": BENCH_SCHEMA,
    "30-field object": {"type": "object", "properties": {f"field_{i:02d}": _FIELD_TYPES[i % 5] for i in range(30)},
                        "required": [f"field_{i:02d}" for i in range(30)]},
    "anyOf array (4 branches)": {
        "type": "array", "minItems": 1, "maxItems": 8,
        "items": {"anyOf": [
            {"type": "object", "required": ["kind", "x", "y"],
             "properties": {"kind": {"const": "point"}, "x": {"type": "number"}, "y": {"type": "number"}}},
            {"type": "object", "properties": {"kind": {"const": "label"}, "text": {"type": "string", "maxLength": 20}},
             "required": ["kind", "text"]},
            {"type": "string", "maxLength": 12},
            {"type": "null"},
        ]},
    },
}

PROMPTS = [
    "Describe the user account as a JSON record:",
    "Here is the customer profile, in JSON:",
    "The following record describes one library patron.",
    "Return the result of the lookup as an object.",
    "Summarise the file's owner as structured data:",
    "A JSON document for the new member:",
    "Fill in the form for this address:",
    "def to_record(self):\n    \"\"\"Return the user as a dict.\"\"\"\n",
]


class MaskTimers:
    """Wall time of the grammar's three per-step phases, wrapped around the engine's functions in this process."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync  # on a GPU, time the work and not just its launch
        self.seconds = {"fill": 0.0, "apply": 0.0, "accept": 0.0}
        self.calls = {"fill": 0, "apply": 0, "accept": 0}
        self.rows = 0  # constrained steps' batch rows, summed
        self._restore: list[Callable[[], None]] = []

    def install(self) -> None:
        from rayinfer.workers import grammar_matchers, sampler

        matchers = grammar_matchers.GrammarMatchers
        self._wrap(matchers, "step_mask", "fill", counts=lambda args, out: out is not None)
        self._wrap(matchers, "accept", "accept", counts=lambda args, out: True)
        self._wrap(sampler, "apply_grammar", "apply", counts=lambda args, out: True)

    def uninstall(self) -> None:
        while self._restore:
            self._restore.pop()()

    def _wrap(self, owner: Any, name: str, phase: str, counts: Callable[[tuple, Any], bool]) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            if self.sync:
                torch.cuda.synchronize()
            if counts(args, out):  # a step_mask that found no constrained row did no grammar work
                self.seconds[phase] += time.perf_counter() - start
                self.calls[phase] += 1
                if phase == "fill":
                    self.rows += len(args[1])
            return out

        setattr(owner, name, timed)
        self._restore.append(lambda: setattr(owner, name, original))


def make_params(batch: int, max_tokens: int | list[int], constrained: bool) -> list[Any]:
    from rayinfer.cluster import SamplingParams, StructuredOutputsParams

    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * batch
    if constrained:
        structured = StructuredOutputsParams(json=BENCH_SCHEMA)
        return [SamplingParams(temperature=1.0, seed=i, max_tokens=lengths[i], structured_outputs=structured)
                for i in range(batch)]
    # Unconstrained: as many tokens as the constrained request drew, never ending early on EOS.
    return [SamplingParams(temperature=1.0, seed=i, max_tokens=max(1, lengths[i]), ignore_eos=True)
            for i in range(batch)]


def timed_generate(llm: Any, prompts: list[str], params: list[Any]) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, [out.outputs[0] for out in outputs]


def bench_batch(llm: Any, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    # Warm-up pair: compiles the grammar, sizes buffers for this batch.
    timed_generate(llm, prompts, make_params(batch, 8, True))
    timed_generate(llm, prompts, make_params(batch, 8, False))
    rates: dict[str, list[float]] = {"constrained": [], "unconstrained": []}
    completions: list[Any] = []
    for _ in range(args.repeats):
        elapsed, completions = timed_generate(llm, prompts, make_params(batch, args.max_tokens, True))
        lengths = [len(c.token_ids) for c in completions]
        rates["constrained"].append(sum(lengths) / elapsed)
        elapsed, plain = timed_generate(llm, prompts, make_params(batch, lengths, False))
        if [len(c.token_ids) for c in plain] != lengths:
            print("warning: unconstrained lengths differ from the constrained ones", file=sys.stderr)
        rates["unconstrained"].append(sum(len(c.token_ids) for c in plain) / elapsed)

    # One more constrained run, with the timers: seeded draws repeat, so it takes the rounds' steps.
    timers = MaskTimers(sync=torch.cuda.is_available())
    timers.install()
    try:
        _, timed_completions = timed_generate(llm, prompts, make_params(batch, args.max_tokens, True))
    finally:
        timers.uninstall()
    lengths = [len(c.token_ids) for c in completions]
    if [len(c.token_ids) for c in timed_completions] != lengths:
        print("warning: the timed constrained run drew other lengths than the rounds", file=sys.stderr)
    steps = timers.calls["fill"]  # step_mask returns a mask once per step while any constrained row samples
    valid = 0
    for c in completions:
        try:
            valid += c.finish_reason == "stop" and isinstance(json.loads(c.text), dict)
        except json.JSONDecodeError:
            pass
    constrained, unconstrained = statistics.median(rates["constrained"]), statistics.median(rates["unconstrained"])
    per_step = {phase: 1e3 * timers.seconds[phase] / max(1, timers.calls[phase]) for phase in timers.seconds}
    row = {
        "batch": batch,
        "mean_output_tokens": sum(lengths) / batch,
        "valid_json": valid,
        "steps": steps,
        "constrained_tok_s": constrained,
        "unconstrained_tok_s": unconstrained,
        "ratio": constrained / unconstrained,
        # Each round's constrained run against its own unconstrained one: drift between rounds cancels.
        "paired_ratio": statistics.median(c / u for c, u in zip(rates["constrained"], rates["unconstrained"])),
        "rounds_constrained_tok_s": rates["constrained"],
        "rounds_unconstrained_tok_s": rates["unconstrained"],
        "constrained_step_ms": 1e3 * sum(lengths) / constrained / max(1, steps),
        "unconstrained_step_ms": 1e3 * sum(lengths) / unconstrained / max(1, steps),
        "mask_mean_rows": timers.rows / max(1, timers.calls["fill"]),
        "fill_ms": per_step["fill"],
        "apply_ms": per_step["apply"],
        "accept_ms": per_step["accept"],
    }
    row["mask_total_ms"] = row["fill_ms"] + row["apply_ms"] + row["accept_ms"]
    # The ratio if the grammar's three phases were all the two runs differ in: steadier than the timed ratio on a
    # noisy machine, since it adds a small timed cost to the unconstrained step instead of dividing two noisy rates.
    plain_ms = row["unconstrained_step_ms"]
    row["ratio_from_mask_time"] = plain_ms / (plain_ms + row["mask_total_ms"])
    print(f"batch {batch}: constrained {constrained:.1f} tok/s, unconstrained {unconstrained:.1f} tok/s "
          f"({100 * row['ratio']:.1f}%; median of round ratios {100 * row['paired_ratio']:.1f}%), "
          f"mask {row['mask_total_ms']:.3f} ms/step", flush=True)
    return row


def bench_compile(llm: Any, repeats: int) -> dict[str, Any]:
    from rayinfer.workers.grammar import GrammarCompiler, GrammarSpec

    engine = llm.engine
    tokenizer, vocab_size, stops = engine.tokenizer, engine.model_spec.vocab_size, engine.eos_token_ids
    build_ms: list[float] = []
    cold: dict[str, list[float]] = {name: [] for name in COMPILE_SCHEMAS}
    cached: dict[str, list[float]] = {name: [] for name in COMPILE_SCHEMAS}
    for _ in range(repeats):
        start = time.perf_counter()
        compiler = GrammarCompiler(tokenizer, vocab_size, stops)
        build_ms.append(1e3 * (time.perf_counter() - start))
        for name, schema in COMPILE_SCHEMAS.items():
            spec = GrammarSpec.json_schema(schema)
            for times in (cold[name], cached[name]):  # first compile on this compiler, then its cache
                start = time.perf_counter()
                compiler.compile(spec)
                times.append(1e3 * (time.perf_counter() - start))
    return {
        "vocab_size": vocab_size,
        "tokenizer_info_ms": statistics.median(build_ms),
        "schemas": {name: {"cold_ms": statistics.median(cold[name]), "cached_ms": statistics.median(cached[name]),
                           "schema_chars": len(json.dumps(COMPILE_SCHEMAS[name]))} for name in COMPILE_SCHEMAS},
    }


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def print_markdown(result: dict[str, Any]) -> None:
    print("\n| batch | mean output tokens | valid JSON | constrained tok/s | unconstrained tok/s | ratio of medians "
          "| median of round ratios | ratio from mask time | step ms constrained / unconstrained "
          "| mask fill ms/step | apply ms/step | accept ms/step | mask total ms/step |")
    print("|" + " --- |" * 13)
    for r in result["throughput"]:
        print(f"| {r['batch']} | {r['mean_output_tokens']:.1f} | {r['valid_json']}/{r['batch']} | "
              f"{r['constrained_tok_s']:.1f} | {r['unconstrained_tok_s']:.1f} | {100 * r['ratio']:.1f}% | "
              f"{100 * r['paired_ratio']:.1f}% | {100 * r['ratio_from_mask_time']:.1f}% | "
              f"{r['constrained_step_ms']:.2f} / {r['unconstrained_step_ms']:.2f} | {r['fill_ms']:.3f} | "
              f"{r['apply_ms']:.3f} | {r['accept_ms']:.3f} | {r['mask_total_ms']:.3f} |")
    comp = result["compile"]
    print(f"\nCompile (vocabulary {comp['vocab_size']}; TokenizerInfo build, once per compiler: "
          f"{comp['tokenizer_info_ms']:.1f} ms)\n")
    print("| schema | schema chars | cold ms | cached ms |")
    print("| --- | --- | --- | --- |")
    for name, c in comp["schemas"].items():
        print(f"| {name} | {c['schema_chars']} | {c['cold_ms']:.2f} | {c['cached_ms']:.4f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the built-in rayinfer-demo)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--max-tokens", type=int, default=256, help="cap on each constrained output")
    parser.add_argument("--repeats", type=int, default=5, help="constrained/unconstrained rounds per batch size")
    parser.add_argument("--compile-repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    import xgrammar  # noqa: F401 - fail here, not mid-run, when the structured-output extra is missing
    from importlib.metadata import version

    from rayinfer.cluster import LLM

    batches = [int(b) for b in args.batch_sizes.split(",")]
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(batches), distributed_executor_backend="uni")
    where = machine()
    load = os.getloadavg()
    dtype = str(llm.engine.executor.worker.dtype).removeprefix("torch.")  # what "auto" resolved to
    print(f"# {where}; model {args.model or 'rayinfer-demo'} ({dtype}); xgrammar {version('xgrammar')}, "
          f"torch {torch.__version__}; load average {load[0]:.2f} at start", flush=True)
    result: dict[str, Any] = {"device": where, "model": args.model or "rayinfer-demo", "dtype": dtype,
                              "max_tokens": args.max_tokens, "repeats": args.repeats, "schema": BENCH_SCHEMA,
                              "xgrammar": version("xgrammar"), "torch": torch.__version__, "load_start": load[0]}
    result["throughput"] = [bench_batch(llm, batch, args) for batch in batches]
    result["compile"] = bench_compile(llm, args.compile_repeats)
    result["load_end"] = os.getloadavg()[0]
    llm.shutdown()
    print_markdown(result)
    print(f"\nload average {result['load_end']:.2f} at end")
    print(json.dumps(result, separators=(",", ":")))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
