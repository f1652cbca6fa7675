"""Serving metrics: what each engine replica measures, and the Prometheus text `/metrics` renders from them.

Every engine replica keeps its own counters and latency histograms (`ReplicaMetrics`) and publishes a JSON
snapshot of them, plus its scheduler's gauges, to the metrics board; `/metrics`, on whichever replica answers,
merges the snapshots of all live replicas, so the numbers cover the whole deployment however many replicas Serve runs.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from rayinfer.scheduler.outputs import RequestOutput

# Seconds; spans sub-millisecond decode steps on a GPU to long CPU prefills.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0)
HISTOGRAMS = {
    "time_to_first_token_seconds": ("Time from the request's arrival at the engine replica to its first token.",
                                    LATENCY_BUCKETS),
    "inter_token_latency_seconds": ("Time between consecutive output deltas of one request.", LATENCY_BUCKETS),
    "time_per_output_token_seconds": ("Per request: time after the first token divided by the tokens after it.",
                                      LATENCY_BUCKETS),
    "e2e_request_latency_seconds": ("Time from a request's arrival to its last output.", REQUEST_LATENCY_BUCKETS),
}


class Histogram:
    """Bucket counts that merge by addition (one per replica into one per deployment)."""

    def __init__(self, bounds: tuple[float, ...], counts: list[int] | None = None, total: float = 0.0) -> None:
        self.bounds = bounds
        self.counts = counts if counts is not None else [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = total

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def add(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total

    def cumulative_buckets(self) -> list[tuple[str, int]]:
        labels = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        running, buckets = 0, []
        for label, count in zip(labels, self.counts):
            running += count
            buckets.append((label, running))
        return buckets


class ReplicaMetrics:
    """One engine replica's request counters and latency histograms; `snapshot` is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, float] = {"prompt_tokens": 0, "generation_tokens": 0}
        self.finished: dict[str, int] = {}
        self.histograms = {name: Histogram(bounds) for name, (_, bounds) in HISTOGRAMS.items()}

    def track(self) -> RequestTimer:
        return RequestTimer(self)

    def _observe(self, name: str, value: float) -> None:
        with self._lock:
            self.histograms[name].observe(value)

    def _count(self, name: str, value: float) -> None:
        with self._lock:
            self.counters[name] += value

    def _finish(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def snapshot(self, engine_stats: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return {
                "engine": {k: v for k, v in engine_stats.items() if isinstance(v, (int, float))},
                "counters": dict(self.counters),
                "finished": dict(self.finished),
                "histograms": {n: {"counts": list(h.counts), "total": h.total} for n, h in self.histograms.items()},
            }


class RequestTimer:
    """Follows one request's output deltas and records its latencies when tokens arrive and when it ends."""

    def __init__(self, metrics: ReplicaMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.num_tokens = 0
        self.finish_reason: str | None = None

    def on_delta(self, delta: RequestOutput) -> None:
        now = time.perf_counter()
        new_tokens = sum(len(c.token_ids) for c in delta.outputs)
        if self.first_token is None:
            self.metrics._count("prompt_tokens", len(delta.prompt_token_ids or ()))
        if new_tokens:
            if self.first_token is None:
                self.first_token = now
                self.metrics._observe("time_to_first_token_seconds", now - self.arrival)
            else:
                self.metrics._observe("inter_token_latency_seconds", now - self.last_token)
            self.last_token = now
            self.num_tokens += new_tokens
            self.metrics._count("generation_tokens", new_tokens)
        if delta.error:
            self.finish_reason = "error"
        elif delta.finished:
            reasons = [c.finish_reason for c in delta.outputs if c.finish_reason]
            self.finish_reason = reasons[0] if reasons else "stop"

    def on_end(self) -> None:
        now = time.perf_counter()
        self.metrics._observe("e2e_request_latency_seconds", now - self.arrival)
        if self.first_token is not None and self.num_tokens > 1:
            per_token = (self.last_token - self.first_token) / (self.num_tokens - 1)
            self.metrics._observe("time_per_output_token_seconds", per_token)
        self.metrics._finish(self.finish_reason or "abort")  # no final output: the client went away


class _SnapshotCollector(Collector):
    def __init__(self, snapshots: list[dict[str, Any]], model_name: str) -> None:
        self.snapshots = snapshots
        self.model_name = model_name

    def collect(self) -> Iterable[Any]:
        labels, values = ["model_name"], [self.model_name]

        def engine_sum(key: str) -> float:
            return float(sum(s["engine"].get(key, 0) for s in self.snapshots))

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"rayinfer_{name}", doc, labels=labels)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"rayinfer_{name}", doc, labels=labels)
            family.add_metric(values, value)
            return family

        num_blocks = engine_sum("num_blocks")
        used_blocks = num_blocks - engine_sum("num_free_blocks")
        yield gauge("num_engine_replicas", "Engine replicas reporting metrics.", len(self.snapshots))
        yield gauge("num_requests_running", "Requests in the running batch.", engine_sum("num_running"))
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", engine_sum("num_waiting"))
        yield gauge("num_sequences_running", "Sequences in the running batch (n and best_of run several per request).",
                    engine_sum("num_running_sequences"))
        yield gauge("num_sequences_waiting", "Sequences waiting to be scheduled.", engine_sum("num_waiting_sequences"))
        yield gauge("kv_cache_usage_ratio", "Share of KV cache blocks in use (0 to 1).",
                    used_blocks / num_blocks if num_blocks else 0.0)
        yield counter("num_preemptions", "Sequences preempted to free KV cache blocks.", engine_sum("num_preemptions"))
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      engine_sum("prefix_cache_queries"))
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache (not recomputed).",
                      engine_sum("prefix_cache_hits"))
        for key, doc in (("prompt_tokens", "Prompt tokens processed."), ("generation_tokens", "Tokens generated.")):
            yield counter(key, doc, sum(s["counters"].get(key, 0) for s in self.snapshots))

        finished = CounterMetricFamily("rayinfer_request_success", "Requests ended, by finish reason.",
                                       labels=[*labels, "finished_reason"])
        reasons: dict[str, int] = {}
        for snapshot in self.snapshots:
            for reason, count in snapshot["finished"].items():
                reasons[reason] = reasons.get(reason, 0) + count
        for reason, count in sorted(reasons.items()):
            finished.add_metric([*values, reason], count)
        yield finished

        for name, (doc, bounds) in HISTOGRAMS.items():
            merged = Histogram(bounds)
            for snapshot in self.snapshots:
                data = snapshot["histograms"].get(name)
                if data is not None:
                    merged.add(Histogram(bounds, data["counts"], data["total"]))
            family = HistogramMetricFamily(f"rayinfer_{name}", doc, labels=labels)
            family.add_metric(values, merged.cumulative_buckets(), merged.total)
            yield family


def render_prometheus(snapshots: list[dict[str, Any]], model_name: str) -> bytes:
    """The Prometheus text exposition of the replicas' merged snapshots."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshots, model_name))
    return generate_latest(registry)
