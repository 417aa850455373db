"""``debias-export capture``: store a site's activations over labelled images or text prompts."""
from __future__ import annotations

from pathlib import Path

import click

from ..core.choices import CAPTURE_DTYPES, PRECISIONS, TOKEN_MODES
from ..core.errors import DebiasError
from .common import POSITIVE_INT, SEED, model_option


@click.command("capture")
@model_option
@click.option("--site", required=True, help="Site to read, e.g. image.11 or text.-1.resid_post.")
@click.option("--images", "images_csv", default=None,
              help="CSV with a file column and label columns (relative paths also looked up under the data dir).")
@click.option("--image-dir", default=None, help="Folder the file column is relative to (default: <csv dir>/images or <csv dir>).")
@click.option("--file-column", default="file", show_default=True, help="CSV column naming the image file.")
@click.option("--columns", default=None, help="Comma-separated label columns to keep (default: all).")
@click.option("--texts", "texts_path", default=None,
              help="Prompt file: .txt (one prompt per line), a CSV with a text (or prompt) column and label "
                   "columns (e.g. text,gender), or a template,concept CSV.")
@click.option("--prompt-pairing", type=click.Choice(["cross", "rows"]), default="cross", show_default=True,
              help="template,concept CSVs: every template x every concept, or one prompt per row.")
@click.option("--where", multiple=True, metavar="COL=V1[,V2]", help="Keep only rows whose COL is one of the values (repeatable).")
@click.option("--tokens", type=click.Choice(TOKEN_MODES), default="random-k", show_default=True,
              help="Which token positions to store per input.")
@click.option("--k", default=2, show_default=True, type=POSITIVE_INT, help="Positions per input for random-k (with replacement).")
@click.option("--batch-size", default=32, show_default=True, type=POSITIVE_INT)
@click.option("--shard-size", default=None, type=POSITIVE_INT, help="Inputs per shard (default 4096; 128 with --tokens all).")
@click.option("--dtype", type=click.Choice(CAPTURE_DTYPES), default="float32", show_default=True,
              help="Storage dtype of the activations.")
@click.option("--limit", default=None, type=POSITIVE_INT, help="Capture only the first N inputs (after --where).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the random-k draws.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Capture directory.")
@click.option("--overwrite", is_flag=True, help="Replace a capture with different settings in --out.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:i]",
              help="Where the tower runs (auto: this process's GPU if CUDA is there, else the CPU).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Compute precision: bf16 / fp16 autocast the tower's matmuls (weights stay fp32).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def capture(model_spec: str, site: str, images_csv: str | None, image_dir: str | None, file_column: str,
            columns: str | None, texts_path: str | None, prompt_pairing: str, where: tuple[str, ...], tokens: str, k: int, batch_size: int,
            shard_size: int | None, dtype: str, limit: int | None, seed: int, out_dir: Path, overwrite: bool,
            device: str, precision: str, no_progress: bool) -> None:
    """Capture SITE activations of MODEL over labelled images or prompts into shards under OUT (resumable).

    Runs as it is under `torchrun --nproc_per_node N` or `accelerate launch`: the shards are split between the
    processes, and rerunning the same command resumes an interrupted capture.
    """
    from ..capture import capture_activations
    from ..data.datasets import LabelledImages, TextPrompts, parse_where, resolve_data_path
    from ..sae.distributed import distributed_session
    from .common import load_model_spec, warn_unread_site

    if (images_csv is None) == (texts_path is None):
        raise DebiasError("give exactly one of --images CSV or --texts FILE")
    filt = parse_where(where) or None
    if images_csv is not None:
        cols = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
        source = LabelledImages(resolve_data_path(images_csv), image_dir=image_dir, file_column=file_column,
                                columns=cols, limit=limit, filter=filt)
    else:
        if image_dir is not None or columns is not None:
            raise DebiasError("--image-dir and --columns apply to --images only")
        source = TextPrompts(resolve_data_path(texts_path), limit=limit, filter=filt, pairing=prompt_pairing)
    with distributed_session(device) as (dist, dev):
        adapter = load_model_spec(model_spec)
        if dist.is_main:
            warn_unread_site(adapter, site)  # e.g. LLaVA's image.-1: captured, but not what the model uses
        adapter.model.to(dev)
        result = capture_activations(adapter, site, source, out_dir, tokens=tokens, k=k, batch_size=batch_size,
                                     seed=seed, shard_size=shard_size, dtype=dtype, overwrite=overwrite,
                                     progress=not no_progress, precision=precision, dist=dist)
    if dist.is_main:
        click.echo(f"{result.summary()}; next: debias-export train-sae --activations {out_dir} --out {out_dir}-sae "
                   "--steps 1000")
