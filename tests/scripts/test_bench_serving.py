"""scripts/bench_serving.py: metrics on synthetic timings, SSE parsing, the ShareGPT-like lengths, and the client
end to end against a fake OpenAI streaming server in this process (no real engine)."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import random
import socket
import sys
import threading
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="installed with the 'dev' extra")
from aiohttp import web  # noqa: E402

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_serving.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_serving", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving"] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bs = _load()


# ---------------------------------------------------------------------------------------------------------------
# metrics


def test_percentile_matches_linear_interpolation() -> None:
    np = pytest.importorskip("numpy", reason="the percentile cross-check uses numpy (installed with torch)")
    values = [random.Random(1).random() for _ in range(37)]
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert bs.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert bs.percentile([], 50) == 0.0
    assert bs.percentile([3.0], 99) == 3.0


def test_summarize_in_milliseconds() -> None:
    stats = bs.summarize([0.001, 0.002, 0.003, 0.004], [50, 90, 99])
    assert stats["mean"] == pytest.approx(2.5)
    assert stats["median"] == pytest.approx(2.5) and stats["p50"] == pytest.approx(2.5)
    assert stats["p90"] == pytest.approx(3.7)
    assert stats["p99"] == pytest.approx(3.97)
    assert bs.summarize([], [50])["mean"] == 0.0


def test_tpot() -> None:
    assert bs.compute_tpot(e2el=1.0, ttft=0.1, output_tokens=10) == pytest.approx(0.1)
    assert bs.compute_tpot(e2el=1.0, ttft=0.1, output_tokens=1) is None


def test_itl_one_token_per_chunk() -> None:
    times = [0.1, 0.15, 0.25, 0.30]
    assert bs.compute_itl(times, [None] * 4, None) == pytest.approx([0.05, 0.10, 0.05])
    assert bs.compute_itl(times, [None] * 4, 4) == pytest.approx([0.05, 0.10, 0.05])  # usage agrees
    assert bs.compute_itl([0.1], [None], 1) == []


def test_itl_divides_by_tokens_in_chunk() -> None:
    # The chunks say how many tokens they carry (e.g. logprobs): each gap divided by its own count.
    assert bs.compute_itl([0.0, 0.2, 0.5], [1, 2, 3], None) == pytest.approx([0.1, 0.1])
    # They do not, but usage says 7 tokens in 3 chunks: the 6 after the first spread over 2 chunks.
    assert bs.compute_itl([0.0, 0.3, 0.6], [None] * 3, 7) == pytest.approx([0.1, 0.1])
    # Usage lower than the chunks (chunks without tokens): never inflate the ITL.
    assert bs.compute_itl([0.0, 0.3, 0.6], [None] * 3, 2) == pytest.approx([0.3, 0.3])
    # Events that arrived in one read form one chunk: its gap shared by their tokens, no zero gaps.
    assert bs.compute_itl([0.0, 0.1, 0.4], [None] * 3, None, events=[1, 1, 3]) == pytest.approx([0.1, 0.1])
    # ... and with usage above the events, each event's share grows: 1 + (1 + 3) events, 9 tokens -> 2 each.
    assert bs.compute_itl([0.0, 0.2, 0.8], [None] * 3, 9, events=[1, 1, 3]) == pytest.approx([0.1, 0.1])


def _result(ttft, e2el, out, success=True, error=""):
    r = bs.RequestResult(success=success, error=error, prompt_len=10, output_tokens=out,
                         expected_output_tokens=out, ttft=ttft, e2el=e2el)
    r.tpot = bs.compute_tpot(e2el, ttft, out) if success else None
    r.usage_reported = True
    return r


def test_calculate_metrics_and_goodput() -> None:
    results = [
        _result(0.10, 1.10, 11),  # tpot 100 ms
        _result(0.20, 0.70, 11),  # tpot 50 ms
        _result(0.50, 1.00, 11),  # tpot 50 ms, ttft over 300
        _result(0.0, 0.0, 0, success=False, error="HTTP 500: boom"),
    ]
    m = bs.calculate_metrics(results, duration=2.0, percentiles=[50, 99],
                             goodput=bs.parse_goodput(["ttft:300", "tpot:60"]))
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_output_tokens"] == 33 and m["total_input_tokens"] == 30
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(16.5)
    assert m["total_token_throughput"] == pytest.approx(31.5)
    assert m["good_requests"] == 1 and m["request_goodput"] == pytest.approx(0.5)
    assert m["ttft_ms"]["mean"] == pytest.approx(266.667, rel=1e-4)
    assert m["ttft_ms"]["median"] == pytest.approx(200.0)
    assert m["tpot_ms"]["median"] == pytest.approx(50.0)
    assert m["e2el_ms"]["p99"] == pytest.approx(1098.0)
    assert m["errors"] == [{"error": "HTTP 500: boom", "count": 1}]
    only_e2el = bs.calculate_metrics(results, 2.0, goodput=bs.parse_goodput(["e2el:1050"]))
    assert only_e2el["good_requests"] == 2


def test_parse_goodput_rejects_bad_specs() -> None:
    assert bs.parse_goodput(["TTFT:10", "e2el:2.5"]) == {"ttft": 10.0, "e2el": 2.5}
    for bad in (["ttft"], ["foo:1"], ["tpot:x"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            bs.parse_goodput(bad)


def test_arrivals() -> None:
    assert bs.arrival_offsets(5, math.inf, random.Random(0)) == [0.0] * 5
    offsets = bs.arrival_offsets(4000, 4.0, random.Random(0))
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert offsets[-1] / (len(offsets) - 1) == pytest.approx(0.25, rel=0.05)  # mean gap 1/rate


# ---------------------------------------------------------------------------------------------------------------
# SSE


def test_sse_parser_any_split() -> None:
    stream = ('data: {"a": 1}\r\n\r\n: keep-alive comment\n\nevent: message\ndata: {"b":\ndata: 2}\n\n'
              'data:{"c": "é"}\n\ndata: [DONE]\n\n').encode()
    expected = ['{"a": 1}', '{"b":\n2}', '{"c": "é"}', "[DONE]"]
    for size in (1, 2, 3, 7, len(stream)):
        parser = bs.SSEParser()
        events = []
        for i in range(0, len(stream), size):
            events += parser.feed(stream[i:i + size])
        events += parser.close()
        assert events == expected, size


def test_sse_parser_flushes_unterminated_event() -> None:
    parser = bs.SSEParser()
    assert parser.feed(b'data: {"x": 1}') == []
    assert parser.close() == ['{"x": 1}']


def test_parse_chunk_shapes() -> None:
    c = bs.parse_chunk({"choices": [{"index": 0, "text": "hi", "finish_reason": None}]})
    assert c.tokens and c.num_tokens is None and c.text == "hi"
    # rayinfer/vLLM: an empty text mid-stream is a token still being decoded
    assert bs.parse_chunk({"choices": [{"index": 0, "text": "", "finish_reason": None}]}).tokens
    # transformers' last chunk: no text, a finish reason and the usage
    last = bs.parse_chunk({"choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                           "usage": {"prompt_tokens": 5, "completion_tokens": 9}})
    assert not last.tokens and last.finish_reason == "length" and last.usage["completion_tokens"] == 9
    usage_only = bs.parse_chunk({"choices": [], "usage": {"completion_tokens": 3}})
    assert not usage_only.tokens and usage_only.usage == {"completion_tokens": 3}
    lp = bs.parse_chunk({"choices": [{"text": "ab", "logprobs": {"tokens": ["a", "b"]}}]})
    assert lp.tokens and lp.num_tokens == 2
    chat_role = bs.parse_chunk({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
    assert not chat_role.tokens
    chat = bs.parse_chunk({"choices": [{"delta": {"content": "x"}, "finish_reason": None}]})
    assert chat.tokens and chat.text == "x"
    err = bs.parse_chunk({"error": {"message": "engine failed", "type": "internal_error"}})
    assert err.error == "engine failed"
    assert bs.parse_chunk({"error": "plain"}).error == "plain"


# ---------------------------------------------------------------------------------------------------------------
# workload


def test_sharegpt_like_means() -> None:
    lengths = bs.sharegpt_like_lengths(20000, random.Random(0))
    prompts, outputs = [p for p, _ in lengths], [o for _, o in lengths]
    assert sum(prompts) / len(prompts) == pytest.approx(202, rel=0.03)
    assert sum(outputs) / len(outputs) == pytest.approx(179, rel=0.03)
    assert min(prompts + outputs) >= 4 and max(prompts + outputs) <= 1024
    assert bs.percentile(prompts, 50) < 202  # skewed like ShareGPT: median below mean
    # A small context clips each to half of it.
    small = bs.sharegpt_like_lengths(2000, random.Random(1), max_model_len=512)
    assert max(p + o for p, o in small) <= 512 and max(p for p, _ in small) == 256


def test_uniform_lengths_and_prompts() -> None:
    lengths = bs.uniform_lengths(500, random.Random(0), 100, 20, 0.5)
    assert all(50 <= i <= 150 and 10 <= o <= 30 for i, o in lengths)
    assert bs.uniform_lengths(3, random.Random(0), 8, 4, 0.0) == [(8, 4)] * 3
    specs = bs.build_requests([(6, 3)], random.Random(0), prompt_ids=True, vocab_size=50)
    assert len(specs[0].prompt) == 6 and all(0 <= t < 50 for t in specs[0].prompt)
    words = bs.build_requests([(6, 3)], random.Random(0))
    assert isinstance(words[0].prompt, str) and len(words[0].prompt.split()) == 6
    with pytest.raises(ValueError):
        bs.build_requests([(6, 3)], random.Random(0), prompt_ids=True)


def test_bodies_per_backend() -> None:
    spec = bs.RequestSpec("hello", 1, 7)
    ray = bs.build_body(bs.ClientConfig("http://x", model="m", backend="rayinfer"), spec)
    assert ray["ignore_eos"] is True and ray["stream"] is True and ray["max_tokens"] == 7
    assert ray["stream_options"] == {"include_usage": True}
    hf = bs.build_body(bs.ClientConfig("http://x", model="/ckpt", backend="transformers"), spec)
    assert "ignore_eos" not in hf and "stream_options" not in hf
    assert json.loads(hf["generation_config"]) == {"max_new_tokens": 7, "eos_token_id": -1, "do_sample": False}
    plain = bs.build_body(bs.ClientConfig("http://x", model="m", backend="openai",
                                          endpoint="/v1/chat/completions", extra_body={"top_k": 1}), spec)
    assert "ignore_eos" not in plain and plain["messages"][0]["content"] == "hello" and plain["top_k"] == 1


# ---------------------------------------------------------------------------------------------------------------
# end to end against a fake streaming server

FIRST_DELAY, STEP_DELAY = 0.06, 0.02


def _fake_app(tokens_per_chunk: int = 1, usage: bool = True, done: bool = True,
              events_per_write: int = 1) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("prompt") == "please fail":
            return web.json_response({"error": {"message": "boom", "type": "internal_error"}}, status=500)
        n = int(body["max_tokens"])
        include_usage = usage and (body.get("stream_options") or {}).get("include_usage")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(FIRST_DELAY)
        sent, pending = 0, b""
        while sent < n:
            k = 1 if sent == 0 else min(tokens_per_chunk, n - sent)
            if sent and not pending:
                await asyncio.sleep(STEP_DELAY * k * events_per_write)
            sent += k
            chunk = {"id": "x", "object": "text_completion",
                     "choices": [{"index": 0, "text": " tok" * k, "finish_reason": "length" if sent == n else None}]}
            pending += f"data: {json.dumps(chunk)}\n\n".encode()
            if sent == 1 or sent == n or pending.count(b"data:") == events_per_write:
                await response.write(pending[:9])  # split events across writes
                await response.write(pending[9:])
                pending = b""
        if include_usage:
            u = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}}
            await response.write(f"data: {json.dumps(u)}\n\n".encode())
        if done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/health", health)
    return app


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def _run_against(app: web.Application, specs, **kwargs):
    async def go():
        runner, url = await _serve(app)
        try:
            cfg = bs.ClientConfig(url, model="m", backend="rayinfer")
            return await bs.run_benchmark(cfg, specs, progress=False, **kwargs)
        finally:
            await runner.cleanup()

    return asyncio.run(go())


def test_end_to_end_one_token_per_chunk() -> None:
    specs = [bs.RequestSpec("hello world", 2, 8) for _ in range(6)] + [bs.RequestSpec("please fail", 2, 8)]
    metrics, results = _run_against(_fake_app(), specs, request_rate=50.0, seed=0,
                                     goodput={"ttft": 1000.0, "tpot": 500.0})
    assert metrics["completed"] == 6 and metrics["failed"] == 1
    assert "HTTP 500" in metrics["errors"][0]["error"] and "boom" in metrics["errors"][0]["error"]
    assert metrics["total_output_tokens"] == 48 and metrics["total_input_tokens"] == 18  # usage's counts
    assert metrics["output_tokens_from_usage"] and metrics["short_outputs"] == 0
    ok = [r for r in results if r.success]
    assert all(r.chunks == 8 and r.events == 8 and len(r.itl) == 7 for r in ok)
    # Only what the server's sleeps guarantee however busy the machine is (the arithmetic is tested above on
    # synthetic timings), plus relations that hold exactly.
    assert metrics["ttft_ms"]["median"] >= FIRST_DELAY * 1000
    assert metrics["tpot_ms"]["median"] >= STEP_DELAY * 1000 * 0.9
    assert metrics["itl_ms"]["median"] >= STEP_DELAY * 1000 * 0.5
    for r in ok:
        assert r.tpot == pytest.approx((r.e2el - r.ttft) / (r.output_tokens - 1))
        assert sum(r.itl) <= r.e2el - r.ttft + 1e-9  # one token per event: each gap counted once
    assert metrics["e2el_ms"]["mean"] >= (FIRST_DELAY + 7 * STEP_DELAY) * 1000
    assert metrics["good_requests"] == 6


def test_end_to_end_several_tokens_per_chunk_no_done_max_concurrency() -> None:
    specs = [bs.RequestSpec("hello", 1, 9) for _ in range(4)]
    metrics, results = _run_against(_fake_app(tokens_per_chunk=4, done=False), specs, max_concurrency=2)
    assert metrics["completed"] == 4 and metrics["total_output_tokens"] == 36
    r = results[0]
    assert r.chunks == 3 and len(r.itl) == 2  # 1 + 4 + 4 tokens; each ITL is its gap / 4
    assert r.itl[0] >= STEP_DELAY * 0.9  # its gap (4 sleeps) over its 4 tokens
    assert 4 * sum(r.itl) <= r.e2el - r.ttft + 1e-9  # a gap counted once, divided by the tokens it brought
    # two at a time: the second pair starts after the first ends
    starts = sorted(x.start for x in results)
    assert starts[2] - starts[0] >= FIRST_DELAY + 2 * 4 * STEP_DELAY - 0.01


def test_end_to_end_events_arriving_together_share_their_gap() -> None:
    specs = [bs.RequestSpec("hello", 1, 7) for _ in range(2)]
    metrics, results = _run_against(_fake_app(events_per_write=3), specs)
    r = results[0]
    assert r.events == 7 and r.chunks == 3 and r.output_tokens == 7  # writes of 1, 3, 3 events
    assert all(v >= STEP_DELAY * 0.9 for v in r.itl)
    assert 3 * sum(r.itl) <= r.e2el - r.ttft + 1e-9  # each write's gap shared by its 3 events
    assert metrics["tpot_ms"]["median"] / 1000 >= STEP_DELAY * 0.9


def test_end_to_end_counts_chunks_without_usage() -> None:
    specs = [bs.RequestSpec("hello", 1, 5) for _ in range(2)]
    metrics, _ = _run_against(_fake_app(usage=False), specs)
    assert metrics["completed"] == 2 and metrics["total_output_tokens"] == 10
    assert not metrics["output_tokens_from_usage"]


def test_connection_refused_is_a_failure() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = bs.ClientConfig(f"http://127.0.0.1:{port}", model="m")
    metrics, results = asyncio.run(bs.run_benchmark(cfg, [bs.RequestSpec("x", 1, 2)], progress=False))
    assert metrics["failed"] == 1 and results[0].error


def test_main_sweep_json_plots_and_compare(tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib", reason="installed with the 'dev' extra")
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder = {}

    def serve_forever():
        asyncio.set_event_loop(loop)
        holder["runner"], holder["url"] = loop.run_until_complete(_serve(_fake_app()))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve_forever, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        out_json = tmp_path / "a.json"
        code = bs.main(["--base-url", holder["url"], "--model", "m", "--num-prompts", "4", "--input-len", "5",
                        "--output-len", "4", "--sweep", "5,inf", "--json", str(out_json), "--label", "fake",
                        "--plot-dir", str(tmp_path / "plots"), "--goodput", "ttft:2000", "--disable-tqdm",
                        "--save-detailed", "--wait-for-server", "5"])
        assert code == 0
        record = json.loads(out_json.read_text())
        assert record["label"] == "fake" and [r["request_rate"] for r in record["runs"]] == [5.0, "inf"]
        assert all(r["completed"] == 4 and r["total_output_tokens"] == 16 for r in record["runs"])
        assert all(len(r["requests"]) == 4 and "request_goodput" in r for r in record["runs"])
        for name in ("ttft.png", "tpot.png", "throughput.png"):
            assert (tmp_path / "plots" / name).stat().st_size > 1000
        printed = capsys.readouterr().out
        assert "Successful requests:" in printed and "P99 TPOT (ms):" in printed and "Request goodput" in printed
        other = dict(record, label="other")
        (tmp_path / "b.json").write_text(json.dumps(other))
        assert bs.main(["--compare", str(out_json), str(tmp_path / "b.json"), "--plot-dir", str(tmp_path / "cmp")]) == 0
        assert (tmp_path / "cmp" / "ttft.png").is_file()
    finally:
        asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_cli_rejects_bad_combinations() -> None:
    with pytest.raises(SystemExit):
        bs.main(["--backend", "transformers", "--prompt-ids"])
    with pytest.raises(SystemExit):
        bs.main(["--compare", "a.json"])
    with pytest.raises(SystemExit):
        bs.main(["--goodput", "latency:5"])
