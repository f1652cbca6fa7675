#!/usr/bin/env python
"""What the serving path costs: one streamed request over HTTP against the offline engine, same model and prompt.

Offline: the in-process engine (`LLM(model, dtype=...)`), driven by `engine.add_request` / `engine.step()`; each
token's time is when the step that made it returned. Serving: `rayinfer serve --ray-address local` started as a
subprocess (or `--base-url` of one already running), one `/v1/completions` request at a time with `stream: true`,
`ignore_eos: true`, temperature 0, read by a plain `http.client` connection; each token's time is when the network
read that brought its SSE event returned. `--offline-beside-server` also runs the offline engine while the server is up,
alternating one offline and one served request, so that both paths share the CPU with the same Ray and Serve
processes and see the same phases of a noisy machine (on a 2-core VM an idle Ray and Serve alone slowed the
offline engine's TTFT by 5-20 ms, and runs a minute apart differ by as much). Both run the same prompt (`--prompt-len` token ids, from fixed text) for
`--max-tokens` tokens, `--warmup` untimed then `--repeats` timed requests, one at a time on an idle engine.

TTFT is from sending (offline: `add_request`) to the first token; ITL is each later token's gap to the one before
(a read bringing k token events counts as k gaps of gap/k); TPOT is (last - first) / (tokens - 1) per request.
Reported: median and p90 of each, in ms, for both paths and their difference (serving - offline). `--json FILE`
writes them with every sample. The server started here is stopped (SIGTERM, then SIGKILL to its process group)
however the run ends; its log is kept in a temp file named on failure.

    .venv/bin/python scripts/bench_serving_path.py --repeats 20 --json /tmp/serving-path.json
    .venv/bin/rayinfer bench serving-path --model /tmp/llama56m --max-tokens 64

Without `--model` it builds the random llama-56m checkpoint in a temp folder (removed at the end). The client
shares the machine with the server: on a small or busy machine compare only runs made back to back.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import SSEParser, percentile  # noqa: E402  (the SSE parser of the serving benchmark)

SERVED_NAME = "bench-model"
_TEXT = ("The quick brown fox jumps over the lazy dog while the city sleeps and the river runs to the sea. "
         "Scientists at the national university later said that many of the first results were known before. ")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: build the random llama-56m in a temp folder)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens (EOS ignored)")
    parser.add_argument("--repeats", type=int, default=20, help="timed requests per path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per path first")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds idle between requests")
    parser.add_argument("--offline-executor", choices=("uni", "ray"), default="uni",
                        help="offline engine's executor: in-process (what LLM() uses) or Ray worker actors")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--offline-beside-server", action="store_true",
                        help="also run the offline engine while the server is up, one offline and one served "
                             "request in turn, reported as a second offline row")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--base-url", help="measure this running server (served model name from --served-name)")
    parser.add_argument("--served-name", default=SERVED_NAME)
    parser.add_argument("--port", type=int, default=0, help="port for the server started here (0: a free one)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `rayinfer serve` argument (repeat)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--json", help="write the results here")
    return parser


# ---------------------------------------------------------------------------------------------------- timing
def request_timing(start: float, arrivals: list[tuple[float, int]]) -> dict:
    """One request's TTFT, ITL samples and TPOT (seconds) from its start and (time, new tokens) arrivals."""
    tokens = sum(n for _, n in arrivals)
    if not arrivals:
        return {"ttft": None, "itl": [], "tpot": None, "tokens": 0}
    itl = []
    for (before, _), (now, n) in zip(arrivals, arrivals[1:]):
        itl += [(now - before) / n] * n
    first, last = arrivals[0][0], arrivals[-1][0]
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return {"ttft": first - start, "itl": itl, "tpot": tpot, "tokens": tokens}


def stream_token_counts(chunks: Iterable[tuple[float, bytes]]) -> list[tuple[float, int]]:
    """(arrival, token events) of each read that brought any, from an SSE stream's (time, bytes) reads. Each
    completion choice of an event is one token (rayinfer sends a delta per token); errors raise."""
    parser, arrivals = SSEParser(), []
    for now, chunk in chunks:
        count = 0
        for data in parser.feed(chunk):
            if data.strip() == "[DONE]":
                continue
            obj = json.loads(data)
            if obj.get("error"):
                raise RuntimeError(f"the server sent an error event: {obj['error']}")
            count += len(obj.get("choices") or [])
        if count:
            arrivals.append((now, count))
    return arrivals


def summary(timings: list[dict]) -> dict:
    ms = lambda values: [v * 1000.0 for v in values]  # noqa: E731
    ttft = ms(t["ttft"] for t in timings)
    itl = ms(v for t in timings for v in t["itl"])
    tpot = ms(t["tpot"] for t in timings if t["tpot"] is not None)

    def stats(v: list[float]) -> dict:
        return {"median": percentile(v, 50), "p90": percentile(v, 90), "mean": sum(v) / max(1, len(v))}

    return {"ttft_ms": stats(ttft), "itl_ms": stats(itl), "tpot_ms": stats(tpot),
            "tokens": [t["tokens"] for t in timings], "samples": {"ttft_ms": ttft, "itl_ms": itl, "tpot_ms": tpot}}


# ---------------------------------------------------------------------------------------------------- offline
@contextlib.contextmanager
def offline_engine(args: argparse.Namespace, model: str, prompt_ids: list[int]) -> Iterator:
    """The in-process engine, as a function that runs one request to its end and returns its timing."""
    from rayinfer.cluster.llm import LLM
    from rayinfer.scheduler.sampling_params import SamplingParams

    llm = LLM(model, dtype=args.dtype, distributed_executor_backend=args.offline_executor)
    engine, counter = llm.engine, iter(range(1 << 62))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    def run_one() -> dict:
        request_id, arrivals = f"offline-{next(counter)}", []
        start = time.perf_counter()
        engine.add_request(request_id, None, params, prompt_token_ids=prompt_ids)
        while engine.has_unfinished_requests():
            deltas = engine.step()  # each carries only the tokens its step added
            now = time.perf_counter()
            for delta in deltas:
                n = sum(len(completion.token_ids) for completion in delta.outputs)
                if delta.request_id == request_id and n:
                    arrivals.append((now, n))
        return request_timing(start, arrivals)

    try:
        yield run_one
    finally:
        llm.shutdown()
        if args.offline_executor == "ray":
            import ray

            ray.shutdown()


def timed_runs(args: argparse.Namespace, *paths) -> list[list[dict]]:
    """Each path's timings: `--warmup` untimed then `--repeats` timed rounds, in each round one request per path
    in turn (so that paths run side by side see the same phases of a noisy machine)."""
    timings: list[list[dict]] = [[] for _ in paths]
    for i in range(args.warmup + args.repeats):
        for path, kept in zip(paths, timings):
            time.sleep(args.pause)
            timing = path()
            if timing["tokens"] != args.max_tokens:
                print(f"warning: request {i} made {timing['tokens']} token events, not {args.max_tokens}",
                      file=sys.stderr)
            if i >= args.warmup:
                kept.append(timing)
    return timings


# ---------------------------------------------------------------------------------------------------- serving
def stream_once(host: str, port: int, body: dict) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=120)
    payload = json.dumps(body).encode()
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", body=payload, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")

        def reads() -> Iterator[tuple[float, bytes]]:
            while chunk := response.read1(65536):
                yield time.perf_counter(), chunk

        return request_timing(start, stream_token_counts(reads()))
    finally:
        conn.close()


def served_request(args: argparse.Namespace, host: str, port: int, prompt_ids: list[int]):
    """One streamed request to the server, as a function returning its timing."""
    body = {"model": args.served_name, "prompt": prompt_ids, "max_tokens": args.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    return lambda: stream_once(host, port, body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(host: str, port: int) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def started_server(args: argparse.Namespace, model: str) -> Iterator[tuple[str, int]]:
    """`rayinfer serve` in a process group of its own; stopped (SIGTERM, then SIGKILL to the group) on exit."""
    port = args.port or _free_port()
    cmd = [sys.executable, "-m", "rayinfer.cluster.cli", "serve", "--model", model, "--port", str(port),
           "--host", "127.0.0.1", "--dtype", args.dtype, "--ray-address", "local",
           "--served-model-name", args.served_name, *args.serve_arg]
    log = tempfile.NamedTemporaryFile("w", prefix="bench-serving-path-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"server pid {proc.pid}, port {port}, log {log.name}", file=sys.stderr)
    try:
        deadline = time.monotonic() + args.startup_timeout
        while not _healthy("127.0.0.1", port):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not healthy after {args.startup_timeout:.0f}s; see {log.name}")
            time.sleep(1.0)
        yield "127.0.0.1", port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `rayinfer serve` shuts Serve and its local Ray down on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of its group still alive
        proc.wait()
        log.close()


# ---------------------------------------------------------------------------------------------------- main
def make_prompt_ids(model: str, length: int) -> list[int]:
    from transformers import AutoTokenizer

    ids: list[int] = []
    tokenizer = AutoTokenizer.from_pretrained(model)
    while len(ids) < length:
        ids += tokenizer.encode(_TEXT, add_special_tokens=False)
    return ids[:length]


def report(results: dict) -> str:
    rows = [("", "TTFT p50", "TTFT p90", "ITL p50", "ITL p90", "TPOT p50")]
    for name in ("offline", "offline beside server", "serving"):
        if name in results:
            r = results[name]
            rows.append((name, *(f"{r[k][q]:.2f}" for k, q in (("ttft_ms", "median"), ("ttft_ms", "p90"),
                         ("itl_ms", "median"), ("itl_ms", "p90"), ("tpot_ms", "median")))))
    for name, label in (("difference", "serving - offline"), ("difference beside server", "serving - beside")):
        if name in results:
            d = results[name]
            rows.append((label, *(f"{d[k]:+.2f}" for k in ("ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms",
                                                           "itl_p90_ms", "tpot_p50_ms"))))
    return "\n".join(f"{r[0]:22s}" + "".join(f"{c:>11s}" for c in r[1:]) for r in rows) + "\n(ms)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped on SIGTERM too
    model_dir, built = args.model, None
    try:
        if model_dir is None:
            from rayinfer.workers.tiny_checkpoint import build_tiny_checkpoint

            built = tempfile.mkdtemp(prefix="bench-serving-path-model-")
            model_dir = str(build_tiny_checkpoint(built, arch="llama", size="llama-56m", dtype="float32"))
        prompt_ids = make_prompt_ids(model_dir, args.prompt_len)
        results: dict = {"config": {k: v for k, v in vars(args).items() if k != "json"} | {"model": model_dir}}
        if not args.skip_offline:
            with offline_engine(args, model_dir, prompt_ids) as offline:
                results["offline"] = summary(timed_runs(args, offline)[0])
        if not args.skip_serving:
            with contextlib.ExitStack() as stack:
                if args.base_url:
                    url = args.base_url.split("://", 1)[-1].rstrip("/")
                    host, _, port_text = url.partition(":")
                    port = int(port_text or 80)
                else:
                    host, port = stack.enter_context(started_server(args, model_dir))
                served = served_request(args, host, port, prompt_ids)
                if args.offline_beside_server:
                    offline = stack.enter_context(offline_engine(args, model_dir, prompt_ids))
                    beside, serving = timed_runs(args, offline, served)
                    results["offline beside server"] = summary(beside)
                else:
                    serving = timed_runs(args, served)[0]
                results["serving"] = summary(serving)
        for baseline, name in (("offline", "difference"), ("offline beside server", "difference beside server")):
            if baseline in results and "serving" in results:
                o, s = results[baseline], results["serving"]
                results[name] = {f"{k.split('_')[0]}_{'p50' if q == 'median' else q}_ms": s[k][q] - o[k][q]
                                 for k in ("ttft_ms", "itl_ms", "tpot_ms") for q in ("median", "p90")}
        print(report(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        if built is not None:
            shutil.rmtree(built, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
