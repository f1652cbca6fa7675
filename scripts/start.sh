#!/usr/bin/env bash
# Sets up (see setup.sh) and starts the main job: the OpenAI-compatible server on the built-in demo model
# (Ctrl-C stops it). Extra arguments go to `rayinfer serve`, e.g. --model PATH --port 8000 --tensor-parallel-size 2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rayinfer serve "$@"
