"""scripts/bench_serving_path.py: its argument defaults and the SSE timing on canned bytes (no engine, no server)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load():
    spec = importlib.util.spec_from_file_location("bench_serving_path", _SCRIPTS / "bench_serving_path.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving_path"] = module
    spec.loader.exec_module(module)
    return module


bsp = _load()


def _event(text: str, finish: str | None = None) -> bytes:
    chunk = {"id": "cmpl-1", "object": "text_completion", "model": "m",
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


def test_defaults_match_the_issue_workload() -> None:
    args = bsp.build_parser().parse_args([])
    assert (args.prompt_len, args.max_tokens, args.repeats, args.dtype) == (128, 64, 20, "float32")
    assert args.offline_executor == "uni" and args.model is None and args.serve_arg == []
    args = bsp.build_parser().parse_args(["--serve-arg=--max-num-seqs", "--serve-arg=8", "--offline-executor", "ray"])
    assert args.serve_arg == ["--max-num-seqs", "8"] and args.offline_executor == "ray"


def test_stream_token_counts_times_each_read_and_skips_done() -> None:
    first, second = _event("Hel"), _event("lo")
    reads = [
        (1.0, first[:10]),  # an event split across reads counts when it completes
        (1.5, first[10:]),
        (2.0, second + _event("", "length")),  # two token events in one read (an empty-text token counts)
        (2.5, b"data: [DONE]\n\n"),
    ]
    assert bsp.stream_token_counts(reads) == [(1.5, 1), (2.0, 2)]


def test_stream_token_counts_raises_on_an_error_event() -> None:
    with pytest.raises(RuntimeError, match="error event"):
        bsp.stream_token_counts([(0.0, b'data: {"error": {"message": "boom"}}\n\n')])


def test_request_timing_splits_a_multi_token_read() -> None:
    timing = bsp.request_timing(10.0, [(10.1, 1), (10.3, 1), (10.7, 2)])
    assert timing["ttft"] == pytest.approx(0.1)
    assert timing["itl"] == pytest.approx([0.2, 0.2, 0.2])
    assert timing["tpot"] == pytest.approx(0.6 / 3)
    assert timing["tokens"] == 4
    assert bsp.request_timing(0.0, [])["ttft"] is None


def test_summary_and_report_in_milliseconds() -> None:
    timings = [bsp.request_timing(0.0, [(0.05, 1), (0.07, 1)]), bsp.request_timing(0.0, [(0.06, 1), (0.09, 1)])]
    s = bsp.summary(timings)
    assert s["ttft_ms"]["median"] == pytest.approx(55.0)
    assert s["itl_ms"]["median"] == pytest.approx(25.0)
    assert s["tokens"] == [2, 2]
    text = bsp.report({"offline": s, "serving": s, "difference": {
        k: 0.0 for k in ("ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms", "tpot_p50_ms")}})
    assert "serving - offline" in text and "55.00" in text


def test_timed_runs_alternate_the_paths_and_drop_the_warmup() -> None:
    args = bsp.build_parser().parse_args(["--warmup", "1", "--repeats", "2", "--pause", "0", "--max-tokens", "2"])
    calls: list[str] = []

    def path(name: str):
        def run() -> dict:
            calls.append(name)
            return bsp.request_timing(0.0, [(0.01 * len(calls), 1), (0.02 * len(calls), 1)])
        return run

    first, second = bsp.timed_runs(args, path("offline"), path("served"))
    assert calls == ["offline", "served"] * 3  # one of each per round, in turn, warmup round included
    assert len(first) == len(second) == 2  # the warmup round is not kept
    assert [t["ttft"] for t in first] == pytest.approx([0.03, 0.05])
