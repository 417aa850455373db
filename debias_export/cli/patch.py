"""``debias-export patch``: build an SAE neuron-zeroing edit for a model and save it as an edit folder."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from ..core.choices import SAE_MODES
from ..core.errors import ConfigError, DebiasError
from ..core.model_match import FINGERPRINT_KEY, model_fingerprint
from ..core.model_match import allow_mismatch as mismatch_allowed
from .common import FiniteFloat, FloatOrWord, allow_mismatch_option, check_site_read, load_model_spec, model_option, summary


def load_sae(path: str, hookpoint: str | None = None):
    """An SAE folder in any layout the importers know (``hookpoint``: one SAE of a folder of several)."""
    from ..sae.importers import load_any

    return load_any(path, hookpoint=hookpoint)


def read_probe_report(path: str) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DebiasError(f"cannot read probe report {path}: {exc}") from None
    if not isinstance(report, dict):
        raise ConfigError(f"probe report {path} has no 'groups' table (not a JSON object)")
    return report


def neurons_from_probe_report(path: str) -> list[int]:
    """Every group's neurons of a probe report (``{"groups": {name: {"neurons": [{"index": i}|i, ...]}}}``), in order."""
    report = read_probe_report(path)
    groups = report.get("groups")
    if isinstance(groups, dict):
        groups = list(groups.values())
    if not isinstance(groups, list):
        raise ConfigError(f"probe report {path} has no 'groups' table")
    neurons: list[int] = []
    for group in groups:
        for n in group.get("neurons", []) if isinstance(group, dict) else []:
            try:
                idx = int(n["index"] if isinstance(n, dict) else n)
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"probe report {path}: neuron entry {str(n)[:60]!r} has no integer 'index'") from None
            if idx not in neurons:
                neurons.append(idx)
    if not neurons:
        raise ConfigError(f"probe report {path} lists no neurons in any group")
    return neurons


def _show_value(value: float | list[float]) -> str:
    return "per neuron " + ", ".join(f"{v:.4g}" for v in value[:8]) + (" ..." if len(value) > 8 else "") \
        if isinstance(value, list) else str(value)


def parse_neurons(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"--neurons must be comma-separated integers, got {text!r}") from None


@click.command("patch")
@model_option
@click.option("--sae", "sae_dir", required=True, type=click.Path(exists=True, file_okay=False), help="SAE folder.")
@click.option("--hookpoint", default=None,
              help="Which SAE of a folder holding several (sub-folder such as h.0/seed1, or a Prisma .pt name).")
@click.option("--site", default=None, help="Edit site, e.g. image.11 (default: the site recorded in the SAE metadata).")
@click.option("--neurons", default=None, help="Comma-separated SAE latents to zero, e.g. 3,7.")
@click.option("--probe-report", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Take the neurons of every group of a probe report instead of --neurons.")
@click.option("--alpha", default=0.6, show_default=True, type=FiniteFloat(0.0, 1.0), help="Mixing weight a.")
@click.option("--value", default=0.0, show_default=True, type=FloatOrWord("mean"),
              help="Value v the neurons are set to: a number, or 'mean' (with --probe-report): each neuron's "
                   "group-balanced mean activation recorded by the probe (mean ablation).")
@click.option("--mode", default="reconstruct", show_default=True, type=click.Choice(SAE_MODES))
@click.option("--no-prune", is_flag=True, help="Apply at every token, not only the positions the output reads.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Edit folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--allow-unread-site", is_flag=True,
              help="Save an edit at a block the model never reads (LLaVA's image.-1: it reads image.-2) with a warning "
                   "instead of refusing it; such an edit changes nothing.")
@allow_mismatch_option
def patch(model_spec, sae_dir, hookpoint, site, neurons, probe_report, alpha, value, mode, no_prune, out_dir, overwrite,
          allow_unread_site, allow_mismatch):
    """Build an SAE edit, check it compiles into the model, save it (edit_config.json + edit.safetensors)."""
    from ..edits import SAEEdit, apply_edits
    from ..export.manifest import atomic_output_dir

    if (neurons is None) == (probe_report is None):
        raise ConfigError("give exactly one of --neurons and --probe-report")
    chosen = parse_neurons(neurons) if neurons is not None else neurons_from_probe_report(probe_report)
    if value == "mean":
        from ..analysis.probe import values_from_report

        if probe_report is None:
            raise ConfigError("--value mean reads each neuron's mean activation from a probe report: give --probe-report")
        value = values_from_report(read_probe_report(probe_report), chosen)
    sae = load_sae(sae_dir, hookpoint)
    site = site or sae.cfg.metadata.get("site")
    if not site:
        raise ConfigError(f"--site is required: the SAE at {sae_dir} records no site in its metadata")
    adapter = load_model_spec(model_spec)
    check_site_read(adapter, site, allow_unread_site)  # an edit the model never sees is a silently wrong result
    edit = SAEEdit(site=site, sae=sae, neurons=chosen, value=value, alpha=alpha, mode=mode, prune=not no_prune,
                   model=model_spec, provenance={"sae_dir": str(sae_dir), "hookpoint": hookpoint,
                                                 "probe_report": probe_report, FINGERPRINT_KEY: model_fingerprint(adapter)})
    with mismatch_allowed(allow_mismatch), warnings.catch_warnings():  # recorded model / site against this model
        warnings.filterwarnings("ignore", message=".*lies after the layer")  # said once above (--allow-unread-site)
        apply_edits(adapter, edit).remove()  # fail now (width, site, layer) rather than at export time
    with atomic_output_dir(Path(out_dir), overwrite) as tmp:
        edit.save(tmp)
    shown = ", ".join(map(str, chosen[:8])) + (" ..." if len(chosen) > 8 else "")
    summary(f"saved {mode} edit of {len(chosen)} neuron(s) ({shown}) at {adapter.resolve_site(site).name} "
            f"(alpha {alpha}, value {_show_value(value)}) to {out_dir}",
            next_step=f"debias-export export --model {model_spec} --edit {out_dir} --out EXPORT_DIR "
                      f"(or measure it first: debias-export eval --model {model_spec} --edit {out_dir} --out REPORT_DIR)")
