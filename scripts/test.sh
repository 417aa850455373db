#!/usr/bin/env bash
# One command: set up the venv of the chosen lock from the project's files, then run the test suite.
#   bash scripts/test.sh                              default lock (transformers 5), .venv
#   DEBIAS_EXPORT_LOCK=compat bash scripts/test.sh    compat lock (transformers 4.57 + optimum), .venv-compat
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=.venv
[ "${DEBIAS_EXPORT_LOCK:-default}" = compat ] && VENV=.venv-compat
exec "$VENV/bin/python" -m pytest "$@"
