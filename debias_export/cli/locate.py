"""``debias-export locate``: layer-wise bias curves (logit lens) and component attribution."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..core.choices import TOWERS
from ..core.errors import DebiasError
from .common import POSITIVE_INT, SEED, FiniteFloat, model_option, summary


def label_captions(rows: list[dict], columns: tuple[str, ...]) -> tuple[list[str], dict[str, list[str]]]:
    """Unique captions naming each face's labels (several templates), with the labels they name.

    Text-tower decodability and attribution need labelled texts; captions built from the image labels
    carry exactly the attributes under study. Duplicates are dropped so no caption sits in both the
    probe's train and test split."""
    from ..data.captions import CAPTION_TEMPLATES, label_caption

    seen: dict[str, dict[str, str]] = {}
    for template in CAPTION_TEMPLATES:
        for r in rows:
            text = label_caption(r, template)
            if text is not None and text not in seen:
                seen[text] = {c: r[c] for c in columns}
    if not seen:
        raise DebiasError("text-tower locate builds labelled captions from a Male/Female 'gender' column; the data has none")
    texts = list(seen)
    return texts, {c: [seen[t][c] for t in texts] for c in columns}


def _labels_csv(data: str) -> Path:
    """``--data`` as given (relative to the working directory), else under the data dir: ``fairface540`` works anywhere."""
    from ..data.datasets import default_data_dir, resolve_data_path

    path = resolve_data_path(data)
    if path.is_dir():
        path = path / "labels.csv"
    if not path.is_file():
        try:
            where = f"; relative paths are also looked up under the data dir {default_data_dir()}"
        except DebiasError:
            where = ""
        raise DebiasError(f"no labels CSV at {path} (--data takes a folder with labels.csv, or the CSV itself{where})")
    return path


def _default_prompts(labels_csv: Path) -> Path:
    """Neutral occupation prompts next to the data set, else in the shared data dir."""
    from ..data.datasets import default_data_dir

    local = labels_csv.parent.parent / "prompts" / "occupations.csv"
    if local.is_file():
        return local
    return default_data_dir() / "prompts" / "occupations.csv"


@click.command("locate")
@model_option
@click.option("--tower", type=click.Choice(TOWERS), default="image", show_default=True)
@click.option("--data", "data", required=True, help="Folder with labels.csv + images/ (e.g. fairface540), or the CSV.")
@click.option("--column", "columns", multiple=True, required=True, help="Attribute column (repeatable); the first is ablated.")
@click.option("--prompts", "prompts_path", default=None, help="Neutral prompts (.txt or template,concept CSV) for MaxSkew@k.")
@click.option("--k", default=10, show_default=True, type=POSITIVE_INT, help="Retrieval depth of MaxSkew@k.")
@click.option("--limit", default=None, type=POSITIVE_INT, help="Use only the first N images.")
@click.option("--heads/--no-heads", default=True, show_default=True, help="Also ablate each attention head separately.")
@click.option("--attribution/--no-attribution", default=True, show_default=True, help="Run component attribution.")
@click.option("--direction", type=click.Choice(["write", "stream"]), default="write", show_default=True,
              help="Attribute subspace ablated per component: its own write's group-mean differences, or the stream's.")
@click.option("--pairs/--no-pairs", "use_pairs", default=True, show_default=True,
              help="Per-layer PAIRS gender confidence gap (needs pairs/ in the shared data and a text tower).")
@click.option("--test-fraction", default=0.3, show_default=True, type=FiniteFloat(0.0, 1.0, min_open=True, max_open=True), help="Held-out share for the probes.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--batch-size", default=64, show_default=True, type=POSITIVE_INT)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder (locate.json, locate.png).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def locate(model_spec: str, tower: str, data: str, columns: tuple[str, ...], prompts_path: str | None, k: int,
           limit: int | None, heads: bool, attribution: bool, direction: str, use_pairs: bool, test_fraction: float, seed: int, batch_size: int,
           out_dir: Path, overwrite: bool) -> None:
    """Where does the bias of MODEL's TOWER come from? Curves per block and a ranking of components."""
    import torch

    from ..analysis.locate import locate_bias
    from ..data.datasets import LabelledImages, TextPrompts, resolve_data_path
    from .common import load_model_spec, refuse_existing, write_json

    if not 0.0 < test_fraction < 1.0:
        raise DebiasError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if k < 1:
        raise DebiasError(f"--k must be >= 1, got {k}")
    refuse_existing(out_dir, overwrite)
    start = time.time()
    images = LabelledImages(_labels_csv(data), columns=list(columns), limit=limit)
    skipped = images.drop_unlabelled(columns)  # a blank label is not a group: the rows are skipped, as probe does
    if skipped:
        click.echo(f"skipped {skipped} image(s) with a blank {'/'.join(columns)} label", err=True)
    if len(images) < 4:
        raise DebiasError(f"locate needs at least 4 labelled images, got {len(images)}")
    adapter = load_model_spec(model_spec)
    prompts = None  # models without a text tower (LLaVA) have no retrieval metric to score prompts with
    if "text" in adapter.towers():
        prompts = TextPrompts(resolve_data_path(prompts_path) if prompts_path else _default_prompts(images.csv_path))
    parts = []
    for pil, _ in images.batches(batch_size):
        parts.append(adapter.prepare_images(pil))
    inputs = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    labels = {c: [r[c] for r in images.rows] for c in columns}
    captions = label_captions(images.rows, columns) if tower == "text" else None
    pairs = None
    if use_pairs and prompts is not None:
        from ..data.datasets import default_data_dir
        from ..eval.retrieval import EvalData

        if (default_data_dir() / "pairs" / "labels.csv").is_file():
            pairs = EvalData.load(adapter, default_data_dir(), prompt_sets=[], fairface=False)
        else:
            click.echo(f"no PAIRS data under {default_data_dir()}; skipping the confidence-gap curve", err=True)
    report = locate_bias(adapter, tower, inputs, labels, prompts.texts if prompts else [], column=columns[0], k=k, heads=heads,
                         attribution=attribution, test_fraction=test_fraction, seed=seed, batch_size=batch_size,
                         direction=direction, progress=lambda msg: click.echo(msg, err=True), captions=captions,
                         pairs=pairs)
    report.update(model=model_spec, data=str(images.csv_path), prompts=str(prompts.path) if prompts else None,
                  unlabelled_skipped=skipped, seconds=round(time.time() - start, 2))
    from ..export.manifest import atomic_output_dir

    directions = report.pop("directions", None)
    if directions is not None:
        report["fair_direction"] = {"file": "directions.safetensors", "fair_components": directions["fair_components"],
                                    "bias_components": directions["bias_components"], "width": int(directions["fair"].numel())}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        if directions is not None:
            from safetensors.torch import save_file

            # one metadata key: safetensors writes several in hash-map order (byte-identical reruns)
            save_file({"fair": directions["fair"].contiguous()}, str(tmp / "directions.safetensors"),
                      metadata={"debias_export": json.dumps({"kind": "fair_direction", "tower": tower, "column": columns[0],
                                                             "model": model_spec, **report["fair_direction"]}, sort_keys=True)})
        write_json(tmp / "locate.json", report)
        plot_locate(report, str(tmp / "locate.png"))
    _summary(report, out_dir)


def _summary(report: dict, out_dir: Path) -> None:
    for row in report["layers"]:
        accs = ", ".join(f"{c} acc {v:.2f}" for c, v in row["probe_accuracy"].items() if v is not None)
        skews = ", ".join(f"{c} MaxSkew {v:.3f}" for c, v in row["max_skew"].items() if v is not None)
        gap = f"; PAIRS gender gap {row['pairs_gender_gap']['mean']:.3f}" if "pairs_gender_gap" in row else ""
        click.echo(f"block {row['layer']:>2}: {accs}{'; ' if accs else ''}{skews}{gap}")
    comps = report.get("components") or []
    for r in comps[:5]:
        skew = "" if r["bias_effect"] is None else f"skew drop {r['bias_effect']:+.3f}, "
        click.echo(f"{r['component']:>12}: {r['role']}, {skew}acc drop {r['decodability_effect']:+.3f}, "
                   f"separation drop {r['separation_effect']:+.4f}")
    files = {"report": out_dir / "locate.json", "plot": out_dir / "locate.png"}
    if report.get("fair_direction"):
        files["fair direction"] = out_dir / "directions.safetensors"
    top = comps[0]["component"] if comps else None
    summary(f"located in {report['seconds']} s" + (f"; most {comps[0]['role']} component: {top}" if top else ""), files=files,
            next_step=(f"debias-export project --capture CAPTURE --column {report['column']} --fair-from "
                       f"{out_dir / 'directions.safetensors'} --amplify 0.5 --out EDIT_DIR" if report.get("fair_direction")
                       else f"debias-export capture --model {report.get('model', 'MODEL')} --site SITE ... at the block "
                            f"where the curves peak, then project or train-sae"))


def plot_locate(report: dict, path: str, top: int = 15) -> None:
    """Curves (probe accuracy, MaxSkew@k, PAIRS confidence gap per layer) and the top components, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = report.get("components") or []
    pairs = "pairs_gender_gap" in report["layers"][0]
    n = 2 + pairs + bool(comps)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4))
    xs = [r["layer"] for r in report["layers"]]
    for c in report["layers"][0]["max_skew"]:
        acc = [r["probe_accuracy"][c] for r in report["layers"]]
        if acc[0] is not None:
            axes[0].plot(xs, acc, marker="o", label=f"{c} (chance {report['chance'][c]:.2f})")
        skews = [r["max_skew"][c] for r in report["layers"]]
        if skews[0] is not None:
            axes[1].plot(xs, skews, marker="o", label=c)
        else:
            axes[1].plot(xs, [r["between_group_ratio"][c] for r in report["layers"]], marker="o", label=c)
    axes[0].set(title=f"{report['tower']} tower: held-out probe accuracy (lens)", xlabel="block", ylabel="accuracy")
    if report["layers"][0]["max_skew"][report["column"]] is not None:
        axes[1].set(title=f"MaxSkew@{report['k']} of lens embeddings", xlabel="block", ylabel="MaxSkew")
    else:  # no text tower (LLaVA): the bias metric is the groups' share of the lens embeddings' variance
        axes[1].set(title="between-group variance share (lens)", xlabel="block", ylabel="share")
    if pairs:  # RES-FAIR's "fair label, skewed confidence": counterfactual gaps through the lens
        gaps = report["layers"][0]["pairs_gender_gap"]
        for section in gaps:
            axes[2].plot(xs, [r["pairs_gender_gap"][section] for r in report["layers"]], marker="o", label=section,
                         linewidth=2.5 if section == "mean" else 1.0)
        axes[2].set(title="PAIRS gender confidence gap (lens)", xlabel="block", ylabel="mean max gap")
    for ax in axes[:2 + pairs]:
        ax.legend(fontsize=8)
        ax.set_xticks(xs)
    if comps:
        shown = comps[:top]
        key = "bias_effect" if shown[0]["bias_effect"] is not None else "separation_effect"
        axes[-1].barh([r["component"] for r in shown][::-1], [r[key] for r in shown][::-1],
                     color=["tab:red" if r[key] > 0 else "tab:blue" for r in shown][::-1])
        what = "MaxSkew drop" if key == "bias_effect" else "separation drop"
        axes[-1].set(title=f"ablation: {what} ({report['column']})", xlabel=f"{what} (red: bias-amplifying)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
