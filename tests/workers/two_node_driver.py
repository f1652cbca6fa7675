"""Drives a Ray-executor engine on the two-node cluster of tests/workers/conftest.py (`two_node_cluster`).

Run by tests/workers/test_multinode_placement.py in its own process, because the pytest process may already drive
the session's local Ray. Generates greedy tokens with the given engine arguments (parallelism, placement strategy),
then prints one `RESULT {json}` line: the tokens, the Ray node each rank ran on, the node of each bundle of the
engine's placement group, the node holding each custom node resource, and what each rank answered to the
worker methods named by --call-workers (before the engine shuts down).

    python tests/workers/two_node_driver.py --address <ip>:<port> --model DIR --prompts '[[1, 2]]' \\
        --max-tokens 16 --engine-args '{"tensor_parallel_size": 2, "placement_strategy": "STRICT_SPREAD"}' \\
        --node-resources node_a node_b [--call-workers stage_timings]
"""
from __future__ import annotations

import argparse
import json

import ray
from ray.util import placement_group_table

from rayinfer.cluster import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of prompts as token id lists")
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--engine-args", required=True, help="JSON object of engine arguments")
    parser.add_argument("--node-resources", nargs="+", required=True)
    parser.add_argument("--call-workers", nargs="*", default=[], help="Worker methods (no arguments) to report")
    args = parser.parse_args()

    ray.init(address=args.address, log_to_driver=False)
    resource_nodes = {resource: node["NodeID"] for node in ray.nodes() if node["Alive"]
                      for resource in args.node_resources if resource in node["Resources"]}
    engine_args = {"dtype": "float32", "distributed_executor_backend": "ray", **json.loads(args.engine_args)}
    llm = LLM(args.model, **engine_args)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        prompts = [{"prompt_token_ids": ids} for ids in json.loads(args.prompts)]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        executor = llm.engine.executor
        worker_nodes = executor.call_workers("node_id")
        worker_calls = {method: executor.call_workers(method) for method in args.call_workers}
        bundles = placement_group_table(executor.placement_group)["bundles_to_node_id"]
    finally:
        llm.shutdown()
    print("RESULT " + json.dumps({
        "tokens": [out.outputs[0].token_ids for out in outputs],
        "worker_nodes": worker_nodes,
        "bundle_nodes": [bundles[index] for index in sorted(bundles)],
        "resource_nodes": resource_nodes,
        "worker_calls": worker_calls,
    }), flush=True)


if __name__ == "__main__":
    main()
