#!/usr/bin/env python
"""Soak a running rayinfer server with mixed, partly hostile traffic and check that it holds up.

For `--duration` seconds, `--streams` client loops each send one streamed request after another: greedy ones
(checked against the offline engine's text when `--checkpoint` is given), seeded sampling, `n` > 1, logprobs and
stop strings, chosen at random. A `--disconnect-fraction` of them hang up after a random number of events. One
request in `--hostile-every` is a hostile one (an id past the vocabulary, a NaN, a body nested too deep, too many
prompts, ...) that must get a 4xx. With `--kill-worker-every S` a worker process of the server (a
`ray::WorkerActor` below `--server-pid`) is SIGKILLed every S seconds.

At the end it checks, and exits non-zero unless: every request ended (its output, an error, or the hang-up the
client chose) within `--request-timeout`; every greedy request that finished equals the offline text; every
hostile request got a 4xx; no request got a 5xx except those in flight when a worker was killed (counted apart);
and once idle the server runs no request and its KV cache is empty. It reports request counts and latencies (p50,
p99 of time to first token and end to end) by kind, errors by kind, and the RSS of the server's processes before
and after. `--json FILE` writes it all.

    .venv/bin/rayinfer serve --model /tmp/llama56m --served-model-name m --port 8000 --ray-address local &
    .venv/bin/python scripts/soak.py --base-url http://127.0.0.1:8000 --model m --checkpoint /tmp/llama56m \\
        --duration 600 --streams 256 --kill-worker-every 60 --server-pid $! --json /tmp/soak.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import aiohttp

PROMPTS = ["Once upon a time", "The river runs to the sea", "In the morning the city", "Scientists said that",
           "The quick brown fox", "A journey of a thousand miles", "She opened the door and", "Rain fell on"]
GREEDY_TOKENS = 16
HOSTILE = [  # (route, raw body) -> must be a 4xx
    ("/v1/completions", '{"model": "%s", "prompt": "hi", "stop_token_ids": [100000000], "min_tokens": 1}'),
    ("/v1/completions", '{"model": "%s", "prompt": [5, 100000000]}'),
    ("/v1/completions", '{"model": "%s", "prompt": "hi", "temperature": NaN}'),
    ("/v1/completions", '{"model": "%s", "prompt": "hi", "logit_bias": {"100000000": 3}}'),
    ("/v1/completions", '{"model": "%s", "prompt": "hi", "user": ' + "[" * 64 + "]" * 64 + "}"),
    ("/v1/completions", '{"model": "%s", "prompt": ["hi"] ' + ', "n": 100000}'),
    ("/v1/completions", '{"model": "%s", "prompt": "hi", "logprobs": 100000}'),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "tool", "content": "x"}]}'),
    ("/v1/completions", '{"model": "%s", "prompt": "hi", "max_tokens": 8'),  # cut short: not JSON
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--checkpoint", help="checkpoint folder: greedy texts are checked against the offline engine")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    p.add_argument("--streams", type=int, default=64, help="concurrent client loops")
    p.add_argument("--disconnect-fraction", type=float, default=0.15)
    p.add_argument("--hostile-every", type=int, default=10, help="one request in this many is hostile")
    p.add_argument("--kill-worker-every", type=float, default=0.0, help="SIGKILL a worker of the server every S seconds")
    p.add_argument("--server-pid", type=int, help="the server's process (`rayinfer serve` with a local Ray, or the "
                   "node's raylet): only worker processes below it are killed, and its RSS is reported")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--idle-timeout", type=float, default=60.0, help="how long the server may take to go idle")
    p.add_argument("--api-key", default=os.environ.get("RAYINFER_API_KEY"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    return p


@dataclass
class Outcome:
    kind: str
    status: str  # ok, error, hung, hung_up (the client hung up on purpose), refused (4xx), server_error (5xx)
    ttft: float | None = None
    e2e: float | None = None
    detail: str = ""
    mismatch: bool = False
    during_kill: bool = False


@dataclass
class Soak:
    args: argparse.Namespace
    expected: dict[str, str]
    outcomes: list[Outcome] = field(default_factory=list)
    kill_times: list[float] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}

    def near_kill(self, start: float, end: float) -> bool:
        return any(start - 1.0 <= t <= end + 1.0 for t in self.kill_times)

    async def client(self, session: aiohttp.ClientSession, rng: random.Random, deadline: float) -> None:
        count = 0
        while time.monotonic() < deadline:
            count += 1
            if count % self.args.hostile_every == 0:
                self.outcomes.append(await self.hostile(session, rng))
            else:
                self.outcomes.append(await self.honest(session, rng))

    async def hostile(self, session: aiohttp.ClientSession, rng: random.Random) -> Outcome:
        route, body = rng.choice(HOSTILE)
        start = time.monotonic()
        try:
            async with session.post(self.args.base_url + route, data=(body % self.args.model).encode(),
                                    headers={"Content-Type": "application/json", **self.headers()}) as reply:
                text = await reply.text()
                status = "refused" if 400 <= reply.status < 500 else "server_error" if reply.status >= 500 else "ok"
                return Outcome("hostile", status, e2e=time.monotonic() - start, detail=f"{reply.status} {text[:120]}")
        except asyncio.TimeoutError:
            return Outcome("hostile", "hung", detail=route)

    async def honest(self, session: aiohttp.ClientSession, rng: random.Random) -> Outcome:
        kind = rng.choice(["greedy", "greedy", "seeded", "n3", "logprobs", "stop"])
        prompt = rng.choice(PROMPTS)
        body: dict = {"model": self.args.model, "prompt": prompt, "max_tokens": GREEDY_TOKENS, "stream": True,
                      "temperature": 0.0, "ignore_eos": True}
        if kind == "seeded":
            body.update(temperature=0.9, top_p=0.95, seed=rng.randrange(1 << 30), max_tokens=rng.randint(4, 48))
        elif kind == "n3":
            body.update(n=3, temperature=1.0, seed=rng.randrange(1 << 30))
        elif kind == "logprobs":
            body.update(logprobs=3, max_tokens=rng.randint(4, 32))
        elif kind == "stop":
            body.update(stop=[" the", "."], ignore_eos=False, max_tokens=32)
        hang_up_after = rng.randint(1, 12) if rng.random() < self.args.disconnect_fraction else None
        start, first, text, events = time.monotonic(), None, "", 0
        try:
            async with session.post(self.args.base_url + "/v1/completions", json=body, headers=self.headers()) as reply:
                if reply.status != 200:
                    status = "server_error" if reply.status >= 500 else "refused"
                    return Outcome(kind, status, detail=f"{reply.status} {(await reply.text())[:200]}",
                                   during_kill=self.near_kill(start, time.monotonic()))
                async for raw in reply.content:
                    line = raw.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        return Outcome(kind, "error", detail=str(event["error"].get("message"))[:200],
                                       during_kill=self.near_kill(start, time.monotonic()))
                    first = first or time.monotonic()
                    events += 1
                    text += "".join(c.get("text", "") for c in event.get("choices", []) if c.get("index", 0) == 0)
                    if hang_up_after is not None and events >= hang_up_after:
                        return Outcome(kind, "hung_up", e2e=time.monotonic() - start)
        except asyncio.TimeoutError:
            return Outcome(kind, "hung", detail=f"no end within {self.args.request_timeout}s")
        except aiohttp.ClientError as exc:
            return Outcome(kind, "error", detail=f"{type(exc).__name__}: {exc}"[:200],
                           during_kill=self.near_kill(start, time.monotonic()))
        end = time.monotonic()
        mismatch = kind == "greedy" and prompt in self.expected and text != self.expected[prompt]
        return Outcome(kind, "ok", ttft=(first or end) - start, e2e=end - start, mismatch=mismatch,
                       detail=f"got {text!r}, expected {self.expected.get(prompt)!r}" if mismatch else "")

    async def killer(self, deadline: float) -> None:
        every = self.args.kill_worker_every
        while every > 0 and time.monotonic() + every < deadline:
            await asyncio.sleep(every)
            pids = _pids("ray::WorkerActor", self.args.server_pid)
            if pids:
                os.kill(random.choice(pids), signal.SIGKILL)
                self.kill_times.append(time.monotonic())


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _below(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = _parent(pid)
        if pid == ancestor:
            return True
    return False


def _pids(pattern: str, ancestor: int | None) -> list[int]:
    """Processes whose command line holds `pattern` and that descend from `ancestor` (none without one: this
    script touches only the server it was pointed at)."""
    if ancestor is None:
        return []
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found if _below(int(p), ancestor)]


def _rss_mb(ancestor: int | None, patterns: tuple[str, ...] = ("ray::ServeReplica", "ray::WorkerActor")) -> float:
    total = 0
    for pattern in patterns:
        for pid in _pids(pattern, ancestor):
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                pass
    return total / 1024


def expected_texts(checkpoint: str | None) -> dict[str, str]:
    if not checkpoint:
        return {}
    from rayinfer.cluster.llm import LLM
    from rayinfer.scheduler.sampling_params import SamplingParams

    llm = LLM(checkpoint, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    texts = {out.prompt: out.outputs[0].text for out in llm.generate(PROMPTS, params, use_tqdm=False)}
    llm.shutdown()
    return texts


async def server_idle(args: argparse.Namespace, headers: dict) -> dict[str, float]:
    """The server's gauges once it runs nothing, or as they stand at the idle timeout."""
    deadline, gauges = time.monotonic() + args.idle_timeout, {}
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(args.base_url + "/metrics", headers=headers) as reply:
                for line in (await reply.text()).splitlines():
                    if line.startswith(("rayinfer_num_requests_", "rayinfer_kv_cache_usage_ratio")):
                        name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
                        gauges[name] = value
            if sum(gauges.values()) == 0 or time.monotonic() > deadline:
                return gauges
            await asyncio.sleep(0.5)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def report(soak: Soak, gauges: dict, rss: tuple[float, float], elapsed: float) -> dict:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for o in soak.outcomes:
        by_kind[o.kind][o.status] += 1
    ok = [o for o in soak.outcomes if o.status == "ok" and o.kind != "hostile"]
    problems = []
    hung = [o for o in soak.outcomes if o.status == "hung"]
    if hung:
        problems.append(f"{len(hung)} requests did not end within the request timeout")
    mismatches = [o for o in soak.outcomes if o.mismatch]
    if mismatches:
        problems.append(f"{len(mismatches)} greedy outputs differ from the offline engine's: {mismatches[0].detail}")
    bad_hostile = [o for o in soak.outcomes if o.kind == "hostile" and o.status != "refused"]
    if bad_hostile:
        problems.append(f"{len(bad_hostile)} hostile requests were not refused with a 4xx: {bad_hostile[0].detail}")
    failed = [o for o in soak.outcomes if o.kind != "hostile" and o.status in ("error", "server_error", "refused")
              and not o.during_kill]
    if failed:
        problems.append(f"{len(failed)} honest requests failed with no worker killed: {failed[0].detail}")
    if sum(gauges.values()) != 0:
        problems.append(f"the server did not go idle: {gauges}")
    if rss[1] > 1.5 * rss[0] + 256:  # new worker processes after kills start near where the old ones began
        problems.append(f"the server's RSS grew from {rss[0]:.0f} MB to {rss[1]:.0f} MB")
    return {
        "elapsed_s": round(elapsed, 1), "requests": len(soak.outcomes), "worker_kills": len(soak.kill_times),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "failed_near_a_kill": sum(1 for o in soak.outcomes if o.during_kill),
        "ttft_s": {"p50": percentile([o.ttft for o in ok], 50), "p99": percentile([o.ttft for o in ok], 99)},
        "e2e_s": {"p50": percentile([o.e2e for o in ok], 50), "p99": percentile([o.e2e for o in ok], 99)},
        "errors": dict(Counter(o.detail[:80] for o in soak.outcomes if o.status in ("error", "server_error"))),
        "idle_gauges": gauges, "rss_mb_before": round(rss[0], 1), "rss_mb_after": round(rss[1], 1),
        "problems": problems,
    }


async def run(args: argparse.Namespace) -> dict:
    soak = Soak(args, expected_texts(args.checkpoint))
    rss_before = _rss_mb(args.server_pid)
    rng = random.Random(args.seed)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=args.streams + 8)
    start = time.monotonic()
    deadline = start + args.duration
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        clients = [soak.client(session, random.Random(rng.random()), deadline) for _ in range(args.streams)]
        await asyncio.gather(soak.killer(deadline), *clients)
    gauges = await server_idle(args, soak.headers())
    return report(soak, gauges, (rss_before, _rss_mb(args.server_pid)), time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.base_url = args.base_url.rstrip("/")
    if args.kill_worker_every and args.server_pid is None:
        build_parser().error("--kill-worker-every needs --server-pid (whose workers to kill)")
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
