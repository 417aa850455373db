"""``debias-export compare``: do two runs of a recipe (another machine, CPU kind, lock) reach the same conclusions?"""
from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import CheckFailed
from ..core.fileio import refuse_existing
from .common import write_json


class ConclusionsDiffer(CheckFailed):
    """Some bootstrapped change of one run lies outside the other's interval (exit 1)."""


@click.command("compare")
@click.argument("run_a", type=click.Path(exists=True))
@click.argument("run_b", type=click.Path(exists=True))
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the comparison as JSON here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --json file.")
def compare(run_a, run_b, json_path, overwrite):
    """Compare two `debias-export run` outputs (directories or their summary.json), variant by variant.

    Every bootstrapped change both runs report -- MaxSkew per prompt set and held-out half, and each SAE control's
    edit-minus-control difference -- agrees when each run's point lies inside the other's 95% interval. Prints a
    markdown report; exit 0 when everything agrees, 1 when something does not (or a variant was built in one run
    only), 2 on bad input.
    """
    from ..workflow.compare_runs import compare_summaries, comparison_markdown, read_summary

    if json_path is not None:
        refuse_existing(Path(json_path), overwrite)
    cmp = compare_summaries(read_summary(run_a), read_summary(run_b))
    click.echo(comparison_markdown(cmp, str(run_a), str(run_b)), nl=False)
    if json_path is not None:
        write_json(Path(json_path), cmp.to_dict())
    if not cmp.ok:
        missing = sum(map(len, cmp.only_in.values()))
        raise ConclusionsDiffer(f"conclusions differ: {len(cmp.disagreements)} of {len(cmp.rows)} changes outside the "
                                f"other run's interval" + (f", {missing} variant(s) built in one run only" if missing else ""))
