"""Keeps a source checkout's root off sys.path.

The repository maps its folders under `rayinfer.*`, but the folders themselves are called `kernels/`,
`scheduler/`, ...; with the checkout root on sys.path (Python started there, or a Ray worker, which gets its
driver's working directory) they would also import as bare top-level packages, shadowing PyPI packages of
those names that other libraries probe for (transformers imports `kernels` if it can find one).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def drop_checkout_root_from_sys_path() -> None:
    if not ((_ROOT / "pyproject.toml").is_file() and (_ROOT / "kernels" / "__init__.py").is_file()):
        return  # an installed wheel, not a checkout
    root = str(_ROOT)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]


drop_checkout_root_from_sys_path()
