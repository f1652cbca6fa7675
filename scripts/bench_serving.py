#!/usr/bin/env python
"""Online serving benchmark for any OpenAI-compatible server (rayinfer, `transformers serve`, vLLM, ...).

Like vLLM's `benchmark_serving.py`: requests arrive as a Poisson process at `--request-rate` requests/s (`inf`:
all at once), optionally capped at `--max-concurrency` requests in flight, each streaming (`stream: true`) a
fixed `max_tokens` (EOS ignored, so every request runs to its length). It reports successful / failed requests,
duration, request and token throughput, time to first token (TTFT), time per output token (TPOT, `(e2e - ttft)
/ (output_tokens - 1)`), inter-token latency (ITL: the gap before each streamed chunk divided by the tokens in
it) and end-to-end latency (E2EL): mean, median, p90 and p99 (`--percentiles`), and with `--goodput
ttft:MS tpot:MS e2el:MS` the requests/s that met every given limit.

Output tokens are the server's count (`usage.completion_tokens`, asked for with `stream_options.include_usage`)
when it sends one, else one per token-carrying SSE event (or the event's `logprobs` tokens, when present). For
the ITL a "chunk" is what one network read brings: SSE events that arrive together (a server or proxy that
flushes several at once, or a client that read late) are one chunk whose gap is shared by their tokens, rather
than gaps of zero. When the server's count is higher than the events and they do not say how many tokens each
carried (`transformers serve` merges tokens that decode to part of a character into the next event), the extra
tokens are assumed spread evenly over the events after the first.

Workloads: prompts are random text (`--tokenizer DIR`, default `--model` when it is a local folder, makes them
exactly `input_len` tokens, as vLLM's random dataset does; without one they are random words, about as many
tokens as words or more) or random token-id lists (`--prompt-ids`, for servers that take them; rayinfer does,
`transformers serve` does not). Lengths are uniform in `[len*(1-r), len*(1+r)]` (`--input-len`, `--output-len`,
`--range-ratio r`), or `--dataset sharegpt-like`: lognormal lengths whose means after clipping are 202 prompt /
179 output tokens (ShareGPT's), each clipped to [4, 1024] (and to half of `--max-model-len` if given, which
lowers the means).
A fixed `--seed` gives the same requests in the same order to every engine; each point of a `--sweep` gets its
own prompts (seed + 1000 * point), so a server's prefix cache cannot reuse an earlier point's prompts. One
warm-up request (`--warmup-requests`) runs before each measured run, outside the numbers.

`--sweep 0.5,1,2,4` runs several request rates in one invocation; `--json FILE` writes every run's numbers
(`--save-detailed`: and per-request timings), `--plot-dir DIR` PNG plots (p50/p99 TTFT and TPOT, and output
tokens/s, against the request rate; `inf` is drawn right of the highest finite rate). `--label NAME` names the
engine; `--compare A.json B.json --plot-dir D` overlays several saved sweeps on the same plots. Also runs as
`rayinfer bench serving ...`.

Running it against both engines on one checkpoint (the client shares the machine with the server; on a small
machine keep lengths and request counts small):

    .venv/bin/python scripts/make_tiny_model.py --arch llama --out /tmp/tiny-bench

    # rayinfer (a Ray instance of its own; stop it with Ctrl-C / SIGINT)
    .venv/bin/rayinfer serve --model /tmp/tiny-bench --port 8000 --served-model-name m --ray-address local
    .venv/bin/python scripts/bench_serving.py --backend rayinfer --base-url http://127.0.0.1:8000 --model m \\
        --tokenizer /tmp/tiny-bench --input-len 64 --output-len 32 --num-prompts 50 \\
        --sweep 1,2,4 --label rayinfer --json /tmp/rayinfer.json --plot-dir /tmp/plots-rayinfer

    # transformers serve with continuous batching, pinned to the same checkpoint, its KV cache capped (see below);
    # stop it with SIGTERM (`kill PID`): after Ctrl-C / SIGINT it logs "Finished server process" but stays alive
    .venv/bin/transformers serve /tmp/tiny-bench --continuous-batching --cb-block-size 16 --cb-num-blocks 128 \\
        --cb-max-batch-tokens 512 --port 8001 --device cpu
    .venv/bin/python scripts/bench_serving.py --backend transformers --base-url http://127.0.0.1:8001 \\
        --model /tmp/tiny-bench --input-len 64 --output-len 32 --num-prompts 50 \\
        --sweep 1,2,4 --label transformers --json /tmp/transformers.json

    # both on the same plots
    .venv/bin/python scripts/bench_serving.py --compare /tmp/rayinfer.json /tmp/transformers.json --plot-dir /tmp/plots

What `transformers serve` (transformers 5.x, `transformers/cli/serving/`) supports and needs, and so what
`--backend transformers` sends:
  * `/v1/completions` (string prompts only: a token-id list is refused with 400, hence no `--prompt-ids`),
    `/v1/chat/completions` and `/v1/responses`. `--continuous-batching` serves text models through paged
    attention; without it requests run one `generate()` at a time.
  * It needs `accelerate` (in the `dev` extra): it always loads with a `device_map` (`--device`, default
    `auto`), which transformers refuses without it. `--device cpu` on a machine without a GPU.
  * On CPU, continuous batching sizes its KV cache from the machine's RAM (60-90% of psutil's total, less its
    own RSS) unless `--cb-num-blocks` is given, and sizes its attention masks by that whole cache. On a shared
    23 GB machine, a short run at 4 requests/s left its steps at ~250 ms (they stayed slow for later runs) and
    its RSS grew to 14.5 GB until the kernel's OOM killer stopped it; with `--cb-num-blocks 128
    --cb-max-batch-tokens 512` (default 8192) neither happened (~0.5 GB, ~2 ms steps). Size them to the run.
  * Models load on demand by the request's `model` field (a Hub id or a local path). Given a model on the
    command line (`transformers serve DIR`) the server is pinned to it, preloads it, and refuses any other
    `model` value than that exact string: pass the same path as `--model`.
  * Unknown body fields are refused with 422, so no `ignore_eos` / `min_tokens`. EOS is turned off through the
    `generation_config` field (a JSON string that replaces the model's generation config): `{"eos_token_id":
    -1, "max_new_tokens": N, "do_sample": false}`; continuous batching passes each request's `eos_token_id` and
    `max_new_tokens` on, and -1 matches no token. Sampling settings (temperature, top_p) of the continuous
    batching manager are those of the first request it sees (hence the warm-up request).
  * `stream_options` is accepted but ignored: the last streamed chunk always carries `usage`; no `data: [DONE]`
    ends the stream (the connection closes). Each decoded piece of text is one SSE event; tokens that decode to
    nothing yet (part of a UTF-8 character) are merged into the next event.
`--backend rayinfer` (and `vllm`) sends `ignore_eos: true` and `stream_options: {"include_usage": true}`;
`--backend openai` sends the latter only (a server that runs to EOS makes fewer tokens; `usage` counts them).
Extra body fields for any backend: `--extra-body '{"top_k": 1}'`.
"""
from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

BACKENDS = ("rayinfer", "vllm", "openai", "transformers")
SHAREGPT_PROMPT_MEAN, SHAREGPT_OUTPUT_MEAN = 202.0, 179.0
SHAREGPT_PROMPT_SIGMA, SHAREGPT_OUTPUT_SIGMA = 1.0, 0.8
SHAREGPT_MIN_LEN, SHAREGPT_MAX_LEN = 4, 1024
METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                 "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
_WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be or had not "
          "but first one their has its new after who they have her she two been other when there all during "
          "into school time may years more most only over city some world would where later up such used many "
          "can state about national out known university united then made also team both war season game").split()


# ----------------------------------------------------------------------------------------------------------------
# Server-sent events


class SSEParser:
    """Incremental server-sent-events parser: `feed(bytes)` returns the `data` payloads of the events it completes.

    Splits lines on `\\n` (a `\\r` before it is dropped), skips comments (`: ...`) and fields other than `data`,
    joins several `data:` lines of one event with `\\n`, and dispatches an event at its blank line; `close()`
    returns an event left unterminated when the stream ended. Bytes may be split anywhere, even inside a UTF-8
    character.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes | str) -> list[str]:
        text = self._decoder.decode(chunk) if isinstance(chunk, (bytes, bytearray)) else chunk
        if not text:
            return []
        lines = (self._buffer + text).split("\n")
        self._buffer = lines.pop()
        events: list[str] = []
        for line in lines:
            self._line(line[:-1] if line.endswith("\r") else line, events)
        return events

    def close(self) -> list[str]:
        events = self.feed(self._decoder.decode(b"", final=True))
        if self._buffer:
            line, self._buffer = self._buffer.rstrip("\r"), ""
            self._line(line, events)
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, line: str, events: list[str]) -> None:
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)


@dataclass
class ChunkInfo:
    """What one streamed JSON chunk says."""

    tokens: bool = False  # it carries generated tokens (or text)
    num_tokens: Optional[int] = None  # how many, when the chunk says so (logprobs / token_ids)
    text: str = ""
    finish_reason: Optional[str] = None
    usage: Optional[dict] = None
    error: Optional[str] = None


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or json.dumps(error))
    return str(error)


def parse_chunk(obj: Any) -> ChunkInfo:
    """Interprets one `data:` JSON object of a completions or chat-completions stream."""
    info = ChunkInfo()
    if not isinstance(obj, dict):
        info.error = f"unexpected SSE data: {str(obj)[:200]}"
        return info
    if obj.get("error") is not None:
        info.error = _error_text(obj["error"])
        return info
    if isinstance(obj.get("usage"), dict):
        info.usage = obj["usage"]
    known = 0
    all_known = True
    for choice in obj.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        info.finish_reason = choice.get("finish_reason") or info.finish_reason
        logprobs = choice.get("logprobs")
        if "delta" in choice:  # chat completions
            delta = choice.get("delta") or {}
            text = "".join(str(delta.get(k) or "") for k in ("content", "reasoning_content", "reasoning"))
            counted = logprobs.get("content") if isinstance(logprobs, dict) else None
            # An empty delta without a finish reason is a token still being decoded, except the role-only opener.
            empty_token = (not text and choice.get("finish_reason") is None and "content" in delta
                           and not delta.get("role"))
        else:  # completions
            text = str(choice.get("text") or "")
            counted = logprobs.get("tokens") if isinstance(logprobs, dict) else None
            empty_token = not text and choice.get("finish_reason") is None
        if counted is None and isinstance(choice.get("token_ids"), list):
            counted = choice["token_ids"]
        info.text += text
        if isinstance(counted, list):
            known += len(counted)
            info.tokens = info.tokens or bool(counted)
        else:
            all_known = False
            info.tokens = info.tokens or bool(text) or empty_token
    if info.tokens and all_known:
        info.num_tokens = known
    return info


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def compute_itl(times: Sequence[float], counts: Sequence[Optional[int]], total_tokens: Optional[int],
                events: Optional[Sequence[int]] = None) -> list[float]:
    """ITL samples of one request: each chunk's gap to the previous one divided by the tokens in it.

    A chunk is what one network read brought: `times[i]` its arrival, `events[i]` how many token-carrying SSE
    events it held (default 1 each), `counts[i]` their tokens when the server said (logprobs), else None.
    `total_tokens`: the server's count for the whole request (usage), if any. An event whose tokens are not
    given holds one token, unless `total_tokens` says there were more: those are spread evenly over the events
    after the first chunk's.
    """
    if len(times) < 2:
        return []
    events = list(events) if events is not None else [1] * len(times)
    gaps = [b - a for a, b in zip(times, times[1:])]
    per_event = 1.0
    if total_tokens is not None and any(c is None for c in counts[1:]):
        first = counts[0] if counts[0] is not None else events[0]
        known = sum(c for c in counts[1:] if c is not None)
        unknown_events = sum(e for c, e in zip(counts[1:], events[1:]) if c is None)
        spread = (total_tokens - first - known) / unknown_events
        if spread > 1.0:
            per_event = spread
    itl = []
    for gap, c, e in zip(gaps, counts[1:], events[1:]):
        tokens = c if c is not None else e * per_event
        itl.append(gap / tokens if tokens > 0 else gap)
    return itl


def compute_tpot(e2el: float, ttft: float, output_tokens: int) -> Optional[float]:
    """Time per output token after the first: (e2e - ttft) / (output_tokens - 1); None for one-token outputs."""
    if output_tokens <= 1:
        return None
    return (e2el - ttft) / (output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _pkey(q: float) -> str:
    return f"p{q:g}"


def summarize(values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """Mean, median, std and percentiles of a list of seconds, in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    out = {"mean": sum(ms) / len(ms) if ms else 0.0, "median": percentile(ms, 50)}
    out["std"] = math.sqrt(sum((v - out["mean"]) ** 2 for v in ms) / len(ms)) if ms else 0.0
    for q in percentiles:
        out[_pkey(q)] = percentile(ms, q)
    return out


def parse_goodput(specs: Optional[Sequence[str]]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        name, sep, value = spec.partition(":")
        name = name.strip().lower()
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, not {spec!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {spec!r}: {value!r} is not a number of milliseconds") from None
        if slos[name] < 0:
            raise ValueError(f"--goodput {spec!r}: the limit must be >= 0")
    return slos


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0  # the server's count when it sent usage, else the client's
    output_tokens: int = 0
    expected_output_tokens: int = 0
    ttft: float = 0.0  # seconds
    e2el: float = 0.0
    tpot: Optional[float] = None
    itl: list[float] = field(default_factory=list)
    chunks: int = 0  # network reads that brought tokens (SSE events arriving together count as one chunk)
    events: int = 0  # SSE events that carried tokens
    start: float = 0.0  # perf_counter at send
    usage_reported: bool = False
    finish_reason: Optional[str] = None


def meets_slo(result: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2el": result.e2el}
    return all(values[name] * 1000.0 <= limit for name, limit in slos.items())


def calculate_metrics(results: Sequence[RequestResult], duration: float, percentiles: Sequence[float] = (50, 90, 99),
                      goodput: Optional[dict[str, float]] = None) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    duration = max(duration, 1e-9)
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(failed),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "output_tokens_from_usage": all(r.usage_reported for r in ok) if ok else False,
        "short_outputs": sum(1 for r in ok if r.output_tokens < r.expected_output_tokens),
    }
    if goodput:
        good = sum(1 for r in ok if meets_slo(r, goodput))
        metrics["goodput_slo_ms"] = dict(goodput)
        metrics["good_requests"] = good
        metrics["request_goodput"] = good / duration
    metrics["ttft_ms"] = summarize([r.ttft for r in ok], percentiles)
    metrics["tpot_ms"] = summarize([r.tpot for r in ok if r.tpot is not None], percentiles)
    metrics["itl_ms"] = summarize([v for r in ok for v in r.itl], percentiles)
    metrics["e2el_ms"] = summarize([r.e2el for r in ok], percentiles)
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error] = errors.get(r.error, 0) + 1
    metrics["errors"] = [{"error": e, "count": n} for e, n in sorted(errors.items(), key=lambda kv: -kv[1])[:10]]
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Workload


def _clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[clip(X, lo, hi)] for X ~ LogNormal(mu, sigma)."""
    def cdf(z: float) -> float:
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    inner = math.exp(mu + sigma * sigma / 2.0) * (cdf(b - sigma) - cdf(a - sigma))
    return lo * cdf(a) + hi * (1.0 - cdf(b)) + inner


def lognormal_mu_for_mean(mean: float, sigma: float, lo: float, hi: float) -> float:
    """The mu whose lognormal, clipped to [lo, hi], has the given mean (bisection)."""
    if not lo < mean < hi:
        raise ValueError(f"a mean of {mean} cannot be reached inside [{lo}, {hi}]")
    a, b = math.log(lo) - 10 * sigma, math.log(hi) + 10 * sigma
    for _ in range(200):
        mid = (a + b) / 2
        if _clipped_lognormal_mean(mid, sigma, lo, hi) < mean:
            a = mid
        else:
            b = mid
    return (a + b) / 2


def sharegpt_like_lengths(n: int, rng: random.Random, max_model_len: Optional[int] = None,
                          prompt_mean: float = SHAREGPT_PROMPT_MEAN, output_mean: float = SHAREGPT_OUTPUT_MEAN
                          ) -> list[tuple[int, int]]:
    """(prompt, output) lengths shaped like ShareGPT's: lognormal, with mu chosen so that once clipped to
    [4, 1024] the means are `prompt_mean` / `output_mean`. With `max_model_len` each is further clipped to half
    of it (so both fit), which lowers the means when the context is short."""
    cap = SHAREGPT_MAX_LEN if max_model_len is None else min(SHAREGPT_MAX_LEN, max_model_len // 2)
    if cap < SHAREGPT_MIN_LEN:
        raise ValueError(f"--max-model-len {max_model_len} is too small for --dataset sharegpt-like")
    params = [(lognormal_mu_for_mean(mean, sigma, SHAREGPT_MIN_LEN, SHAREGPT_MAX_LEN), sigma)
              for mean, sigma in ((prompt_mean, SHAREGPT_PROMPT_SIGMA), (output_mean, SHAREGPT_OUTPUT_SIGMA))]
    out = []
    for _ in range(n):
        p, o = (int(round(min(max(rng.lognormvariate(mu, sigma), SHAREGPT_MIN_LEN), cap))) for mu, sigma in params)
        out.append((p, o))
    return out


def uniform_lengths(n: int, rng: random.Random, input_len: int, output_len: int, range_ratio: float
                    ) -> list[tuple[int, int]]:
    def draw(length: int) -> int:
        lo, hi = max(1, int(length * (1 - range_ratio))), max(1, int(length * (1 + range_ratio)))
        return rng.randint(lo, hi)

    return [(draw(input_len), draw(output_len)) for _ in range(n)]


@dataclass
class RequestSpec:
    prompt: Any  # str, or a list of token ids
    prompt_len: int  # exact with a tokenizer or for token ids, else an estimate
    output_len: int


def load_tokenizer(path: Optional[str]):
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def build_requests(lengths: Sequence[tuple[int, int]], rng: random.Random, tokenizer=None, prompt_ids: bool = False,
                   vocab_size: Optional[int] = None) -> list[RequestSpec]:
    """Random prompts of the given lengths: token ids, exact-length text through a tokenizer, or random words."""
    specs = []
    candidates: Optional[list[int]] = None
    if tokenizer is not None:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        candidates = [i for i in range(len(tokenizer)) if i not in special]
    elif vocab_size:
        candidates = list(range(vocab_size))
    for in_len, out_len in lengths:
        if prompt_ids or tokenizer is not None:
            if candidates is None:
                raise ValueError("--prompt-ids needs --tokenizer or --vocab-size")
            ids = [rng.choice(candidates) for _ in range(in_len)]
            if prompt_ids:
                specs.append(RequestSpec(ids, in_len, out_len))
                continue
            # Text that re-encodes to in_len tokens (as vLLM's random dataset does): decode, re-encode, cut.
            text = tokenizer.decode(ids)
            ids = tokenizer.encode(text, add_special_tokens=False)[:in_len]
            text = tokenizer.decode(ids)
            specs.append(RequestSpec(text, len(tokenizer.encode(text, add_special_tokens=False)), out_len))
        else:
            specs.append(RequestSpec(" ".join(rng.choice(_WORDS) for _ in range(in_len)), in_len, out_len))
    return specs


def arrival_offsets(n: int, rate: float, rng: random.Random, burstiness: float = 1.0) -> list[float]:
    """Send times (s from the start): a Poisson process at `rate` (gamma gaps with shape `burstiness`; 1 is
    Poisson, lower is burstier), the first request at 0; all 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return offsets


# ----------------------------------------------------------------------------------------------------------------
# Client


@dataclass
class ClientConfig:
    base_url: str
    endpoint: str = "/v1/completions"
    model: str = ""
    backend: str = "rayinfer"
    temperature: float = 0.0
    extra_body: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    timeout_s: float = 6 * 3600.0

    @property
    def chat(self) -> bool:
        return "chat" in self.endpoint

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/" + self.endpoint.lstrip("/")


def build_body(cfg: ClientConfig, spec: RequestSpec) -> dict:
    """The request body for one streamed request, in the shape the backend needs to run to max_tokens."""
    body: dict[str, Any] = {"stream": True}
    if cfg.model:
        body["model"] = cfg.model
    if cfg.chat:
        if not isinstance(spec.prompt, str):
            raise ValueError("chat completions take text prompts, not token ids")
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    body["max_tokens"] = spec.output_len
    body["temperature"] = cfg.temperature
    if cfg.backend == "transformers":
        # Unknown fields are a 422 there; EOS is turned off through a replacement generation config instead.
        body["generation_config"] = json.dumps(
            {"max_new_tokens": spec.output_len, "eos_token_id": -1, "do_sample": cfg.temperature > 0,
             **({"temperature": cfg.temperature} if cfg.temperature > 0 else {})})
    else:
        body["stream_options"] = {"include_usage": True}
        if cfg.backend in ("rayinfer", "vllm"):
            body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


async def send_request(session, cfg: ClientConfig, spec: RequestSpec) -> RequestResult:
    """Sends one streamed request and times it; HTTP errors, error events and exceptions make a failed result."""
    import aiohttp

    result = RequestResult(prompt_len=spec.prompt_len, expected_output_tokens=spec.output_len)
    parser = SSEParser()
    times: list[float] = []  # per network read that brought token-carrying events
    counts: list[Optional[int]] = []  # their tokens when the server said, else None
    events: list[int] = []  # how many such events

    def add_tokens(at: float, num_tokens: Optional[int]) -> None:
        if times and times[-1] == at:
            events[-1] += 1
            counts[-1] = None if counts[-1] is None or num_tokens is None else counts[-1] + num_tokens
        else:
            times.append(at)
            counts.append(num_tokens)
            events.append(1)

    usage: Optional[dict] = None
    bad_payload = ""
    start = time.perf_counter()
    result.start = start
    end = start
    try:
        body = build_body(cfg, spec)
        async with session.post(cfg.url, json=body, headers=cfg.headers) as response:
            if response.status != 200:
                text = await response.text(errors="replace")
                result.error = f"HTTP {response.status}: {text.strip()[:1000]}"
                return result
            state = {"usage": None, "bad": "", "error": None}

            def consume(payload: str, at: float) -> bool:
                """Takes one event; True once the stream is over ([DONE] or an error event)."""
                payload = payload.strip()
                if not payload:
                    return False
                if payload == "[DONE]":
                    return True
                try:
                    info = parse_chunk(json.loads(payload))
                except json.JSONDecodeError:
                    state["bad"] = state["bad"] or payload[:200]
                    return False
                if info.error is not None:
                    state["error"] = f"error event: {info.error}"[:1000]
                    return True
                state["usage"] = info.usage or state["usage"]
                if info.finish_reason:
                    result.finish_reason = info.finish_reason
                if info.tokens:
                    add_tokens(at, info.num_tokens)
                return False

            done = False
            async for data in response.content.iter_any():
                end = time.perf_counter()
                if any(consume(payload, end) for payload in parser.feed(data)):
                    done = True
                    break
            if not done:
                for payload in parser.close():  # a server that closes without [DONE] (transformers serve)
                    if consume(payload, end):
                        break
            usage, bad_payload = state["usage"], state["bad"]
            if state["error"] is not None:
                result.error = state["error"]
                return result
    except asyncio.TimeoutError:
        result.error = f"timed out after {time.perf_counter() - start:.1f} s"
        return result
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:1000]
        return result
    if not times:
        result.error = "the stream carried no tokens" + (f" (unparsed data: {bad_payload!r})" if bad_payload else "")
        return result
    result.success = True
    result.chunks = len(times)
    result.events = sum(events)
    result.ttft = times[0] - start
    result.e2el = end - start
    usage_tokens = None
    if usage is not None and isinstance(usage.get("completion_tokens"), int):
        usage_tokens = usage["completion_tokens"]
        result.usage_reported = True
        if isinstance(usage.get("prompt_tokens"), int):
            result.prompt_len = usage["prompt_tokens"]
    result.output_tokens = usage_tokens if usage_tokens is not None else sum(
        c if c is not None else e for c, e in zip(counts, events))
    result.tpot = compute_tpot(result.e2el, result.ttft, result.output_tokens)
    result.itl = compute_itl(times, counts, usage_tokens, events)
    return result


def _session(cfg: ClientConfig, max_connections: int):
    import aiohttp

    connector = aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)


async def run_benchmark(cfg: ClientConfig, specs: Sequence[RequestSpec], request_rate: float = math.inf,
                        max_concurrency: Optional[int] = None, seed: int = 0, burstiness: float = 1.0,
                        warmup: Sequence[RequestSpec] = (), percentiles: Sequence[float] = (50, 90, 99),
                        goodput: Optional[dict[str, float]] = None, progress: bool = True,
                        description: str = "") -> tuple[dict[str, Any], list[RequestResult]]:
    """One measured run: warm-up requests one by one, then `specs` at `request_rate` (at most `max_concurrency`
    in flight). Returns the metrics and the per-request results (in `specs` order)."""
    from tqdm import tqdm

    offsets = arrival_offsets(len(specs), request_rate, random.Random(seed), burstiness)
    async with _session(cfg, max_concurrency or 0) as session:
        for spec in warmup:
            result = await send_request(session, cfg, spec)
            if not result.success:
                print(f"warning: the warm-up request failed: {result.error}", file=sys.stderr)
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(specs), disable=not progress, desc=description or None, leave=True)
        start = time.perf_counter()

        async def one(spec: RequestSpec, offset: float) -> RequestResult:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if semaphore is None:
                result = await send_request(session, cfg, spec)
            else:
                async with semaphore:
                    result = await send_request(session, cfg, spec)
            bar.update(1)
            return result

        results = list(await asyncio.gather(*(one(s, o) for s, o in zip(specs, offsets))))
        duration = time.perf_counter() - start
        bar.close()
    return calculate_metrics(results, duration, percentiles, goodput), results


async def wait_for_server(base_url: str, timeout_s: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    last = ""
    async with aiohttp.ClientSession(trust_env=False) as session:
        while time.monotonic() < deadline:
            for path in ("/health", "/v1/models"):
                try:
                    async with session.get(base_url.rstrip("/") + path, timeout=aiohttp.ClientTimeout(total=5)) as r:
                        if r.status == 200:
                            return
                        last = f"{path}: HTTP {r.status}"
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    last = f"{path}: {type(exc).__name__}"
            await asyncio.sleep(1.0)
    raise TimeoutError(f"{base_url} did not answer within {timeout_s:g} s ({last})")


# ----------------------------------------------------------------------------------------------------------------
# Report


def format_report(metrics: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    lines = [f"{' ' + title + ' ':=^60}"]

    def row(name: str, value: Any, fmt: str = "{:<10.2f}") -> None:
        lines.append(f"{name:<44}" + (fmt.format(value) if isinstance(value, float) else f"{value:<10}"))

    row("Successful requests:", metrics["completed"])
    row("Failed requests:", metrics["failed"])
    if metrics.get("max_concurrency"):
        row("Maximum request concurrency:", metrics["max_concurrency"])
    rate = metrics.get("request_rate")
    if rate is not None:
        row("Request rate (req/s):", "inf" if math.isinf(rate) else float(rate))
    row("Benchmark duration (s):", metrics["duration_s"])
    row("Total input tokens:", metrics["total_input_tokens"])
    row("Total generated tokens:", metrics["total_output_tokens"])
    row("Request throughput (req/s):", metrics["request_throughput"])
    if "request_goodput" in metrics:
        row("Request goodput (req/s):", metrics["request_goodput"])
    row("Output token throughput (tok/s):", metrics["output_throughput"])
    row("Total token throughput (tok/s):", metrics["total_token_throughput"])
    for name in METRICS:
        stats = metrics[f"{name}_ms"]
        lines.append(f"{METRIC_TITLES[name]:-^60}")
        label = name.upper()
        row(f"Mean {label} (ms):", stats["mean"])
        row(f"Median {label} (ms):", stats["median"])
        for key, value in stats.items():
            if key.startswith("p") and key != "p50":  # p50 is the median, printed above
                row(f"{key.upper()} {label} (ms):", value)
    lines.append("=" * 60)
    if metrics.get("completed") and not metrics.get("output_tokens_from_usage", True):
        lines.append("note: the server sent no usage; output tokens were counted by streamed chunks")
    if metrics.get("short_outputs"):
        lines.append(f"note: {metrics['short_outputs']} requests made fewer tokens than max_tokens (EOS not ignored?)")
    for err in metrics.get("errors", []):
        lines.append(f"error x{err['count']}: {err['error']}")
    return "\n".join(lines)


def _rate_text(rate: Any) -> str:
    rate = _load_rate(rate)
    return "inf" if math.isinf(rate) else f"{rate:g}"


def format_sweep_table(runs: Sequence[dict[str, Any]]) -> str:
    head = (f"{'rate':>6} {'ok':>5} {'fail':>5} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'TPOT p50':>9} {'TPOT p99':>9} {'ITL p50':>8} {'E2EL p50':>9}")
    lines = [head]
    for run in runs:
        lines.append(
            f"{_rate_text(run['request_rate']):>6} {run['completed']:>5} {run['failed']:>5} "
            f"{run['request_throughput']:>7.2f} {run['output_throughput']:>10.1f} "
            f"{run['ttft_ms']['median']:>9.1f} {run['ttft_ms'].get('p99', 0.0):>9.1f} "
            f"{run['tpot_ms']['median']:>9.2f} {run['tpot_ms'].get('p99', 0.0):>9.2f} "
            f"{run['itl_ms']['median']:>8.2f} {run['e2el_ms']['median']:>9.1f}")
    return "\n".join(lines) + "\n(latencies in ms)"


def _json_rate(rate: float) -> Any:
    return "inf" if math.isinf(rate) else rate


def _load_rate(value: Any) -> float:
    return math.inf if value in ("inf", None) else float(value)


def write_plots(sweeps: Sequence[dict[str, Any]], plot_dir: str | Path) -> list[Path]:
    """PNG plots of one or more saved sweeps ({"label", "runs": [...]}) against the request rate:
    ttft.png and tpot.png (p50 solid, p99 dashed), throughput.png (output tokens/s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    finite = [_load_rate(r["request_rate"]) for s in sweeps for r in s["runs"]]
    finite = [r for r in finite if not math.isinf(r)]
    inf_x = (max(finite) * 1.5) if finite else 1.0

    def xs(runs):
        return [inf_x if math.isinf(_load_rate(r["request_rate"])) else _load_rate(r["request_rate"]) for r in runs]

    def ticks(ax):
        values = sorted({x for s in sweeps for x in xs(s["runs"])})
        ax.set_xticks(values)
        ax.set_xticklabels(["inf" if v == inf_x and v not in finite else f"{v:g}" for v in values])

    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for metric, title in (("ttft", "Time to first token"), ("tpot", "Time per output token")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, sweep in enumerate(sweeps):
            runs = sorted(sweep["runs"], key=lambda r: _load_rate(r["request_rate"]))
            color = colors[i % len(colors)]
            x = xs(runs)
            ax.plot(x, [r[f"{metric}_ms"]["median"] for r in runs], "o-", color=color, label=f"{sweep['label']} p50")
            ax.plot(x, [r[f"{metric}_ms"].get("p99", float("nan")) for r in runs], "s--", color=color,
                    label=f"{sweep['label']} p99")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.set_title(title)
        ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = plot_dir / f"{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, sweep in enumerate(sweeps):
        runs = sorted(sweep["runs"], key=lambda r: _load_rate(r["request_rate"]))
        ax.plot(xs(runs), [r["output_throughput"] for r in runs], "o-", color=colors[i % len(colors)],
                label=sweep["label"])
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Output token throughput")
    ticks(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = plot_dir / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _rate(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("request rates must be > 0 (inf: all at once)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_serving.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Online serving benchmark for an OpenAI-compatible server (see the module docstring).")
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000")
    server.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    server.add_argument("--model", default="", help="the request's model field (transformers: the served path)")
    server.add_argument("--backend", choices=BACKENDS, default="rayinfer",
                        help="request body shape: rayinfer/vllm (ignore_eos), transformers (generation_config with "
                             "eos_token_id -1), openai (plain)")
    server.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="sent as a Bearer token")
    server.add_argument("--wait-for-server", type=float, default=0.0, metavar="S",
                        help="poll /health or /v1/models up to S seconds first")
    server.add_argument("--request-timeout", type=float, default=6 * 3600.0, metavar="S")
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=_rate, default=math.inf, help="requests/s, Poisson arrivals (inf)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1: Poisson)")
    load.add_argument("--max-concurrency", type=int, default=None, help="at most N requests in flight")
    load.add_argument("--sweep", default=None, help="comma-separated request rates to run one after another")
    load.add_argument("--num-prompts", type=int, default=100)
    load.add_argument("--warmup-requests", type=int, default=1, help="sequential unmeasured requests before each run")
    load.add_argument("--seed", type=int, default=0)
    data = parser.add_argument_group("workload")
    data.add_argument("--dataset", choices=("random", "sharegpt-like"), default="random")
    data.add_argument("--input-len", type=int, default=128)
    data.add_argument("--output-len", type=int, default=64)
    data.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]")
    data.add_argument("--max-model-len", type=int, default=None, help="sharegpt-like: clip each length to half of it")
    data.add_argument("--prompt-ids", action="store_true", help="send prompts as token-id lists")
    data.add_argument("--tokenizer", default=None, help="tokenizer folder/id for exact prompt lengths "
                                                       "(default: --model when it is a local folder)")
    data.add_argument("--vocab-size", type=int, default=None, help="--prompt-ids without a tokenizer: ids in [0, V)")
    data.add_argument("--temperature", type=float, default=0.0)
    out = parser.add_argument_group("report")
    out.add_argument("--percentiles", default="50,90,99")
    out.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    out.add_argument("--label", default=None, help="engine name in the JSON and plots (default: the backend)")
    out.add_argument("--json", default=None, metavar="FILE", help="write every run's metrics here")
    out.add_argument("--save-detailed", action="store_true", help="put per-request timings in the JSON")
    out.add_argument("--plot-dir", default=None, help="write PNG plots here")
    out.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                     help="only plot these saved results on the same plots (needs --plot-dir)")
    out.add_argument("--disable-tqdm", action="store_true")
    return parser


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.compare:
        if not args.plot_dir:
            parser.error("--compare needs --plot-dir")
        return
    if args.backend == "transformers" and args.prompt_ids:
        parser.error("transformers serve takes string prompts only: drop --prompt-ids")
    if args.prompt_ids and "chat" in args.endpoint:
        parser.error("--prompt-ids works with /v1/completions only")
    if not 0 <= args.range_ratio < 1:
        parser.error("--range-ratio must be in [0, 1)")
    if args.num_prompts < 1 or min(args.input_len, args.output_len) < 1:
        parser.error("--num-prompts, --input-len and --output-len must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be >= 1")
    if args.burstiness <= 0:
        parser.error("--burstiness must be > 0")
    try:
        args.goodput_slos = parse_goodput(args.goodput)
        args.percentile_list = [float(p) for p in args.percentiles.split(",") if p.strip()]
        args.rates = [_rate(r) for r in args.sweep.split(",") if r.strip()] if args.sweep else [args.request_rate]
        args.extra = json.loads(args.extra_body) if args.extra_body else {}
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    if not isinstance(args.extra, dict):
        parser.error("--extra-body must be a JSON object")
    if any(not 0 < p <= 100 for p in args.percentile_list):
        parser.error("--percentiles must be in (0, 100]")


def make_workload(args: argparse.Namespace, seed: int, n: int, tokenizer) -> list[RequestSpec]:
    rng = random.Random(seed)
    if args.dataset == "sharegpt-like":
        lengths = sharegpt_like_lengths(n, rng, args.max_model_len)
    else:
        lengths = uniform_lengths(n, rng, args.input_len, args.output_len, args.range_ratio)
    return build_requests(lengths, rng, tokenizer, args.prompt_ids, args.vocab_size)


def _compare(args: argparse.Namespace) -> int:
    sweeps = []
    for name in args.compare:
        data = json.loads(Path(name).read_text())
        data.setdefault("label", Path(name).stem)
        sweeps.append(data)
    for path in write_plots(sweeps, args.plot_dir):
        print(f"wrote {path}")
    for sweep in sweeps:
        print(f"\n{sweep['label']}:\n{format_sweep_table(sweep['runs'])}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    if args.compare:
        return _compare(args)
    label = args.label or args.backend
    tokenizer_path = args.tokenizer
    if tokenizer_path is None and args.model and Path(args.model).is_dir():
        tokenizer_path = args.model
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer is None and not args.prompt_ids:
        print("note: no --tokenizer: prompts are random words, their token counts only estimates", file=sys.stderr)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    cfg = ClientConfig(base_url=args.base_url, endpoint=args.endpoint, model=args.model, backend=args.backend,
                       temperature=args.temperature, extra_body=args.extra, headers=headers,
                       timeout_s=args.request_timeout)
    if args.wait_for_server > 0:
        asyncio.run(wait_for_server(args.base_url, args.wait_for_server))
    runs = []
    details = []
    for index, rate in enumerate(args.rates):
        seed = args.seed + 1000 * index
        specs = make_workload(args, seed, args.num_prompts + args.warmup_requests, tokenizer)
        warmup, specs = specs[:args.warmup_requests], specs[args.warmup_requests:]
        print(f"workload: {len(specs)} requests, prompts {sum(s.prompt_len for s in specs) / len(specs):.1f} tokens "
              f"on average ({'exact' if tokenizer is not None or args.prompt_ids else 'estimated'}), outputs "
              f"{sum(s.output_len for s in specs) / len(specs):.1f} tokens", file=sys.stderr)
        desc = f"{label} rate={_rate_text(rate)}" + (f" conc={args.max_concurrency}" if args.max_concurrency else "")
        metrics, results = asyncio.run(run_benchmark(
            cfg, specs, rate, args.max_concurrency, seed=seed, burstiness=args.burstiness, warmup=warmup,
            percentiles=args.percentile_list, goodput=args.goodput_slos, progress=not args.disable_tqdm,
            description=desc))
        metrics = {"request_rate": rate, "max_concurrency": args.max_concurrency, "burstiness": args.burstiness,
                   "num_prompts": len(specs), "seed": seed, **metrics}
        print(format_report(metrics, f"{label}: rate {_rate_text(rate)}"), flush=True)
        runs.append(metrics)
        if args.save_detailed:
            details.append([{k: v for k, v in asdict(r).items() if k != "start"} for r in results])
    if len(runs) > 1:
        print(f"\n{label}:\n{format_sweep_table(runs)}")
    record = {
        "label": label, "backend": args.backend, "base_url": args.base_url, "endpoint": args.endpoint,
        "model": args.model, "dataset": args.dataset, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: v for k, v in vars(args).items() if k not in ("api_key", "rates", "extra", "goodput_slos",
                                                                    "percentile_list", "request_rate")},
        "runs": [{**r, "request_rate": _json_rate(r["request_rate"])} for r in runs],
    }
    if args.save_detailed:
        for run, detail in zip(record["runs"], details):
            run["requests"] = detail
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))
        print(f"wrote {args.json}")
    if args.plot_dir:
        for path in write_plots([record], args.plot_dir):
            print(f"wrote {path}")
    return 0 if all(r["completed"] > 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
