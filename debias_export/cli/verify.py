"""``debias-export verify``: check an export's files against its manifest(s)."""
from __future__ import annotations

import click


@click.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def verify(path):
    """Re-hash every file of PATH (an export, or a bundle with hf/ and onnx/); exit 2 naming a bad file."""
    from ..export.manifest import find_artifacts, verify_manifest

    count = 0
    for artifact in find_artifacts(path):
        count += len(verify_manifest(artifact)["files"])
    click.echo(f"ok {path}: {count} file(s) match their manifest")
