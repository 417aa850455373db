"""``debias-export verify``: check an export's files against its manifest(s)."""
from __future__ import annotations

import click

from .common import summary


@click.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def verify(path):
    """Re-hash every file of PATH (an export, or a bundle with hf/ and onnx/); exit 2 naming a bad file."""
    from ..export.manifest import find_artifacts, verify_manifest

    count = 0
    for artifact in find_artifacts(path):
        count += len(verify_manifest(artifact)["files"])
    summary(f"ok {path}: {count} file(s) match their manifest",
            next_step=f"debias-export validate {path} (re-runs the model and its ONNX graphs on new inputs)")
