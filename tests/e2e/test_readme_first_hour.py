"""The README's first-hour offline snippet runs as written, on the built-in demo model."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_offline_snippet_runs(capsys) -> None:
    offline = [block for block in _python_blocks("The first hour") if "LLM()" in block]
    assert len(offline) == 1
    exec(compile(offline[0], "README.md", "exec"), {})  # noqa: S102 - the README's own code, as a user runs it
    printed = capsys.readouterr().out.splitlines()
    assert re.search(r"[a-z]{3,}", " ".join(printed[:-1]))  # words from the demo model (its text may span lines)
    assert len(eval(printed[-1])) == 4  # noqa: S307 - the printed first four embedding values
