"""``debias-export bench``: latency + FLOPs of patched vs unmodified encoders, interleaved."""
from __future__ import annotations

from pathlib import Path

import click

from ..core.choices import BENCH_EXPORTERS, ORT_OPT_LEVELS
from ..core.errors import ConfigError, DebiasError


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str) -> list[int]:
    try:
        out = [int(v) for v in _csv(value)]
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {value!r}") from None
    if not out or any(b < 1 for b in out):
        raise ConfigError(f"--batch-sizes must be positive integers, got {value!r}")
    return out


def random_sae_edits(adapter, modes: list[str], sites: list[str], expansion: int, n_neurons: int, seed: int = 0):
    """Synthetic SAE edits (random SAE, F = expansion * d) for latency/FLOPs work on random-weight models."""
    from ..edits.sae.edit import SAEEdit
    from ..workflow.testing import random_sae

    variants = {}
    for spec in modes:
        # "mode" uses every site in ``sites``; "mode@site" (e.g. "reconstruct@image.11") just that one
        mode, _, only = spec.partition("@")
        edits = []
        for i, site in enumerate([only] if only else sites):
            d = adapter.width(adapter.resolve_site(site).tower)
            sae = random_sae(d, expansion * d, seed=seed + i)
            neurons = [int(j * (expansion * d) // n_neurons) for j in range(n_neurons)]
            edits.append(SAEEdit(site=site, sae=sae, neurons=neurons, alpha=0.6, mode=mode,
                                 provenance={"synthetic": "random SAE for benchmarking"}))
        variants[spec] = edits
    return variants


def _load_export(path: str):
    """A recipe/export output dir: its patched model, via ``export.loading.load_patched`` when present."""
    try:
        from ..export.loading import load_patched
    except ImportError:
        raise DebiasError("--export needs debias_export.export.loading.load_patched, which is not available; "
                          "use --model with --edit instead") from None
    return load_patched(path)


@click.command("bench")
@click.option("--model", "model_spec", default=None, help="Hub id / local dir / tiny-clip[:seed] of the base model.")
@click.option("--arch", default=None, help="Real architecture with random weights: clip-vit-base-patch16, clip-vit-large-patch14-336, llava-1.5-7b.")
@click.option("--edit", "edit_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Edit folder (repeatable; each is one patched variant).")
@click.option("--export", "export_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Exported patched model dir; benchmarked against itself with its patches removed.")
@click.option("--random-sae", "random_modes", default=None,
              help="Synthetic SAE edit variants (random SAE), e.g. 'reconstruct,residual' or 'reconstruct@image.11'.")
@click.option("--site", "sites", default=None, help="Sites for --random-sae (default: last consumed block of each tower).")
@click.option("--expansion", default=8, show_default=True, help="SAE expansion for --random-sae (F = expansion * d).")
@click.option("--n-neurons", default=5, show_default=True, help="Neurons zeroed by --random-sae edits.")
@click.option("--towers", default=None, help="Comma-separated towers (default: the towers the edits touch).")
@click.option("--batch-sizes", default="1,8,32", show_default=True)
@click.option("--runtimes", default="torch,ort", show_default=True, help="torch, ort, torch-cuda, ort-cuda (or 'all').")
@click.option("--dtypes", default="fp32", show_default=True, help="fp32, fp16, int8 (int8: ort only, the fp32 graphs dynamically quantized with "
                   "the edit kept in fp32, as export --precision int8 writes them; unsupported pairs are skipped and recorded).")
@click.option("--reps", default=20, show_default=True, help="Timed interleaved repetitions per variant.")
@click.option("--warmup", default=3, show_default=True, help="Untimed interleaved warm-up calls per variant.")
@click.option("--threads", default=1, show_default=True, help="torch threads and ORT intra-op threads (fixed, recorded).")
@click.option("--opt-level", default="all", show_default=True, type=click.Choice(ORT_OPT_LEVELS),
              help="onnxruntime graph optimisation level.")
@click.option("--order", default="abab", show_default=True, type=click.Choice(["abab", "rotate"]),
              help="Interleaving: same variant order every round, or rotate the starting variant.")
@click.option("--exporter", default="dynamo", show_default=True, type=click.Choice(BENCH_EXPORTERS),
              help="ONNX exporter for the ort runtimes: torch.export-based (dynamo) or the legacy TorchScript tracer.")
@click.option("--no-flops", is_flag=True, help="Skip FLOPs counting.")
@click.option("--profile", is_flag=True, help="Add an ORT per-op-type profile of each variant.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def bench(model_spec, arch, edit_dirs, export_dir, random_modes, sites, expansion, n_neurons, towers, batch_sizes,
          runtimes, dtypes, reps, warmup, threads, opt_level, order, exporter, no_flops, profile, out_dir, overwrite) -> None:
    """Time patched vs unmodified (interleaved ABAB reps) and count FLOPs; write bench.json/.md/.png."""
    from ..bench import PatchSet, run_benchmark
    from ..bench.report import write_report
    from .common import load_model_spec, refuse_existing

    refuse_existing(Path(out_dir), overwrite)
    if reps < 1 or warmup < 0 or threads < 1:
        raise ConfigError("--reps and --threads must be >= 1 and --warmup >= 0")
    sources = sum(x is not None for x in (model_spec, arch, export_dir))
    if sources != 1:
        raise ConfigError("give exactly one of --model, --arch or --export")
    meta: dict = {"cli_params": dict(click.get_current_context().params)}
    if export_dir:
        adapter = _load_export(export_dir)
        found = PatchSet.discover("patched", adapter)
        found.uninstall(adapter.model)
        variants = {"patched": found}
        meta["export_dir"] = str(export_dir)
    else:
        if arch and arch.startswith("llava"):
            from ..bench.towers import random_llava_vision

            if arch != "llava-1.5-7b":
                raise ConfigError(f"unknown LLaVA architecture {arch!r}; known: llava-1.5-7b")
            adapter = random_llava_vision()
            meta["arch"] = arch
        elif arch:
            from ..adapters.real_configs import random_clip

            only = _csv(towers) if towers else []
            # one tower requested: build only it (ViT-L/14-336 alone is 1.2 GB of fp32 weights)
            adapter = random_clip(arch, tower=only[0] if len(only) == 1 else None)
            meta["arch"] = arch
        else:
            adapter = load_model_spec(model_spec)
        edit_sets: dict[str, list] = {}
        if edit_dirs:
            from ..edits.base import load_edit

            for i, d in enumerate(edit_dirs):
                name = Path(d).name if Path(d).name not in edit_sets else f"{Path(d).name}_{i}"
                edit_sets[name] = [load_edit(d)]
        if random_modes:
            site_list = _csv(sites) if sites else [adapter.default_site(t).name for t in adapter.towers()]
            synth = random_sae_edits(adapter, _csv(random_modes), site_list, expansion, n_neurons)
            edit_sets.update(synth)
            meta["synthetic_edits"] = {"sites": site_list, "expansion": expansion, "n_neurons": n_neurons}
        if not edit_sets:
            raise ConfigError("nothing to compare: give --edit, --random-sae or --export")
        variants = {name: PatchSet.compile(name, adapter, edits) for name, edits in edit_sets.items()}
    if towers:
        tower_list = _csv(towers)
    else:
        touched = {path for ps in variants.values() for path in ps.paths()}
        # a fold into an output projection / embeddings lies outside the blocks: its edit's site names the tower
        folded = {f["edit"]["site"].split(".")[0] for ps in variants.values() for f in ps.folds}
        tower_list = [t for t in adapter.towers()
                      if t in folded or any(p.startswith(adapter.blocks_path(t)) for p in touched)]
    rt = ["torch", "ort", "torch-cuda", "ort-cuda"] if runtimes == "all" else _csv(runtimes)
    result = run_benchmark(adapter, variants, tower_list, batch_sizes=_ints(batch_sizes), runtimes=rt,
                           dtypes=_csv(dtypes), reps=reps, warmup=warmup, threads=threads, opt_level=opt_level, order=order,
                           count_flops=not no_flops, profile=profile, log=lambda m: click.echo(m, err=True), meta=meta,
                           exporter=exporter)
    write_report(result, Path(out_dir), overwrite=overwrite)
    for h in result["headline"]:
        click.echo(f"{h['tower']:5s} {h['runtime']:9s} {h['dtype']} b={h['batch']:<3d} {h['variant']:12s} "
                   f"ratio_of_medians={h['ratio_of_medians']:.4f} paired={h['paired_median']:.4f} "
                   f"flops_ratio={h['flops_ratio'] if h['flops_ratio'] is None else round(h['flops_ratio'], 6)}")
    click.echo(f"wrote {out_dir}/bench.json, bench.md, bench_latency.png")
    if model_spec and edit_dirs:  # the natural next question after "what does it cost": "what does it buy"
        click.echo(f"next: debias-export export --model {model_spec} --edit {edit_dirs[0]} --out artifact, then "
                   "debias-export eval --model ... --patched artifact")
