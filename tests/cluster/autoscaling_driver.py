"""Takes the rayinfer Serve app on a running fake multi-node cluster through one scale-up / scale-down cycle.

Run by tests/cluster/test_autoscaling.py in its own process, because the pytest process may already hold a
local Ray instance. Prints a timestamped log, then one `SUMMARY {json}` line; exits non-zero when a phase
fails or times out.

    python tests/cluster/autoscaling_driver.py --address <ip>:6379 --http-port 8123
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any, Callable

import ray
import requests
from ray import serve

APP = "rayinfer"
MODEL = "tiny"
T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def engine_replicas() -> dict[str, int]:
    """Replica count per state ("RUNNING", "STARTING", ...) of the engine deployment."""
    app = serve.status().applications.get(APP)
    deployment = app.deployments.get("LLMServer") if app else None
    return {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()} if deployment else {}


def gpu_nodes() -> list[str]:
    """Ids of the alive nodes that advertise a GPU: the head has none, so these are the autoscaled workers."""
    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, state: Callable[[], Any]) -> float:
    """Polls `check` until it is true; logs `state` whenever it changes. Returns the seconds waited."""
    start, last = time.monotonic(), None
    while True:
        now = state()
        if now != last:
            log(f"  {what}: {now}")
            last = now
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no {what} after {timeout_s:.0f} s (last state: {now})")
        time.sleep(1)


class Load:
    """`clients` threads, each sending one completion after the other until stopped."""

    def __init__(self, url: str, clients: int, max_tokens: int) -> None:
        self.body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens,
                     "ignore_eos": True, "temperature": 0}
        self.url, self.ok, self.failures = url, 0, []
        self.stop_event, self.lock = threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        while not self.stop_event.is_set():
            try:
                reply = requests.post(self.url, json=self.body, timeout=120)
                full = reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == self.body["max_tokens"]
                outcome = None if full else f"HTTP {reply.status_code}: {reply.text[:200]}"
            except Exception as exc:  # a failed request is a finding, not a crash of the load
                outcome = repr(exc)
            with self.lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.failures.append(outcome)

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=150)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="GCS address of the fake cluster's head")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--upscale-timeout", type=float, default=150)
    parser.add_argument("--downscale-timeout", type=float, default=90)
    parser.add_argument("--node-removal-timeout", type=float, default=60)
    args = parser.parse_args()

    from rayinfer.cluster.serve_app import build_app
    from rayinfer.workers.tiny_checkpoint import default_tiny_model_dir
    from rayinfer.configs import EngineConfig

    summary: dict[str, Any] = {}
    ray.init(address=args.address, log_to_driver=False)
    log(f"connected: {len(ray.nodes())} node(s), resources {ray.cluster_resources()}")
    assert not gpu_nodes(), "a GPU node exists before any load"

    # Proxy on the head only: the clients talk to the head, and the worker node should hold only the replica.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": args.http_port})
    # device="cpu" explicitly: with "auto" the fake GPU would make the engine ask for a GPU bundle.
    config = EngineConfig(model=str(default_tiny_model_dir()), device="cpu", max_num_seqs=8)
    options = {"LLMServer": {
        "max_ongoing_requests": 4,
        "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
            "metrics_interval_s": 1, "look_back_period_s": 3, "upscale_delay_s": 2, "downscale_delay_s": 5,
        },
    }}
    serve.run(build_app(config, served_model_name=MODEL, deployment_options=options), name=APP, route_prefix="/")
    base = f"http://127.0.0.1:{args.http_port}"
    assert requests.get(f"{base}/health", timeout=30).status_code == 200
    summary["initial_replicas"] = engine_replicas().get("RUNNING", 0)
    log(f"app running: engine replicas {engine_replicas()}")

    peak = {"replicas": 0}

    def upscaled() -> bool:
        running = engine_replicas().get("RUNNING", 0)
        peak["replicas"] = max(peak["replicas"], running)
        return running == 2 and bool(gpu_nodes())

    log(f"load: {args.clients} clients, {args.max_tokens} tokens per request")
    with Load(f"{base}/v1/completions", args.clients, args.max_tokens) as load:
        summary["upscale_s"] = wait_for("2 engine replicas and a GPU node", upscaled, args.upscale_timeout,
                                        lambda: (engine_replicas(), len(gpu_nodes())))
        new_nodes = gpu_nodes()
        # The second replica's placement group must sit on the new node: that is why the node was added.
        on_new_node = [pg for pg in ray.util.placement_group_table().values()
                       if pg["state"] == "CREATED" and set(pg["bundles_to_node_id"].values()) & set(new_nodes)]
        summary["replica_pgs_on_new_node"] = len(on_new_node)
        time.sleep(5)  # requests now also reach the new replica: any failing there count in requests_failed
    summary.update(peak_replicas=peak["replicas"], gpu_nodes_joined=len(new_nodes), requests_ok=load.ok,
                   requests_failed=len(load.failures), failure_samples=load.failures[:5])
    log(f"load stopped: {load.ok} requests served, {len(load.failures)} failed")

    summary["downscale_s"] = wait_for("1 engine replica", lambda: engine_replicas() == {"RUNNING": 1},
                                      args.downscale_timeout, engine_replicas)
    summary["final_replicas"] = engine_replicas().get("RUNNING", 0)
    try:
        summary["node_removal_s"] = wait_for("idle GPU node removed", lambda: not gpu_nodes(),
                                             args.node_removal_timeout, lambda: len(gpu_nodes()))
    except TimeoutError as exc:
        log(str(exc))
        summary["node_removal_s"] = None
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
