#!/usr/bin/env bash
# The GPU check (issue #19), one prepared script for a machine with an NVIDIA GPU:
#   sets up .venv from the default lock with onnxruntime-gpu (scripts/setup.sh, DEBIAS_EXPORT_ORT_EXTRA=gpu), then
#   runs capture -> train-sae -> patch -> export -> validate -> bench on arch:clip-vit-base-patch16 and on LLaVA-1.5's
#   vision tower (CLIP ViT-L/14-336, read at layer -2) with CUDA torch, fp16 autocast, onnxruntime's CUDA EP, and
#   writes gpu_check.json + gpu_check.md under benchmarks/results/gpu-<UTC date>/ (about 5-8 minutes).
#
#   scripts/gpu_check.sh [OUT_DIR]
#   scripts/gpu_check.sh --dry-run [OUT_DIR]     (or GPU_CHECK_DRY_RUN=1) the same chain on the CPU with tiny
#                                                models and tiny settings, no set-up: what CI runs so it does not rot
# PYTHON (dry run) picks the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  exec "$PY" scripts/gpu_check.py --dry-run --out "${1:-${TMPDIR:-/tmp}/debias-gpu-check-dry-run}"
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "error: no NVIDIA GPU visible (nvidia-smi); run with --dry-run on a CPU machine" >&2
  exit 2
fi
nvidia-smi -L
DEBIAS_EXPORT_ORT_EXTRA=gpu bash scripts/setup.sh
# onnxruntime (CPU) and onnxruntime-gpu share one import name: a venv set up for the CPU first must hold only the GPU one.
if .venv/bin/pip show -q onnxruntime >/dev/null 2>&1; then
  .venv/bin/pip uninstall -y -q onnxruntime onnxruntime-gpu
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt onnxruntime-gpu
fi
exec .venv/bin/python scripts/gpu_check.py --out "${1:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)}"
