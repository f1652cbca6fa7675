"""The demo model's text: Python's own documentation, as it ships with the interpreter.

Two sources, both on every Python install: the `pydoc_data` topics (the language reference pages `help()` shows)
and the docstrings of the standard library's modules, classes and functions (read with `ast`, nothing imported).
Documents are kept whole and ordered by name, so the corpus depends only on the Python version; every
`HELD_OUT_EVERY`-th document is held out for evaluation and never trained on.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

HELD_OUT_EVERY = 20
# Folders of the standard library that hold tests, demos or vendored code rather than documented API.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip"}
_MIN_DOC_CHARS = 40
_WORD = re.compile(r"[A-Za-z]+")


def _pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"topic:{name}", text.strip()) for name, text in sorted(topics.items()) if text.strip()]


def _docstrings(path: Path, rel: str) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= _MIN_DOC_CHARS:
                docs.append((f"{rel}:{getattr(node, 'name', '<module>')}", doc.strip()))
    return docs


def _stdlib_docstrings() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIPPED_DIRS.intersection(rel.parts[:-1]):
            continue
        docs.extend(_docstrings(path, rel.as_posix()))
    return docs


def documents() -> list[tuple[str, str]]:
    """Every (name, text) document, in a fixed order."""
    return _pydoc_topics() + _stdlib_docstrings()


def split_documents() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training documents, held-out documents), each a (name, text) pair."""
    train, held_out = [], []
    for i, document in enumerate(documents()):
        (held_out if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).append(document)
    return train, held_out


def split() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts)."""
    train, held_out = split_documents()
    return [text for _, text in train], [text for _, text in held_out]


def subject(name: str) -> str:
    """What a document is about, as a reader would name it: `for` (a pydoc topic), `json.dumps`, `os.path`."""
    if name.startswith("topic:"):
        return name.removeprefix("topic:")
    path, _, obj = name.partition(":")
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    return module if obj == "<module>" else f"{module}.{obj}"


def words(texts: list[str]) -> set[str]:
    """The lower-cased alphabetic words of `texts`: what "a real word" means when the demo model's output is judged."""
    return {w.lower() for text in texts for w in _WORD.findall(text)}
