"""`rayinfer generate` prints completions and reports bad arguments without a traceback."""
from __future__ import annotations

from pathlib import Path

from rayinfer.cluster.cli import main


def test_generate_prints_each_prompt(llama_dir: Path, capsys) -> None:
    code = main(["generate", "--model", str(llama_dir), "--max-tokens", "4", "--max-num-seqs", "2", "Hello", "World"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "--- prompt: 'Hello'" in printed and "--- prompt: 'World'" in printed
    assert printed.count("[4 tokens, finish_reason=length]") == 2


def test_generate_reads_prompts_file(llama_dir: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first line\n\nsecond line\n")
    assert main(["generate", "--model", str(llama_dir), "--max-tokens", "2", "--prompts-file", str(prompts)]) == 0
    assert capsys.readouterr().out.count("--- prompt:") == 2


def test_bad_engine_arg_is_a_clean_error(llama_dir: Path, capsys) -> None:
    assert main(["generate", "--model", str(llama_dir), "--block-size", "24", "Hello"]) == 2
    assert "block_size" in capsys.readouterr().err
