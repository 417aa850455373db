"""``debias-export run RECIPE.yaml``."""
from __future__ import annotations

from pathlib import Path

import click

from ..workflow.recipe import load_recipe
from .common import allow_mismatch_option, summary


@click.command("run")
@click.argument("recipe_path", metavar="RECIPE.yaml")
@click.option("--out", default=None, help="Override output.dir of the recipe.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output directory.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@allow_mismatch_option
def run(recipe_path: str, out: str | None, overwrite: bool | None, no_progress: bool, allow_mismatch: bool) -> None:
    """Run a recipe end to end: capture, train-sae, probe, patch, export, validate (bench, eval)."""
    from ..core.model_match import allow_mismatch as mismatch_allowed
    from ..workflow.pipeline import run_recipe

    recipe = load_recipe(recipe_path)
    if out:
        recipe.output.dir = out
    with mismatch_allowed(allow_mismatch):  # a recipe's sae.path recorded for another model or site
        path = run_recipe(recipe, overwrite=overwrite, progress=not no_progress)
    summary(f"wrote {path}", files={"report": Path(path) / "report.md", "summary": Path(path) / "summary.json"},
            next_step=f"read {Path(path) / 'report.md'}; each variant's export is under {path}/<variant>/ "
                      f"(debias-export verify / validate / bench take it)")
