"""scripts/pp_stage_check.py: two pipeline stages as two processes over gloo give the one-process tokens (its CUDA
run, over NCCL, is the GPU session's `pp` stage)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pp_stage_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("pp_stage_check", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pp_stage_check"] = module
    spec.loader.exec_module(module)
    return module


ppc = _load()


def test_two_stage_processes_over_gloo_give_the_one_process_tokens(tiny_checkpoint, tmp_path: Path) -> None:
    model_dir = tiny_checkpoint("llama", num_hidden_layers=3)  # splits 2 + 1: uneven
    out = tmp_path / "pp.json"
    command = [sys.executable, str(_SCRIPT), "--device", "cpu", "--model", str(model_dir), "--seqs", "2",
               "--prompt-len", "14", "--decode-steps", "3", "--p2p-tokens", "64", "--timeout", "60", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["tokens_match"] and result["backend"] == "gloo"
    assert result["stages"] == [[0, 2], [2, 3]] and result["sequences_left"] == [0, 0]
    assert len(result["reference_tokens"]) == 4 and all(len(step) == 2 for step in result["reference_tokens"])
    prefill, decode, bare = result["rows"]
    # Prompts of 14 and 17 tokens (the 14 crosses a block of 16 while decoding); float32 hidden + residual.
    assert (prefill["tokens"], decode["tokens"], bare["tokens"]) == (31, 2, 64)
    assert prefill["bytes"] == 31 * 2 * result["hidden_size"] * 4
    assert prefill["send_in_step_ms"] > 0 and decode["send_in_step_ms"] > 0 and bare["send_in_step_ms"] is None
    assert all(row["p2p_one_way_ms"] > 0 for row in result["rows"])
    assert "tokens check: PASS" in done.stdout and "| decode (median of 3) | 2 |" in done.stdout


def test_plans_feed_the_drawn_tokens_back_and_add_blocks_as_positions_need_them() -> None:
    plans = ppc.step_plans({0: [5] * 15, 1: [6] * 17}, decode_steps=2)
    prefill = next(plans)
    assert [c.new_blocks for c in prefill.chunks] == [[0], [1, 2]] and len(prefill.new_sequences) == 2
    first = plans.send([7, 8])
    assert [(c.token_ids, c.start_position, c.new_blocks) for c in first.chunks] == [([7], 15, []), ([8], 17, [])]
    second = plans.send([9, 10])
    assert [(c.token_ids, c.new_blocks) for c in second.chunks] == [([9], [3]), ([10], [])]  # position 16: a block
    finish = plans.send([11, 12])
    assert not finish.chunks and finish.finished_seq_ids == [0, 1]


def test_a_mismatch_is_reported_as_a_failure(tiny_checkpoint, capsys) -> None:
    args = argparse.Namespace(device="cpu", pp=2, seqs=2, prompt_len=14, decode_steps=1, p2p_tokens=[])
    stage = {"stage": [0, 2], "tokens": [[1, 2], [3, 4]], "sequences_left": 0, "sends": [(31, 0.2), (2, 0.1)],
             "p2p": {31: 0.2, 2: 0.1}, "dtype": "float32"}
    wrong = dict(stage, stage=[2, 3], tokens=[[1, 2], [3, 5]])
    summary = ppc.summarise(args, tiny_checkpoint("llama", num_hidden_layers=3), [[1, 2], [3, 4]], [stage, wrong])
    assert not summary["tokens_match"]
    ppc.print_report(summary)
    printed = capsys.readouterr().out
    assert "tokens check: FAIL" in printed and "[[1, 2], [3, 5]]" in printed
