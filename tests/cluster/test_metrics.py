"""Replica metrics: latency bookkeeping per request, merging across replicas, and the Prometheus text."""
from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client", reason="installed with the 'serve' extra")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rayinfer.cluster.metrics import LATENCY_BUCKETS, Histogram, ReplicaMetrics, render_prometheus  # noqa: E402
from rayinfer.scheduler.outputs import CompletionOutput, RequestOutput  # noqa: E402


def _delta(tokens: list[int], finished: bool = False, reason: str | None = None) -> RequestOutput:
    completion = CompletionOutput(index=0, text="x" * len(tokens), token_ids=tokens, finish_reason=reason)
    return RequestOutput(request_id="r", prompt="p", prompt_token_ids=[1, 2, 3], outputs=[completion], finished=finished)


def _families(text: bytes) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def _value(families: dict, name: str, suffix: str = "", **labels: str) -> float:
    for sample in families[name].samples:
        if sample.name == name + suffix and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise KeyError((name, suffix, labels))


def test_histogram_buckets_are_cumulative_and_merge_by_addition() -> None:
    a, b = Histogram((1.0, 2.0)), Histogram((1.0, 2.0))
    for value in (0.5, 1.5, 3.0):
        a.observe(value)
    b.observe(1.0)
    a.add(b)
    assert a.cumulative_buckets() == [("1.0", 2), ("2.0", 3), ("+Inf", 4)]
    assert a.total == pytest.approx(6.0)


def test_request_timer_records_tokens_and_latencies() -> None:
    metrics = ReplicaMetrics()
    timer = metrics.track()
    timer.on_delta(_delta([5]))
    timer.on_delta(_delta([6, 7]))
    timer.on_delta(_delta([8], finished=True, reason="length"))
    timer.on_end()
    snapshot = metrics.snapshot({"num_running": 0})
    assert snapshot["counters"] == {"prompt_tokens": 3, "generation_tokens": 4}
    assert snapshot["finished"] == {"length": 1}
    counts = {name: sum(h["counts"]) for name, h in snapshot["histograms"].items()}
    assert counts == {
        "time_to_first_token_seconds": 1,
        "inter_token_latency_seconds": 2,
        "time_per_output_token_seconds": 1,
        "e2e_request_latency_seconds": 1,
    }


def test_a_request_dropped_before_finishing_counts_as_aborted() -> None:
    metrics = ReplicaMetrics()
    timer = metrics.track()
    timer.on_delta(_delta([5]))
    timer.on_end()
    assert metrics.snapshot({})["finished"] == {"abort": 1}


def _snapshot(running: int, free: int, ttft: float) -> dict:
    metrics = ReplicaMetrics()
    metrics.histograms["time_to_first_token_seconds"].observe(ttft)
    metrics.counters["generation_tokens"] = 10
    engine = {"num_running": running, "num_waiting": 1, "num_running_sequences": 4 * running,
              "num_waiting_sequences": 2, "num_blocks": 100, "num_free_blocks": free,
              "num_preemptions": 2, "prefix_cache_queries": 50, "prefix_cache_hits": 30, "engine_id": "not-a-number"}
    return metrics.snapshot(engine)


def test_prometheus_text_merges_replicas_and_parses() -> None:
    families = _families(render_prometheus([_snapshot(3, 80, 0.05), _snapshot(1, 60, 0.5)], "tiny"))
    assert _value(families, "rayinfer_num_engine_replicas") == 2
    assert _value(families, "rayinfer_num_requests_running", model_name="tiny") == 4
    assert _value(families, "rayinfer_num_requests_waiting") == 2
    assert _value(families, "rayinfer_num_sequences_running") == 16  # requests and their sequences apart
    assert _value(families, "rayinfer_num_sequences_waiting") == 4
    assert _value(families, "rayinfer_kv_cache_usage_ratio") == pytest.approx(60 / 200)
    assert _value(families, "rayinfer_num_preemptions", "_total") == 4
    assert _value(families, "rayinfer_generation_tokens", "_total") == 20
    assert _value(families, "rayinfer_prefix_cache_queries", "_total") == 100
    assert _value(families, "rayinfer_prefix_cache_hits", "_total") == 60
    ttft = "rayinfer_time_to_first_token_seconds"
    assert _value(families, ttft, "_count") == 2
    assert _value(families, ttft, "_sum") == pytest.approx(0.55)
    assert _value(families, ttft, "_bucket", le="0.1") == 1
    assert _value(families, ttft, "_bucket", le="+Inf") == 2
    assert len([s for s in families[ttft].samples if s.name == ttft + "_bucket"]) == len(LATENCY_BUCKETS) + 1


def test_kv_cache_usage_is_zero_when_no_block_is_held_or_no_replica_reports() -> None:
    assert _value(_families(render_prometheus([_snapshot(0, 100, 0.1)], "m")), "rayinfer_kv_cache_usage_ratio") == 0
    empty = _families(render_prometheus([], "m"))
    assert _value(empty, "rayinfer_kv_cache_usage_ratio") == 0
    assert _value(empty, "rayinfer_num_requests_running") == 0
