"""Placement across Ray nodes: tensor-parallel ranks, and pipeline stages (one per node), spread over a real
two-node cluster (`two_node_cluster`, in tests/workers/conftest.py, shared by this module's tests) still give
transformers' greedy tokens, and a placement the cluster cannot meet fails with the reason."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayinfer.cluster import LLM

pytestmark = pytest.mark.timeout(240)

DRIVER = Path(__file__).with_name("two_node_driver.py")
PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "Once upon a time, in a small village"]
MAX_TOKENS = 16


def test_strict_spread_runs_each_rank_on_its_own_node_and_matches_transformers(
    two_node_cluster, llama_dir: Path, hf_greedy
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    result = _drive(two_node_cluster, llama_dir, prompts, {"tensor_parallel_size": 2})
    node_a, node_b = (result["resource_nodes"][name] for name in two_node_cluster.node_resources)
    assert node_a != node_b
    assert sorted(result["worker_nodes"]) == sorted([node_a, node_b]), "the two ranks must run on different nodes"
    assert result["worker_nodes"] == result["bundle_nodes"], "each rank runs in its own bundle's node"
    assert result["tokens"] == hf_greedy(llama_dir, prompts, MAX_TOKENS)


def test_pipeline_stages_run_one_per_node_and_match_transformers(
    two_node_cluster, tiny_checkpoint, coverage_prompts, hf_greedy, varied
) -> None:
    """PP=2 over 3 layers (split 2 + 1): each stage's bundle on a node of its own, hidden states handed from one
    node's stage to the other's every step, with chunked prefill and two micro-batches in flight."""
    model_dir = tiny_checkpoint("llama", num_hidden_layers=3)
    prompts = coverage_prompts(model_dir)
    reference = hf_greedy(model_dir, prompts, MAX_TOKENS)
    varied("two-node pp", reference)
    result = _drive(two_node_cluster, model_dir, prompts, {"pipeline_parallel_size": 2, "tensor_parallel_size": 1},
                    "--call-workers", "stage_timings")
    node_a, node_b = (result["resource_nodes"][name] for name in two_node_cluster.node_resources)
    assert node_a != node_b
    # TP=1: rank r is stage r, alone in bundle r.
    assert sorted(result["worker_nodes"]) == sorted([node_a, node_b]), "the two stages must run on different nodes"
    assert result["worker_nodes"] == result["bundle_nodes"], "each stage runs in its own bundle's node"
    steps = [timing[2] for timing in result["worker_calls"]["stage_timings"]]
    assert steps[0] > 0 and steps[0] == steps[1], f"both stages run every step: {steps}"
    assert result["tokens"] == reference


def _drive(cluster, model_dir: Path, prompts: list[list[int]], parallelism: dict, *extra: str) -> dict:
    """Greedy tokens from an engine with `parallelism` placed STRICT_SPREAD on the two nodes, a 16-token step budget
    splitting the longer prompts (chunked prefill); the driver's whole report (two_node_driver.py)."""
    engine_args = {**parallelism, "placement_strategy": "STRICT_SPREAD", "max_num_batched_tokens": 16}
    return cluster.run_driver(
        DRIVER, "--model", str(model_dir), "--prompts", json.dumps(prompts), "--max-tokens", str(MAX_TOKENS),
        "--engine-args", json.dumps(engine_args), "--node-resources", *cluster.node_resources, *extra,
    )


def test_spread_the_cluster_cannot_meet_fails_with_the_reason(llama_dir: Path, ray_session, monkeypatch) -> None:
    """On the session's one-node Ray, two ranks that must each have a node of their own cannot be placed: the
    engine says so, names the strategy, and leaves no placement group pending."""
    from ray.util import placement_group_table

    from rayinfer.workers import ray_executor

    if len([node for node in ray_session.nodes() if node["Alive"]]) != 1:
        pytest.skip("the session's Ray has more than one node")
    monkeypatch.setattr(ray_executor, "PLACEMENT_TIMEOUT_S", 3.0)
    before = set(placement_group_table())
    with pytest.raises(ValueError, match=r"cannot place 2 workers .* each on a node of its own "
                                         r"\(placement_strategy STRICT_SPREAD\)"):
        LLM(str(llama_dir), tensor_parallel_size=2, distributed_executor_backend="ray",
            placement_strategy="STRICT_SPREAD")
    ours = {pg_id: pg for pg_id, pg in placement_group_table().items() if pg_id not in before}
    assert ours and all(pg["state"] == "REMOVED" for pg in ours.values()), ours
