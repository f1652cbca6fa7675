"""Pipeline stages as separate processes, without Ray: the same tokens as one process, and what a stage hand-off costs.

    python3 scripts/pp_stage_check.py --device cuda --pp 2 --size llama-56m --partition 5,3 --json out.json
    .venv/bin/python scripts/pp_stage_check.py --device cpu --size tiny --layers 3 --decode-steps 4

Spawns `--pp` processes (torch.multiprocessing, one per stage, tensor parallel size 1), each building the `Worker`
for its stage exactly as the Ray executor does (`pipeline_stage_for(rank, pp, ...)`, `init_distributed`,
`load_model`, `init_cache`) and taking its steps through `Worker.run_step`, so the hidden states and residuals
cross between processes over `StageLink` (NCCL on CUDA, gloo on CPU). On CUDA every stage shares the one GPU:
enough to prove the path, not to show cross-GPU speed. NCCL before 2.30 refuses two ranks on one GPU ("Duplicate
GPU detected"); from 2.30 NCCL_MULTI_RANK_GPU_ENABLE=1, which this script sets, allows it.

Every process builds the same plans itself (a prefill of all prompts, then greedy decode steps), as the engine
under pipeline parallelism sends plans with explicit token ids: after each step the last stage broadcasts the
tokens it drew, and every rank writes them into its next plan. The tokens must equal a PP=1 run of the same plans
in this (the parent) process; the exit status is 1 when they do not.

The transfer cost, per step: stage 0's `StageLink.send` timed inside the real steps (the next stage is already
waiting in its receive, so this is the hand-off itself, its concatenation included), and the same [tokens,
2 x hidden] tensor sent alone between ranks 0 and 1 (median of ping-pongs, halved). Printed as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

BLOCK_SIZE = 16
P2P_REPEATS = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pp", type=int, default=2, help="pipeline stages, one process each")
    p.add_argument("--size", default="tiny", help="a tiny_checkpoint size preset (tiny, small, llama-56m)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's num_hidden_layers")
    p.add_argument("--partition", default=None, help="layers per stage, e.g. 5,3 (default: the engine's split)")
    p.add_argument("--model", default=None, help="an existing checkpoint folder instead of building a tiny one")
    p.add_argument("--dtype", default="auto", help="EngineConfig dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=24, help="the first prompt's length; each next one is 3 longer")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--p2p-tokens", default="", help="extra token counts to time the bare hand-off at, e.g. 512,2048")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the stage processes")
    p.add_argument("--json", default=None, help="write the result here too")
    args = p.parse_args(argv)
    args.partition = [int(n) for n in args.partition.split(",")] if args.partition else None
    args.p2p_tokens = [int(n) for n in args.p2p_tokens.split(",") if n]
    return args


# ------------------------------------------------------------ plans (built alike by every process)
def make_prompts(args: argparse.Namespace, vocab_size: int) -> dict[int, list[int]]:
    rng = random.Random(0)
    return {s: [rng.randrange(3, vocab_size) for _ in range(args.prompt_len + 3 * s)] for s in range(args.seqs)}


def blocks_needed(args: argparse.Namespace) -> int:
    longest = args.prompt_len + 3 * (args.seqs - 1) + args.decode_steps
    return args.seqs * -(-longest // BLOCK_SIZE)


def step_plans(prompts: dict[int, list[int]], decode_steps: int):  # noqa: ANN201 - a generator of StepPlan
    """Yields the prefill plan, then one decode plan per step; `send()` it the step's tokens (seq order) to get
    the next. Blocks are numbered per sequence in order of need, as the engine would hand them out."""
    from rayinfer.workers.sampling_options import SamplingOptions
    from rayinfer.workers.step_plan import NewSequence, SampleRequest, SequenceChunk, StepPlan

    next_block = 0

    def take(count: int) -> list[int]:
        nonlocal next_block
        next_block += count
        return list(range(next_block - count, next_block))

    greedy = {s: SampleRequest(SamplingOptions(), seed=0, prompt_token_ids=list(p), output_token_ids=[],
                               stop_ids_for_min_tokens=[]) for s, p in prompts.items()}
    tokens = yield StepPlan(
        chunks=[SequenceChunk(s, list(p), 0, take(-(-len(p) // BLOCK_SIZE)), reset_blocks=True, sample=True)
                for s, p in prompts.items()],
        new_sequences=[NewSequence(s, len(p), greedy[s]) for s, p in prompts.items()],
    )
    for step in range(decode_steps):
        chunks = []
        for (s, p), token in zip(prompts.items(), tokens, strict=True):
            position = len(p) + step
            chunks.append(SequenceChunk(s, [token], position, take(1) if position % BLOCK_SIZE == 0 else [],
                                        reset_blocks=False, sample=True))
        tokens = yield StepPlan(chunks=chunks)
    yield StepPlan(chunks=[], finished_seq_ids=list(prompts))


def drive(worker, prompts: dict[int, list[int]], decode_steps: int, exchange) -> list[list[int]]:  # noqa: ANN001
    """Runs every plan through `worker.run_step`; `exchange(output, count)` gives every rank the step's tokens."""
    plans = step_plans(prompts, decode_steps)
    plan, drawn = next(plans), []
    while plan.chunks:
        tokens = exchange(worker.run_step(plan), plan.num_samples)
        drawn.append(tokens)
        plan = plans.send(tokens)
    worker.run_step(plan)  # the finishing plan: every stage drops its sequences
    return drawn


def make_worker(args: argparse.Namespace, model_dir: Path, rank: int, world: int):  # noqa: ANN201 - a Worker
    from rayinfer.configs import EngineConfig
    from rayinfer.workers.model_config import load_model_spec
    from rayinfer.workers.parallel_state import pipeline_stage_for
    from rayinfer.workers.worker import Worker

    spec = load_model_spec(model_dir)
    config = EngineConfig(model=str(model_dir), dtype=args.dtype, device=args.device, block_size=BLOCK_SIZE,
                          pipeline_parallel_size=world, pipeline_layer_partition=args.partition if world > 1 else None,
                          enforce_eager=True)  # the stages run eagerly: so must the one-process reference
    prompt_tokens = sum(args.prompt_len + 3 * s for s in range(args.seqs))
    max_model_len = args.prompt_len + 3 * args.seqs + args.decode_steps + 1
    stage = pipeline_stage_for(rank, world, spec.num_layers, args.partition) if world > 1 else None
    return Worker(config, spec, max_model_len, prompt_tokens, rank=rank, world_size=world,
                  claim_cpu_cores=world > 1, stage=stage)


# ------------------------------------------------------------ one stage's process
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_send(worker, records: list[tuple[int, float]]) -> None:  # noqa: ANN001
    """Wraps this rank's StageLink.send: each step's rows and the milliseconds until the state has left (on CUDA
    the NCCL send completes, so the wait covers the copy into the next stage's buffer)."""
    link, send = worker.stage_link, worker.stage_link.send

    def timed(state) -> None:  # noqa: ANN001 - IntermediateState | None
        if state is None:
            return send(state)
        _sync(worker.device)
        started = time.perf_counter()
        send(state)
        _sync(worker.device)
        records.append((state.hidden.shape[0], (time.perf_counter() - started) * 1e3))
        return None

    link.send = timed


def _bare_p2p_ms(worker, tokens: int) -> float | None:  # noqa: ANN001
    """One-way milliseconds for a [tokens, 2 x hidden] tensor between ranks 0 and 1, sent on its own."""
    if worker.rank > 1:
        return None
    x = torch.zeros(tokens, 2 * worker.spec.hidden_size, dtype=worker.dtype, device=worker.device)
    peer = 1 - worker.rank
    times = []
    for i in range(P2P_REPEATS + 3):  # the first few warm the connection's buffers for this size
        _sync(worker.device)
        started = time.perf_counter()
        if worker.rank == 0:
            dist.send(x, peer)
            dist.recv(x, peer)
        else:
            dist.recv(x, peer)
            dist.send(x, peer)
        _sync(worker.device)
        if i >= 3:
            times.append((time.perf_counter() - started) * 1e3 / 2)
    return statistics.median(times)


def stage_main(rank: int, args: argparse.Namespace, model_dir: str, host: str, port: int,
               results) -> None:  # noqa: ANN001 - a multiprocessing Queue
    try:
        worker = make_worker(args, Path(model_dir), rank, args.pp)
        if worker.device.type == "cuda" and worker.device.index is None:
            # Worker.init_distributed calls torch.cuda.set_device(self.device), which refuses a device without an
            # index, and device="cuda" resolves to one: name the GPU every stage shares.
            worker.device = torch.device("cuda", torch.cuda.current_device())
        worker.init_distributed(host, port)
        worker.load_model()
        worker.init_cache(blocks_needed(args))
        device, last = worker.device, args.pp - 1
        # Warm every connection the steps use (NCCL makes a communicator on first use): not a step's cost.
        ping = torch.zeros(1, 2 * worker.spec.hidden_size, dtype=worker.dtype, device=device)
        if not worker.stage.is_first:
            dist.recv(ping, worker.rank - 1)
        if not worker.stage.is_last:
            dist.send(ping, worker.rank + 1)
        dist.all_reduce(torch.zeros(1, device=device))
        sends: list[tuple[int, float]] = []
        if not worker.stage.is_last:
            _time_send(worker, sends)

        def exchange(output, count: int) -> list[int]:  # noqa: ANN001 - StepOutput | None
            tokens = torch.zeros(count, dtype=torch.int64, device=device)
            if rank == last:
                tokens.copy_(torch.tensor(output.token_ids, dtype=torch.int64))
            dist.broadcast(tokens, src=last)
            return tokens.tolist()

        prompts = make_prompts(args, worker.spec.vocab_size)
        drawn = drive(worker, prompts, args.decode_steps, exchange)
        left = worker.num_sequences()
        step_tokens = [sum(len(p) for p in prompts.values()), args.seqs]
        p2p = {t: _bare_p2p_ms(worker, t) for t in dict.fromkeys(step_tokens + args.p2p_tokens)}
        dist.all_reduce(torch.zeros(1, device=device))  # every rank done before any tears the group down
        results.put({"rank": rank, "stage": [worker.stage.first_layer, worker.stage.end_layer], "tokens": drawn,
                     "sequences_left": left, "sends": sends, "p2p": p2p,
                     "dtype": str(worker.dtype).removeprefix("torch.")})
        worker.shutdown()
    except BaseException:  # the parent reports it and stops the other stages, which would wait on this one
        results.put({"rank": rank, "error": traceback.format_exc()})
        raise


# ------------------------------------------------------------ the parent
def run_reference(args: argparse.Namespace, model_dir: Path) -> list[list[int]]:
    worker = make_worker(args, model_dir, 0, 1)
    worker.init_distributed("", 0)
    worker.load_model()
    worker.init_cache(blocks_needed(args))
    prompts = make_prompts(args, worker.spec.vocab_size)
    return drive(worker, prompts, args.decode_steps, lambda output, count: output.token_ids)


def run_stages(args: argparse.Namespace, model_dir: Path) -> list[dict]:
    from rayinfer.workers.worker import pick_rendezvous_address

    if args.device == "cuda":
        os.environ.setdefault("NCCL_MULTI_RANK_GPU_ENABLE", "1")  # the stages share one GPU (NCCL >= 2.30)
    ctx = torch.multiprocessing.get_context("spawn")  # a forked child cannot use CUDA
    results = ctx.Queue()
    host, port = pick_rendezvous_address()
    procs = [ctx.Process(target=stage_main, args=(r, args, str(model_dir), host, port, results), daemon=True)
             for r in range(args.pp)]
    for proc in procs:
        proc.start()
    got, deadline = {}, time.monotonic() + args.timeout
    try:
        while len(got) < args.pp:
            try:
                result = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    why = f"exit code {dead[0].exitcode}" if dead else f"no answer within {args.timeout:.0f} s"
                    raise RuntimeError(f"a stage process failed: {why}") from None
                continue
            if "error" in result:
                raise RuntimeError(f"stage process rank {result['rank']} failed:\n{result['error']}")
            got[result["rank"]] = result
        for proc in procs:
            proc.join(timeout=30)
    finally:
        for proc in procs:  # only on failure are any still running: a stage blocked on a peer that died
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [got[r] for r in range(args.pp)]


def summarise(args: argparse.Namespace, model_dir: Path, reference: list[list[int]], stages: list[dict]) -> dict:
    from rayinfer.workers.model_config import load_model_spec

    spec = load_model_spec(model_dir)
    last = stages[-1]
    itemsize = torch.empty(0, dtype=getattr(torch, last["dtype"])).element_size()
    prefill_tokens = sum(args.prompt_len + 3 * s for s in range(args.seqs))
    sends = stages[0]["sends"]
    rows = []
    for label, tokens, timed in (("prefill", prefill_tokens, sends[:1]),
                                 (f"decode (median of {len(sends) - 1})", args.seqs, sends[1:])):
        rows.append({"step": label, "tokens": tokens, "bytes": tokens * 2 * spec.hidden_size * itemsize,
                     "send_in_step_ms": statistics.median(ms for _, ms in timed) if timed else None,
                     "p2p_one_way_ms": stages[0]["p2p"][tokens]})
    for tokens in args.p2p_tokens:
        if tokens not in (prefill_tokens, args.seqs):
            rows.append({"step": "bare send", "tokens": tokens, "bytes": tokens * 2 * spec.hidden_size * itemsize,
                         "send_in_step_ms": None, "p2p_one_way_ms": stages[0]["p2p"][tokens]})
    nccl = None
    if args.device == "cuda":
        version = torch.cuda.nccl.version()  # a tuple; an int in older torch
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return {
        "device": args.device, "backend": "nccl" if args.device == "cuda" else "gloo", "nccl": nccl,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "pp": args.pp,
        "stages": [s["stage"] for s in stages], "hidden_size": spec.hidden_size, "dtype": last["dtype"],
        "seqs": args.seqs, "decode_steps": args.decode_steps,
        "tokens_match": all(s["tokens"] == reference for s in stages),
        "sequences_left": [s["sequences_left"] for s in stages],
        "reference_tokens": reference, "stage_tokens": last["tokens"], "rows": rows,
    }


def print_report(summary: dict) -> None:
    ok = summary["tokens_match"]
    where = f"{summary['device']}/{summary['backend']}"
    where += f" {summary['nccl']}, {summary['gpu']}" if summary["nccl"] else ""
    print(f"pipeline stages {summary['stages']} as {summary['pp']} processes on {where}, {summary['dtype']}")
    print(f"tokens check: {'PASS' if ok else 'FAIL'} ({summary['seqs']} sequences x "
          f"{summary['decode_steps'] + 1} steps against one process with every layer)")
    if not ok:
        print(f"  one process: {summary['reference_tokens']}\n  stages:      {summary['stage_tokens']}")
    print(f"\n| step | tokens | bytes (hidden + residual, {summary['dtype']}) | StageLink.send in the step (ms) "
          "| bare send, one way (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for row in summary["rows"]:
        in_step = "-" if row["send_in_step_ms"] is None else f"{row['send_in_step_ms']:.3f}"
        print(f"| {row['step']} | {row['tokens']} | {row['bytes']:,} | {in_step} | {row['p2p_one_way_ms']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rayinfer.workers.model_config import check_pipeline_parallel, load_model_spec
    from rayinfer.workers.tiny_checkpoint import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
            model_dir = build_tiny_checkpoint(Path(tmp) / "model", size=args.size, **overrides)
        check_pipeline_parallel(load_model_spec(model_dir), args.pp, args.partition)
        started = time.perf_counter()
        reference = run_reference(args, model_dir)  # first: on CUDA it also fills the Triton cache the stages read
        stages = run_stages(args, model_dir)
        summary = summarise(args, model_dir, reference, stages)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print_report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if summary["tokens_match"] and not any(summary["sequences_left"]) else 1


if __name__ == "__main__":
    sys.exit(main())
