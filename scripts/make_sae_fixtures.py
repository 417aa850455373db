"""Build the SAE import fixtures with the real libraries (run once per library, in a venv that has it).

Each run writes ``tests/fixtures/sae/<case>/`` folders (see ``scripts/sae_fixtures/common.py``): the files the
library's own save function wrote, plus the library's own latents and reconstruction on a fixed batch. The
tests (``tests/test_sae_import_libraries.py``) import every case with ``debias_export.sae.load_any`` and
compare, without any of these libraries installed.

Usage (one venv per library; versions used for the committed fixtures in brackets)::

    /tmp/saelens6/bin/python scripts/make_sae_fixtures.py saelens      # sae-lens 6.54.12
    /tmp/saelens5/bin/python scripts/make_sae_fixtures.py saelens      # sae-lens 5.11.0
    /tmp/saelens4/bin/python scripts/make_sae_fixtures.py saelens      # sae-lens 4.4.5
    /tmp/dl/bin/python scripts/make_sae_fixtures.py dictionary_learning   # dictionary-learning 0.1.0
    /tmp/sparsify/bin/python scripts/make_sae_fixtures.py sparsify     # eai-sparsify 1.3.x
    /tmp/dl/bin/python scripts/make_sae_fixtures.py vlm                # sae-for-vlm / Prisma layouts

Each library's cases are named after it and its major version, so runs never overwrite each other's cases.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

# sparsify picks a Triton decoder when triton is installed, which needs a GPU; use its own eager fallback on CPU.
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sae_fixtures helpers beside this script

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sae"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("library", choices=["saelens", "dictionary_learning", "sparsify", "vlm"])
    ap.add_argument("--out", type=Path, default=ROOT)
    args = ap.parse_args()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.library == "saelens":
        import sae_lens

        major = int(sae_lens.__version__.split(".")[0])
        if major >= 6:
            from sae_fixtures import saelens6 as mod
        else:
            from sae_fixtures import saelens_old as mod
    elif args.library == "dictionary_learning":
        from sae_fixtures import dictionary_learning as mod
    elif args.library == "sparsify":
        from sae_fixtures import sparsify as mod
    else:
        from sae_fixtures import vlm as mod
    mod.build(args.out)


if __name__ == "__main__":
    main()
