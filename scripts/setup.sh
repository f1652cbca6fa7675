#!/usr/bin/env bash
# Creates .venv and installs rayinfer (editable) with Ray Serve and its test tools. On a machine without an NVIDIA GPU the
# CPU build of torch goes in first, so the `torch>=2.4` requirement does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${PIP[@]}" "torch>=2.4"
    else
        # RAYINFER_CPU_TORCH names the CPU wheel to use; the default is the one this project's machines carry.
        "${PIP[@]}" "${RAYINFER_CPU_TORCH:-torch==2.13.0}"
    fi
fi
"${PIP[@]}" -e ".[dev,serve]"
