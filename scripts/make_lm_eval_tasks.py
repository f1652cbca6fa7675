"""Writes the data of the local lm-evaluation-harness tasks in `docs/lm_eval/` from the demo corpus's held-out split
(`demo_corpus.split()`: every 20th document of Python's own documentation, never trained on).

    python3 scripts/make_lm_eval_tasks.py            # rewrites docs/lm_eval/pydocs_heldout.jsonl, pydocs_complete.jsonl

- `pydocs_heldout.jsonl`: one line `{"text": ...}` per held-out document, whole, in corpus order (the
  `loglikelihood_rolling` task `pydocs_heldout`: word/byte perplexity, bits per byte).
- `pydocs_complete.jsonl`: `{"prompt": ..., "target": ...}`, one per held-out docstring whose first line holds a
  segment of at least `MIN_WORDS` words before its first "." (the `generate_until` task `pydocs_complete`,
  `until: ["\\n", "."]`). The prompt is the docstring's start up to the middle word of that segment, the target the
  rest of the segment, up to (not including) the ".", with its leading space: `prompt + target` is the document's
  own text.

Deterministic: the output depends only on the Python version the corpus is read from (its stdlib and pydoc topics),
which is printed; rerunning on the same version writes the same bytes.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "lm_eval"
MIN_WORDS = 6
_WORD = re.compile(r"\S+")


def completion_item(text: str) -> dict[str, str] | None:
    """(prompt, target) from the first line of `text`, or None when its first line has no usable segment."""
    first_line = text.split("\n", 1)[0]
    end = first_line.find(".")
    if end < 0:
        return None
    segment = first_line[:end]
    words = list(_WORD.finditer(segment))
    if len(words) < MIN_WORDS:
        return None
    cut = words[(len(words) + 1) // 2 - 1].end()  # prompt: the first ceil(n/2) words, no trailing space
    prompt, target = segment[:cut], segment[cut:]
    return {"prompt": prompt, "target": target}


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    _, held_out = demo_corpus.split()
    completions = [item for item in map(completion_item, held_out) if item is not None]
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "pydocs_heldout.jsonl", [{"text": text} for text in held_out])
    write_jsonl(args.out / "pydocs_complete.jsonl", completions)
    for name in ("pydocs_heldout.jsonl", "pydocs_complete.jsonl"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size} bytes")
    print(f"{len(held_out)} held-out documents, {len(completions)} completion items "
          f"(Python {platform.python_version()})")


if __name__ == "__main__":
    main()
