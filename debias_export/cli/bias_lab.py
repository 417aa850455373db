"""``debias-export bias-lab``: train (or reuse) the offline biased reference model and measure its bias."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import click

from ..errors import DebiasError
from .common import NON_NEGATIVE_INT, POSITIVE_INT, SEED, refuse_existing


@click.command("bias-lab")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory to create with the trained VisionTextDualEncoderModel (+ biaslab.json, report).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Shared data directory (default: $DEBIAS_EXPORT_DATA or ../shared/data).")
@click.option("--cache", "cache_root", type=click.Path(path_type=Path), default=None,
              help="Cache root (default: $DEBIAS_EXPORT_CACHE/biaslab or ~/.cache/debias-export/biaslab).")
@click.option("--epochs", type=POSITIVE_INT, default=None, help="Override the training epochs (changes the cache key).")
@click.option("--seed", type=SEED, default=None, help="Override the seed (changes the cache key).")
@click.option("--max-images", type=POSITIVE_INT, default=None, help="Train on a random subset of UTKFace (smoke runs).")
@click.option("-k", "--k", "k", default=50, show_default=True, type=POSITIVE_INT, help="Top-k for MaxSkew.")
@click.option("--shuffles", default=20, show_default=True, type=NON_NEGATIVE_INT, help="Shuffled-label repeats for the noise floor.")
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def bias_lab(out_dir: Path, data_dir: Path | None, cache_root: Path | None, epochs: int | None, seed: int | None,
             max_images: int | None, k: int, shuffles: int, threads: int | None, no_progress: bool, overwrite: bool) -> None:
    """Train the MiniLM + small-ViT dual encoder on UTKFace captions (cached) and report its social bias."""
    import torch

    from ..biaslab import BiasLabSettings, ensure_trained, measure_bias
    from ..eval.report import write_report

    refuse_existing(out_dir, overwrite)
    if threads:
        torch.set_num_threads(threads)
    overrides = {k_: v for k_, v in (("epochs", epochs), ("seed", seed), ("max_images", max_images)) if v is not None}
    settings = dataclasses.replace(BiasLabSettings(), **overrides)
    if settings.epochs < 1:
        raise DebiasError(f"--epochs must be >= 1, got {settings.epochs}")
    cached = ensure_trained(settings, data_dir, cache_root, progress=not no_progress, log=click.echo)
    info_file = cached / "biaslab.json"
    info = json.loads(info_file.read_text())
    if info.get("evaluation", {}).get("k") != k or info["evaluation"].get("shuffles") != shuffles:
        click.echo("bias-lab: measuring bias on FairFace 540 / PAIRS ...")
        res = measure_bias(cached, data_dir, k=k, shuffles=shuffles, seed=settings.seed)
        write_report(res, cached / "report", overwrite=True)
        info = json.loads(info_file.read_text())
    from ..export.manifest import atomic_output_dir

    with atomic_output_dir(out_dir, overwrite) as tmp:
        shutil.copytree(cached, tmp, dirs_exist_ok=True)
    ev = info["evaluation"]
    for key, e in ev.items():
        if key.startswith("max_skew_gender/"):
            click.echo(f"{key}@{k}: {e['real']:.3f} (shuffled labels {e['shuffled']:.3f} +- {e['shuffled_sd']:.3f}, "
                       f"{e['prompts']} prompts)")
    u = ev["utility"]
    click.echo(f"utility: gender zero-shot acc {u['gender_zero_shot_acc']:.3f}, age zero-shot acc "
               f"{u['age_zero_shot_acc']:.3f}, caption recall@10 {u['caption_recall@10']:.3f}")
    click.echo(f"wrote {out_dir}")
