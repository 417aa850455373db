"""``debias-export bias-lab``: measure the shipped bias lab, or retrain it from its recipe (``--retrain``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from ..core.errors import DebiasError
from .common import NON_NEGATIVE_INT, POSITIVE_INT, SEED, refuse_existing

RECIPE_OVERRIDES = ("seed", "epochs", "max_images", "threads")


@click.command("bias-lab")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory to create: the lab as a loadable VisionTextDualEncoderModel + weights.safetensors, "
                   "recipe.json (with the measured metrics) and report/.")
@click.option("--retrain", is_flag=True,
              help="Train the lab from the shipped recipe instead of loading the shipped weights (cached per recipe).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Shared data directory (default: $DEBIAS_EXPORT_DATA or ../shared/data).")
@click.option("--cache", "cache_root", type=click.Path(path_type=Path), default=None,
              help="Cache root for retrained labs (default: $DEBIAS_EXPORT_CACHE/biaslab or ~/.cache/debias-export/biaslab).")
@click.option("--seed", type=SEED, default=None, help="With --retrain: another seed (an independently trained lab).")
@click.option("--epochs", type=POSITIVE_INT, default=None, help="With --retrain: override the recipe's epochs.")
@click.option("--max-images", type=POSITIVE_INT, default=None, help="With --retrain: train on a seeded subset of the training split (smoke runs).")
@click.option("--threads", type=POSITIVE_INT, default=None, help="With --retrain: override the recipe's torch thread count (changes results).")
@click.option("-k", "--k", "k", default=50, show_default=True, type=POSITIVE_INT, help="Top-k for MaxSkew.")
@click.option("--shuffles", default=20, show_default=True, type=NON_NEGATIVE_INT, help="Shuffled-label repeats for the noise floor.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def bias_lab(out_dir: Path, retrain: bool, data_dir: Path | None, cache_root: Path | None, seed: int | None,
             epochs: int | None, max_images: int | None, threads: int | None, k: int, shuffles: int,
             no_progress: bool, overwrite: bool) -> None:
    """The bias lab (frozen MiniLM text tower + small CLIP ViT trained on UTKFace label captions): measure its
    social bias on FairFace 540 / PAIRS; ``--retrain`` reproduces it from the recipe (same CPU: identical)."""
    from ..adapters.dual_encoder import DualEncoderAdapter
    from ..data.datasets import resolve_data_dir
    from ..eval.report import write_report
    from ..export.manifest import atomic_output_dir
    from ..workflow.biaslab import lab as lab_mod
    from ..workflow.biaslab.settings import BiasLabSettings

    refuse_existing(out_dir, overwrite)
    data_dir = resolve_data_dir(data_dir)  # a missing data folder fails before anything is loaded or trained
    given = {n: v for n, v in zip(RECIPE_OVERRIDES, (seed, epochs, max_images, threads)) if v is not None}
    if given and not retrain:
        raise DebiasError(f"--{'/--'.join(n.replace('_', '-') for n in given)} change the recipe: use them with --retrain")
    shipped = lab_mod.read_recipe()
    if retrain:
        settings = dataclasses.replace(BiasLabSettings.from_dict(shipped["settings"]), **given)
        folder = lab_mod.ensure_trained(settings, data_dir, cache_root, progress=not no_progress, log=click.echo)
    else:
        folder = lab_mod.ASSETS
        click.echo(f"bias-lab: shipped lab ({folder})")
    model, tokenizer, recipe = lab_mod.load_lab(folder)
    if retrain:
        recipe["reproduction"] = _compare_to_shipped(folder, settings, shipped, lab_mod)
        click.echo(f"bias-lab: {recipe['reproduction']['summary']}")
    click.echo("bias-lab: measuring bias on FairFace 540 / PAIRS ...")
    adapter = DualEncoderAdapter(model, source="biaslab" if not retrain else str(folder), processor=tokenizer)
    res, summary = lab_mod.measure_bias(adapter, data_dir, k=k, shuffles=shuffles, seed=0)
    recipe["evaluation"] = summary
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / lab_mod.WEIGHTS).write_bytes((folder / lab_mod.WEIGHTS).read_bytes())
        lab_mod.write_recipe(tmp, recipe)
        write_report(res, tmp / "report")
    for key, e in summary.items():
        if key.startswith("max_skew_gender/"):
            floor = "" if e["shuffled"] is None else f" (shuffled labels {e['shuffled']:.3f} +- {e['shuffled_sd']:.3f})"
            click.echo(f"{key}@{k}: {e['real']:.3f}{floor}, {e['prompts']} prompts")
    u = summary["utility"]
    click.echo(f"utility: gender zero-shot acc {u['gender_zero_shot_acc']:.3f}, age zero-shot acc "
               f"{u['age_zero_shot_acc']:.3f}, caption recall@10 {u['caption_recall@10']:.3f} "
               f"(chance {u['caption_recall@10_chance']:.3f})")
    click.echo(f"wrote {out_dir}")


def _compare_to_shipped(folder: Path, settings, shipped: dict, lab_mod) -> dict:
    """Is a retrained lab the shipped one? Bit-identical weights, or how far apart (another CPU kind)."""
    import torch

    from ..workflow.biaslab.model import read_trained

    if settings.to_dict() != shipped["settings"]:
        return {"same_recipe": False, "summary": "recipe differs from the shipped one (overrides): no comparison"}
    mine, ref = read_trained(folder / lab_mod.WEIGHTS), read_trained(lab_mod.ASSETS / lab_mod.WEIGHTS)
    if lab_mod.file_sha256(folder / lab_mod.WEIGHTS) == shipped["weights"]["sha256"]:
        return {"same_recipe": True, "identical": True, "summary": "retrained weights are bit-identical to the shipped weights"}
    diff = max(float((mine[n].float() - ref[n].float()).abs().max()) for n in ref)
    fp_mine = torch.tensor(lab_mod.read_recipe(folder)["fingerprint"]["image"])
    fp_ref = torch.tensor(shipped["fingerprint"]["image"])
    cos = float(torch.nn.functional.cosine_similarity(fp_mine, fp_ref, dim=-1).min())
    cpu = shipped["training"]["cpu"].get("model name"), lab_mod.read_recipe(folder)["training"]["cpu"].get("model name")
    return {"same_recipe": True, "identical": False, "max_abs_weight_diff": diff, "min_fingerprint_cosine": cos,
            "summary": f"retrained weights differ from the shipped ones (max |dw| {diff:.3g}, fingerprint embedding "
                       f"cosine >= {cos:.4f}; shipped trained on {cpu[0]}, this one on {cpu[1]})"}
