"""scripts/bench_quant_matmul.py: its CPU run on a tiny shape (the CUDA run is the GPU session's `quant` stage)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load():
    sys.path.insert(0, str(_SCRIPTS))  # the script imports cuda_timing from beside it
    spec = importlib.util.spec_from_file_location("bench_quant_matmul", _SCRIPTS / "bench_quant_matmul.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quant_matmul"] = module
    spec.loader.exec_module(module)
    return module


bqm = _load()


def test_shapes_parse_as_name_k_by_n() -> None:
    assert bqm.parse_shapes("qkv=4096x6144,down=14336X4096") == [("qkv", 4096, 6144), ("down", 14336, 4096)]
    assert [name for name, _, _ in bqm.parse_shapes(bqm.CUDA_SHAPES)] == ["qkv", "o", "gate_up", "down"]


def test_cpu_run_times_every_path_against_float(tmp_path: Path, capsys) -> None:
    out = tmp_path / "rows.json"
    args = ["--device", "cpu", "--shapes", "tiny=64x32", "--batch-sizes", "1,3", "--group-size", "32"]
    assert bqm.main(args + ["--markdown", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {row["M"] for row in rows} == {1, 3}
    formats = [row["format"] for row in rows if row["M"] == 1]
    assert formats[0] == "float32 F.linear" and "w4 cpu path" in formats and "fp8 cpu path (w8a16)" in formats
    assert all(row["ms"] > 0 for row in rows)
    assert all(row["x float"] == 1.0 for row in rows if row["format"] == "float32 F.linear")
    assert "| tiny | 1 | w4 cpu path |" in capsys.readouterr().out
