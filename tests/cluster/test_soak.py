"""scripts/soak.py for 60 seconds with 64 streams against the tiny model's server: every request ends, greedy
outputs equal the offline engine's, hostile requests get 4xx, and the server goes back to idle with an empty KV
cache."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="installed with the 'dev' extra")

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def _load():
    spec = importlib.util.spec_from_file_location("soak", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module
    spec.loader.exec_module(module)
    return module


def test_a_minute_of_mixed_and_hostile_traffic(server: str, llama_dir: Path, tmp_path: Path) -> None:
    soak = _load()
    out = tmp_path / "soak.json"
    code = soak.main(["--base-url", server, "--model", "tiny", "--checkpoint", str(llama_dir), "--duration", "60",
                      "--streams", "64", "--server-pid", str(os.getpid()), "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["problems"] == [], result
    kinds = result["by_kind"]
    assert kinds["greedy"]["ok"] > 0 and kinds["hostile"]["refused"] > 0 and sum(
        k.get("hung_up", 0) for k in kinds.values()) > 0, kinds  # every part of the mix ran
    assert result["idle_gauges"]["rayinfer_kv_cache_usage_ratio"] == 0
    assert result["rss_mb_before"] > 0  # the test's Serve replicas and workers are below this process


def test_worker_kills_need_the_server_pid_and_touch_only_its_descendants() -> None:
    soak = _load()
    with pytest.raises(SystemExit):
        soak.main(["--base-url", "http://127.0.0.1:1", "--model", "m", "--kill-worker-every", "5"])
    assert soak._pids("python", None) == []  # no server named: nothing is ever a target
    assert soak._below(os.getpid(), os.getppid()) and not soak._below(os.getppid(), os.getpid())
