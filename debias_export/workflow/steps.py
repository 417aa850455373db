"""The recipe steps both runners share (plain :mod:`.pipeline` and the held-out :mod:`.protocol`): data
source, capture, SAE (trained per seed, cached by a hash of its settings), social-neuron probing.

Caches live under the run's ``cache/`` folder, keyed by everything that changes their content, so variants
and grid cells that share a capture or an SAE compute it once and a rerun resumes.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import torch

from ..analysis.probe import balanced_means, probe_social_neurons
from ..capture import ActivationStore, InputCache, capture_activations
from ..core.errors import DebiasError
from ..core.model_match import FINGERPRINT_KEY, check_made_for, model_fingerprint, record_of
from ..data.captions import label_caption
from ..data.datasets import LabelledImages, TextPrompts, default_data_dir, read_csv_table
from ..sae import SparseAutoencoder
from ..sae.importers import load_any
from ..sae.train import TrainConfig, train_sae
from .lean import NEUTRAL_PROMPTS, neutral_prompts
from .recipe import Recipe


def log(msg: str) -> None:
    print(f"[debias-export] {msg}", flush=True)


def key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class Steps:
    """Times each step for ``run.json``."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.record: dict[str, Any] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        log(f"{self.prefix}{name} ...")
        t0 = time.perf_counter()
        result = fn()
        prev = self.record.get(name, {}).get("seconds", 0.0)  # a step run once per seed adds up
        self.record[name] = {"seconds": round(prev + time.perf_counter() - t0, 3)}
        return result


def data_base(recipe: Recipe) -> Path:
    """The data directory the recipe's relative paths resolve against."""
    return Path(recipe.data.dir) if recipe.data.dir else default_data_dir()


def _caption_csv(src: Path, dst: Path, exclude: Collection[str]) -> Path:
    """Labelled captions ("a photo of a young Black woman") from an image label CSV, for text-tower probing."""
    header, rows = read_csv_table(src, "data.captions_from file")
    if not rows or "gender" not in header:
        raise DebiasError(f"data.captions_from {src}: needs a 'gender' column")
    out = [{"text": text, **{k: row.get(k, "") for k in ("gender", "race", "age")}}
           for row in rows if row.get("file") not in exclude and (text := label_caption(row)) is not None]
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "gender", "race", "age"])
        writer.writeheader()
        writer.writerows(out)
    return dst


def _text_csv(rows: list[dict[str, str]], dst: Path) -> Path:
    """Write ``rows`` (a ``text`` column and labels) once: the name is a hash of the content, so reruns reuse it."""
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        tmp.rename(dst)
    return dst


def data_source(recipe: Recipe, cache: Path, exclude: Collection[str] = (), labels: Sequence[str] | None = None):
    """The fit data (capture, SAE, probe, projection fit); rows whose ``file`` is in ``exclude`` (the
    selection split's faces, when the fit data is the same table) are left out. ``labels``: one
    ``probe.column`` label per text input, replacing the file's (``data.label_by: lean``)."""
    base = data_base(recipe)
    keep = (lambda row: row.get("file") not in exclude) if exclude else None
    if recipe.data.images:
        image_dir = base / recipe.data.image_dir if recipe.data.image_dir else None
        return LabelledImages(base / recipe.data.images, image_dir=image_dir, limit=recipe.data.limit, filter=keep)
    if recipe.data.captions_from:
        name = f"captions-{key(recipe.data.captions_from, sorted(exclude))}.csv"
        source = TextPrompts(_caption_csv(base / recipe.data.captions_from, cache / name, exclude), limit=recipe.data.limit)
    elif recipe.data.texts == NEUTRAL_PROMPTS:
        rows = [{"text": t} for t in neutral_prompts(base)]
        source = TextPrompts(_text_csv(rows, cache / f"neutral-{key(rows)}.csv"), limit=recipe.data.limit)
    else:
        source = TextPrompts(base / recipe.data.texts, limit=recipe.data.limit)
    if labels is None:
        return source
    if len(labels) != len(source.rows):
        raise DebiasError(f"{len(labels)} labels for {len(source.rows)} fit texts")
    rows = [{"text": r["text"], recipe.probe.column: lab} for r, lab in zip(source.rows, labels)]
    return TextPrompts(_text_csv(rows, cache / f"labelled-{key(rows)}.csv"))


@dataclasses.dataclass
class Captured:
    """A site's capture of the fit data: what the SAE trains on and the probe / projection fit reads."""

    site: Any
    store: ActivationStore
    directory: Path
    cache_key: str


def capture(recipe: Recipe, adapter, cache: Path, steps: Steps, progress: bool, seed: int | None = None,
            exclude: Collection[str] = (), labels: Sequence[str] | None = None,
            inputs_cache: InputCache | None = None) -> Captured:
    """Resolve the site, check the data fits it, capture (cached by model, site, data, capture settings, seed,
    and the ``labels`` that replace the text file's, see :func:`data_source`). ``inputs_cache``: prepared inputs
    shared by the captures of several sites on the same data in one run."""
    seed = recipe.seed if seed is None else seed
    site = adapter.resolve_site(recipe.site)
    if (recipe.data.images is not None) == (site.tower == "text"):
        fed = "data.images feeds the image tower" if recipe.data.images else "data.texts/captions_from feed the text tower"
        raise DebiasError(f"site {site.name} is on the {site.tower} tower but {fed}")
    source = data_source(recipe, cache, exclude, labels)
    columns = getattr(source, "columns", None) or (list(source.rows[0]) if source.rows else [])
    if recipe.probe.column not in columns:
        raise DebiasError(f"no label column {recipe.probe.column!r} (probe.column) in the data; columns: {', '.join(columns)}")
    missing = [c for c in recipe.edit.keep if c not in columns]
    if missing:  # before capturing: the fit would need them
        raise DebiasError(f"no label column {missing[0]!r} (edit.keep) in the data; columns: {', '.join(columns)}")
    parts = [recipe.model.spec, site.name, dataclasses.asdict(recipe.data), dataclasses.asdict(recipe.capture), seed]
    if exclude:
        parts.append(sorted(exclude))
    if labels is not None:
        parts.append(key(list(labels)))
    cap_key = key(*parts)
    directory = cache / f"capture-{cap_key}"
    steps("capture", lambda: capture_activations(adapter, site, source, directory, tokens=recipe.capture.tokens,
                                                 k=recipe.capture.k, batch_size=recipe.capture.batch_size,
                                                 seed=seed, overwrite=False, progress=progress,
                                                 inputs_cache=inputs_cache))
    return Captured(site, ActivationStore(directory), directory, cap_key)


def get_sae(recipe: Recipe, adapter, cap: Captured, cache: Path, progress: bool, seed: int | None = None) -> SparseAutoencoder:
    """``sae.path`` imported, or an SAE trained on the capture with ``seed`` (cached by capture + settings + seed)."""
    seed = recipe.seed if seed is None else seed
    site = cap.site
    if recipe.sae.path:
        sae = load_any(recipe.sae.path, d_in=adapter.width(site.tower))
        check_made_for(f"the SAE {recipe.sae.path} (sae.path)", record_of(sae.cfg.metadata), adapter, site)
        return sae
    # the seed joins the key only when it differs from the capture's, so one-seed runs keep their cache names
    sae_dir = cache / f"sae-{key(cap.cache_key, dataclasses.asdict(recipe.sae), *([seed] if seed != recipe.seed else []))}"
    if (sae_dir / "sae.safetensors").is_file():
        return SparseAutoencoder.load(sae_dir)
    cfg = TrainConfig(d_in=adapter.width(site.tower), expansion=recipe.sae.expansion, k=recipe.sae.k,
                      batch_size=recipe.sae.batch_size, lr=recipe.sae.lr, steps=recipe.sae.steps, seed=seed,
                      metadata={"model": recipe.model.spec, "tower": site.tower, "site": site.name, "layer": site.layer,
                                FINGERPRINT_KEY: model_fingerprint(adapter)})
    sae = train_sae(cap.store.activations(), cfg, checkpoint_dir=cache / f"{sae_dir.name}-checkpoints", progress=progress)
    sae.save(sae_dir)
    return sae


def probed_latents(recipe: Recipe, sae: SparseAutoencoder, cap: Captured, latents: dict | None = None) -> torch.Tensor:
    """SAE latents of the capture's per-input activations (``probe.activations``), ``[N, F]``.
    ``latents``: a per-(SAE, activations) cache a grid shares across tau / top-n / value cells."""
    which = recipe.probe.activations
    cache_id = (id(sae), which)
    if latents is not None and cache_id in latents:
        return latents[cache_id][1]
    with torch.no_grad():
        x = cap.store.output_activations() if which == "output" else cap.store.mean_activations()
        z = sae.encode(x)
    if latents is not None:
        latents[cache_id] = (sae, z)  # holding sae keeps id() unique while cached
    return z


def probe(recipe: Recipe, sae: SparseAutoencoder, cap: Captured, latents: dict | None = None) -> dict[str, Any]:
    """DeBiasLens probing of ``probe.column`` on the capture's per-input activations (``probe.activations``)."""
    z = probed_latents(recipe, sae, cap, latents)
    report = probe_social_neurons(z, cap.store.labels(recipe.probe.column), tau=recipe.probe.tau, top_n=recipe.probe.top_n)
    report["sources"] = {"capture": str(cap.directory), "column": recipe.probe.column, "activations": recipe.probe.activations}
    return report


def neuron_values(recipe: Recipe, sae: SparseAutoencoder, cap: Captured, neurons: list[int],
                  latents: dict | None = None) -> float | list[float]:
    """``edit.value`` for an SAE edit of ``neurons``: the number as written, or for ``mean`` each neuron's
    group-balanced mean activation over the same per-input latents and labels the probe used."""
    if not isinstance(recipe.edit.value, str):
        return float(recipe.edit.value)
    z = probed_latents(recipe, sae, cap, latents)
    return balanced_means(z, cap.store.labels(recipe.probe.column), neurons)
