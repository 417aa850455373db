"""``debias-export reproduce``: re-run the recipe an export records and compare every artifact hash."""
from __future__ import annotations

import click

from ..core.errors import CheckFailed, DebiasError


class NotReproduced(CheckFailed):
    """The re-run's artifacts differ from the export's (exit 1)."""


@click.command("reproduce")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--keep", "keep_dir", default=None, type=click.Path(file_okay=False),
              help="Keep the re-run's output here (default: a temporary directory, removed afterwards).")
def reproduce(export_dir, keep_dir):
    """Re-run the recipe recorded in EXPORT_DIR's manifest (a `run` export) and compare every file's hash.

    Exit 0 when every artifact is identical, 1 listing what differs, 2 on bad input (not an export, no
    recorded recipe, the recipe fails).
    """
    import tempfile
    from pathlib import Path

    import yaml

    from ..export.manifest import compare_artifacts, verify_manifest
    from ..workflow.pipeline import run_recipe
    from ..workflow.recipe import expand_variants, parse_recipe

    manifest = verify_manifest(export_dir)  # a tampered export cannot be "reproduced"
    prov = manifest.get("provenance") or {}
    if "recipe_text" not in prov:
        raise DebiasError(f"{export_dir} records no recipe (made by `export`, or by a version before `reproduce`); "
                          "only `debias-export run` exports can be re-run")
    try:
        raw = yaml.safe_load(prov["recipe_text"])
    except yaml.YAMLError as exc:
        raise DebiasError(f"the recipe recorded in {export_dir} is not valid YAML: {str(exc).splitlines()[0]}") from None
    recipe = parse_recipe(raw, where=f"recipe recorded in {export_dir}")
    recipe.source = prov.get("recipe")  # as recorded: the re-run's provenance must match byte for byte
    runs = [r for r in expand_variants(recipe) if r.name == prov.get("recipe_name")]
    if not runs:
        raise DebiasError(f"the recipe recorded in {export_dir} has no variant {prov.get('recipe_name')!r}")
    run = runs[0]
    run.source = recipe.source
    with tempfile.TemporaryDirectory(prefix="debias-reproduce-") as tmp:
        out = Path(keep_dir) if keep_dir else Path(tmp) / "run"
        run.output.dir = str(out)
        click.echo(f"re-running {prov.get('recipe')} ({run.name}, seed {run.seed}) into {out}", err=True)
        run_recipe(run, overwrite=False, progress=False)
        diff = compare_artifacts(export_dir, out / "export")
    bad = {k: v for k, v in diff.items() if k != "same" and v}
    if not bad:
        click.echo(f"reproduced {export_dir}: all {len(diff['same'])} file(s) identical")
        return
    for kind, paths in bad.items():
        for rel in paths:
            click.echo(f"{kind}: {rel}")
    raise NotReproduced(f"not reproduced: {sum(map(len, bad.values()))} of {sum(map(len, diff.values()))} file(s) "
                        f"of {export_dir} differ (listed above)")
