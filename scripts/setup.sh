#!/usr/bin/env bash
# Creates/refreshes a venv from the project's own files (pyproject.toml + a lock file).
#   default lock (transformers 5): constraints.txt        -> .venv
#   compat lock (transformers 4.57 + optimum): constraints-compat.txt -> .venv-compat   (DEBIAS_EXPORT_LOCK=compat)
# Idempotent: skips the install when neither file changed since the last successful set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${DEBIAS_EXPORT_ORT_EXTRA:-cpu}   # "gpu" installs onnxruntime-gpu instead
case "${DEBIAS_EXPORT_LOCK:-default}" in
  default) VENV=.venv; LOCK=constraints.txt; EXTRAS="$EXTRA,test" ;;
  compat) VENV=.venv-compat; LOCK=constraints-compat.txt; EXTRAS="$EXTRA,test,optimum" ;;
  *) echo "error: DEBIAS_EXPORT_LOCK must be 'default' or 'compat', got '${DEBIAS_EXPORT_LOCK}'" >&2; exit 2 ;;
esac
stamp="$VENV/.setup-stamp"
want="$(cat pyproject.toml "$LOCK" | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  # the other lock's venv has the same torch build: hard links instead of a second 5 GB copy
  OTHER=.venv; [ "$VENV" = .venv ] && OTHER=.venv-compat
  if [ -x "$OTHER/bin/python" ]; then "$PY" scripts/share_dists.py "$OTHER" "$VENV" "$LOCK"; fi
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -c "$LOCK" -e ".[$EXTRAS]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
"$VENV/bin/python" -c "import debias_export, torch, transformers, onnxruntime, open_clip" \
  || { echo "set-up failed: see pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
