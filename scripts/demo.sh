#!/usr/bin/env bash
# One command: set up .venv from the project's files, then run the demo recipe (offline, shared data +
# packaged model). Extra arguments go to `debias-export run` (e.g. --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RECIPE=${DEBIAS_EXPORT_DEMO_RECIPE:-recipes/demo.yaml}
exec .venv/bin/debias-export run "$RECIPE" --overwrite "$@"
