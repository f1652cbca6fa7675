#!/usr/bin/env bash
# Sets up (see setup.sh) and runs the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# AutoAWQ's packing utilities check our AWQ packer (tests/workers/test_quantized_checkpoints.py). Without its
# dependencies: it pins transformers < 5 and CUDA kernels, and the test loads only its pure-torch packing module.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "autoawq==0.2.9"
# The pytest entry point, not `python -m pytest`: that would put the repository root (and its bare
# `kernels/` folder) on sys.path.
exec .venv/bin/pytest -q "$@"
