#!/usr/bin/env bash
# Sets up (see setup.sh) and runs the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The pytest entry point, not `python -m pytest`: that would put the repository root (and its bare
# `kernels/` folder) on sys.path.
exec .venv/bin/pytest -q "$@"
