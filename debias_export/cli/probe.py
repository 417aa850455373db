"""``debias-export probe``: find social (group-specific) SAE neurons, DeBiasLens section 3.2."""
from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import DebiasError
from .common import POSITIVE_INT, FiniteFloat, summary


@click.command("probe")
@click.option("--capture", "capture_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Capture directory of labelled inputs (per-input mean activations + row labels).")
@click.option("--sae", "sae_dir", required=True, type=click.Path(path_type=Path),
              help="SAE folder (debias-export, SAELens, sparsify or dictionary_learning layout).")
@click.option("--hookpoint", default=None, help="Sub-folder of a multi-hookpoint sparsify SAE folder.")
@click.option("--column", required=True, help="Label column that defines the groups, e.g. gender.")
@click.option("--labels", "labels_csv", default=None, type=click.Path(path_type=Path, dir_okay=False),
              help="CSV with the label column (default: the capture's own row labels).")
@click.option("--groups", default=None, help="Comma-separated groups to compare (default: every label present).")
@click.option("--activations", "which", type=click.Choice(["mean", "output"]), default="mean", show_default=True,
              help="Per-input mean over tokens (DeBiasLens) or the pooled output token.")
@click.option("--tau", default=0.1, show_default=True, type=FiniteFloat(0.0, 1.0), help="A latent is frequent in a group when active on >= tau of it.")
@click.option("--top-n", default=1, show_default=True, type=POSITIVE_INT, help="Neurons kept per group.")
@click.option("--min-group-size", default=1, show_default=True, type=POSITIVE_INT)
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Report JSON.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report.")
def probe(capture_dir: Path, sae_dir: Path, hookpoint: str | None, column: str, labels_csv: Path | None,
          groups: str | None, which: str, tau: float, top_n: int, min_group_size: int, out_path: Path,
          overwrite: bool) -> None:
    """Probe the SAE latents of CAPTURE per COLUMN group and write the social neurons to OUT."""
    from ..analysis.probe import latents_from_capture, probe_social_neurons
    from ..sae.importers import load_any
    from .common import refuse_existing, write_json

    refuse_existing(out_path, overwrite)
    from ..capture.store import ActivationStore

    store = ActivationStore(capture_dir)
    width = store.width
    sae = load_any(sae_dir, d_in=width, hookpoint=hookpoint)
    latents, labels, sources = latents_from_capture(capture_dir, sae, column, which=f"{which}_activations",
                                                    labels_csv=labels_csv)
    sources["sae"] = str(sae_dir)
    group_list = [g.strip() for g in groups.split(",") if g.strip()] if groups else None
    if groups is not None and not group_list:
        raise DebiasError("--groups is empty")
    report = probe_social_neurons(latents, labels, tau=tau, top_n=top_n, min_group_size=min_group_size,
                                  groups=group_list, sources=sources)
    write_json(out_path, report)
    for g, info in report["groups"].items():
        picked = ", ".join(f"{n['index']} (mean {n['mean_activation']:.3g})" for n in info["neurons"]) or "none"
        click.echo(f"{column}={g}: n={info['n']} frequent={info['num_frequent']} specific={info['num_specific']} -> {picked}")
    if report["num_unlabelled"]:
        click.echo(f"skipped {report['num_unlabelled']} input(s) with a blank {column!r} label")
    picked = sorted({n["index"] for info in report["groups"].values() for n in info["neurons"]})
    summary(f"{len(picked)} social neuron(s) for {column}: {', '.join(map(str, picked)) or 'none'}",
            files={"report": out_path},
            next_step=(f"debias-export patch --model {(store.settings.get('model') or {}).get('source') or 'MODEL'} "
                       f"--sae {sae_dir} --probe-report {out_path} --out EDIT_DIR" if picked
                       else f"no neuron passed tau {tau:g}: lower --tau or capture more inputs"))
