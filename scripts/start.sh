#!/usr/bin/env bash
# Sets up (see setup.sh) and runs the main job: generation on the built-in tiny checkpoint.
# Extra arguments go to `rayinfer generate` (e.g. --model PATH --max-tokens 64 "a prompt").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
    set -- "The quick brown fox" "Once upon a time" "The capital of France is"
fi
exec .venv/bin/rayinfer generate "$@"
