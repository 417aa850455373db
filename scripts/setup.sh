#!/usr/bin/env bash
# Creates/refreshes .venv from the project's own files (pyproject.toml + constraints.txt).
# Idempotent: skips the install when neither file changed since the last successful set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${DEBIAS_EXPORT_ORT_EXTRA:-cpu}   # "gpu" installs onnxruntime-gpu instead
stamp=".venv/.setup-stamp"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$EXTRA"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[$EXTRA,test]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import debias_export, torch, transformers, onnxruntime, open_clip" \
  || { echo "set-up failed: see pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
