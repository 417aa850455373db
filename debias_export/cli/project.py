"""``debias-export project``: fit a residual-projection edit (LEACE / mean difference) from a capture."""
from __future__ import annotations

from pathlib import Path

import click

from ..core.choices import EXPORT_FOLDS, PROJECTION_METHODS
from ..core.errors import ConfigError
from ..core.model_match import allow_mismatch as mismatch_allowed
from ..core.model_match import check_made_for, record_of
from .common import FiniteFloat, allow_mismatch_option, summary

METHODS = PROJECTION_METHODS


@click.command("project")
@click.option("--capture", "capture_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Capture directory with labelled inputs (from `debias-export capture`).")
@click.option("--column", required=True, help="Label column whose linear information is erased, e.g. gender.")
@click.option("--method", type=click.Choice(sorted(METHODS)), default="leace", show_default=True,
              help="LEACE (least-squares optimal, oblique) or the orthogonal span of group-mean differences.")
@click.option("--strength", default=1.0, show_default=True, type=FiniteFloat(0.0, 1.0), help="b: 1 erases exactly, 0 is the identity.")
@click.option("--amplify", default=0.0, show_default=True, type=FiniteFloat(), help="g: amplification of the --fair-from directions.")
@click.option("--fair-from", "fair_from", default=None, type=click.Path(path_type=Path, dir_okay=False),
              help="safetensors with raw fair directions [d, m]; orthonormalised against the bias subspace.")
@click.option("--keep", "keep", multiple=True,
              help="Label column whose linear information the erasure leaves intact (repeatable; LEACE only), e.g. "
                   "--keep age: erase gender without erasing age. Integer ages are binned as FairFace's age bins.")
@click.option("--no-center", is_flag=True,
              help="Drop the mean term (a linear map; needed to fold into bias-free output projections).")
@click.option("--fold", type=click.Choice(EXPORT_FOLDS), default="none", show_default=True,
              help="How `export` applies it: none = fused low-rank patch; site = into the capture site's Linear "
                   "(attn_out/mlp_out); output = into the tower's final projection (fitted on embeddings); "
                   "every_writer = into every write to the residual stream.")
@click.option("--model", "model_spec", default=None,
              help="Model the capture came from: checks the edit folds/patches cleanly (required for --fold output).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False), help="Edit folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing edit folder.")
@allow_mismatch_option
def project(capture_dir: Path, column: str, method: str, strength: float, amplify: float, fair_from: Path | None,
            keep: tuple[str, ...], no_center: bool, fold: str, model_spec: str | None, out_dir: Path, overwrite: bool,
            allow_mismatch: bool) -> None:
    """Fit a projection edit o' = o - b*A(o - mu) + g*F F^T o on CAPTURE labelled by COLUMN; write OUT."""
    import torch

    from ..capture.store import ActivationStore
    from ..edits import apply_edits
    from ..edits.projection import fit_from_capture, fold_projection, read_fair_directions
    from ..export import atomic_output_dir
    from .common import load_model_spec, refuse_existing

    refuse_existing(out_dir, overwrite)
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"--strength must be in [0, 1], got {strength}")
    if amplify != 0.0 and fair_from is None:
        raise ConfigError("--amplify needs --fair-from (there are no fair directions to amplify)")
    if fold == "output" and model_spec is None:
        raise ConfigError("--fold output fits in the embedding space and needs --model")
    store = ActivationStore(capture_dir)
    fair = read_fair_directions(fair_from) if fair_from else None
    adapter = load_model_spec(model_spec) if model_spec else None
    with mismatch_allowed(allow_mismatch):  # the model the capture was made with against --model (said once)
        if adapter is not None:  # before fitting
            check_made_for(f"the capture {capture_dir}", record_of(store.model_record), adapter, adapter.resolve_site(store.site))
        edit = fit_from_capture(store, column, method=METHODS[method], fold=fold, adapter=adapter, fair=fair,
                                strength=strength, amplify=amplify, center=not no_center, model=model_spec, keep=keep)
        if adapter is not None:
            # dry run on the model: a fold that cannot apply (bias-free projection with a mean term, a block
            # output for fold=site, a width mismatch) fails here, before anything is written
            handle = fold_projection(adapter, edit, mode=edit.fold) if edit.fold != "none" else apply_edits(adapter, edit)
            handle.remove()
    with atomic_output_dir(out_dir, overwrite) as tmp:
        edit.save(tmp)
    rank = 0 if edit.in_dirs is None else edit.in_dirs.shape[1]
    fair_rank = 0 if edit.fair is None else edit.fair.shape[1]
    with torch.no_grad():
        moved = float((edit.matrix() - torch.eye(edit.width, dtype=torch.float64)).norm())
    skipped = edit.provenance.get("unlabelled_skipped", 0)
    summary(f"fitted {edit.method} projection at {edit.site} on {edit.provenance['inputs']} inputs "
            + (f"({skipped} row(s) with a blank {column!r} label skipped) " if skipped else "") +
            f"({edit.provenance['activations']} activations, column {column}"
            + (f", keeping {', '.join(keep)}" if keep else "") + f"): rank {rank}, fair rank {fair_rank}, "
            f"b={edit.strength:g} g={edit.amplify:g} center={edit.center} fold={edit.fold}, |M - I|_F={moved:.3g} "
            f"-> {out_dir}",
            next_step=f"debias-export export --model {model_spec or 'MODEL'} --edit {out_dir} --out EXPORT_DIR "
                      f"(or: debias-export eval --model {model_spec or 'MODEL'} --edit {out_dir} --out REPORT_DIR)")
