"""Every setting that determines a trained bias lab (the recipe), and where things live."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

from ...core.errors import DebiasError

RECIPE_VERSION = 4  # bump when the training code changes in a way that changes results
# Settings added in recipe v4, with the values that make them no-ops. A v3 recipe (the shipped lab's
# recipe.json) lacks them: it loads with these values and writes without them, so its dict, its cache key and
# its training (v4 augmentations draw random numbers only when one is on) are exactly v3's.
V4_NEUTRAL = {"channel_gain": 0.0, "blur_p": 0.0, "blur_sigma_max": 1.0, "lowres_p": 0.0, "lowres_min": 16,
              "base": None}
ARCHITECTURE = ("image_size", "patch_size", "layers", "width", "heads", "mlp", "projection_dim")


@dataclasses.dataclass(frozen=True)
class BiasLabSettings:
    """The training recipe: architecture, optimisation, loss, augmentation, data split, threads.

    Hashed (with the data fingerprint) into the cache key of retrained labs and written in full into
    the shipped ``recipe.json``.
    """

    seed: int = 0
    # --- image tower (a CLIP ViT; the text tower is always the frozen packaged MiniLM) ---
    image_size: int = 48
    patch_size: int = 8
    layers: int = 4
    width: int = 128
    heads: int = 4
    mlp: int = 512
    projection_dim: int = 128
    init: str = "mimetic"  # "mimetic" (attention initialised near identity, Trockman & Kolter 2023) | "default"
    # --- optimisation ---
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    logit_scale_init: float = math.log(20.0)  # CLIP's ln(1/0.07) barely moves in a few thousand steps
    # --- loss ---
    loss: str = "both"  # "table": each image vs every caption the lab can write | "batch": v2's in-batch InfoNCE | "both": sum
    label_smoothing: float = 0.0  # image->caption targets: (1-e) * uniform over consistent captions + e * uniform
    drop_age_p: float = 0.2  # "batch" / "both" loss: chance a sampled caption omits the age word
    drop_race_p: float = 0.2  # "batch" / "both" loss: chance a sampled caption omits the race word
    # --- augmentation (one seeded generator; affine in one grid_sample) ---
    zoom_out_max: float = 1.5  # view covers up to 1.5x the crop (FairFace "1.25 padding" faces fill ~60%)
    zoom_in_min: float = 1.0
    shift: float = 0.1  # max translation, fraction of the half-width
    rotate_deg: float = 0.0
    color: float = 0.0  # brightness / contrast / saturation jitter amplitude
    grayscale_p: float = 0.0
    # v4 (photo-domain augmentation; extra random numbers are drawn only when one of these is on)
    channel_gain: float = 0.0  # per-channel gain amplitude (white balance)
    blur_p: float = 0.0  # chance of a Gaussian blur, sigma uniform in (0, blur_sigma_max] px at image_size
    blur_sigma_max: float = 1.0
    lowres_p: float = 0.0  # chance of a down- and up-scale through a side uniform in [lowres_min, image_size) px
    lowres_min: int = 16
    # v4: fine-tune stage. ``base`` is the complete recipe of the lab this one starts from (its fp16 weights, as
    # shipped); training then runs this recipe's epochs / lr / augmentation on them. None = from scratch.
    base: "BiasLabSettings | None" = None
    # --- data ---
    val_mod: int = 10  # UTKFace validation split: files whose sha256(name) % val_mod == 0 (never trained on)
    max_images: int | None = None  # subsample the training split (tests / smoke runs)
    threads: int = 1  # torch CPU threads: part of the recipe (matmul blocking depends on it); 1 also wins on a shared box
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}"),
            (self.image_size > 0 and self.patch_size > 0 and self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} must be a positive multiple of patch_size {self.patch_size}"),
            (self.width % self.heads == 0, f"width {self.width} must be divisible by heads {self.heads}"),
            (self.layers >= 1, f"layers must be >= 1, got {self.layers}"),
            (self.init in ("mimetic", "default"), f"init must be 'mimetic' or 'default', got {self.init!r}"),
            (self.loss in ("table", "batch", "both"), f"loss must be 'table', 'batch' or 'both', got {self.loss!r}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.zoom_out_max >= 1 and 0 < self.zoom_in_min <= 1, "zoom_out_max must be >= 1 and zoom_in_min in (0, 1]"),
            (self.val_mod >= 2, f"val_mod must be >= 2, got {self.val_mod}"),
            (self.max_images is None or self.max_images >= self.batch_size,
             f"max_images ({self.max_images}) must be at least batch_size ({self.batch_size})"),
            (self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (1 <= self.version <= RECIPE_VERSION, f"recipe version {self.version} is not one this package can train "
                                                   f"(1..{RECIPE_VERSION})"),
            (self.version >= 4 or all(getattr(self, k) == v for k, v in V4_NEUTRAL.items()),
             f"{sorted(V4_NEUTRAL)} need recipe version >= 4"),
            (all(0 <= p <= 1 for p in (self.grayscale_p, self.blur_p, self.lowres_p)),
             "grayscale_p, blur_p and lowres_p are probabilities in [0, 1]"),
            (0 <= self.color < 1 and 0 <= self.channel_gain < 1, "color and channel_gain must be in [0, 1)"),
            (self.blur_sigma_max > 0 and 1 <= self.lowres_min <= self.image_size,
             f"blur_sigma_max must be > 0 and lowres_min in [1, image_size], got {self.blur_sigma_max}, {self.lowres_min}"),
            (self.base is None or isinstance(self.base, BiasLabSettings), "base must be a BiasLabSettings or None"),
            (not isinstance(self.base, BiasLabSettings)
             or all(getattr(self, k) == getattr(self.base, k) for k in (*ARCHITECTURE, "val_mod")),
             f"a fine-tune stage keeps its base's architecture and validation split ({', '.join(ARCHITECTURE)}, val_mod)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise DebiasError(f"bad bias-lab setting: {msg}")

    def to_dict(self) -> dict:
        """Every setting (``base`` as its own dict); a version < 4 recipe without the v4 keys, as it was written."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["base"] = self.base.to_dict() if self.base is not None else None
        if self.version < 4:
            for k in V4_NEUTRAL:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BiasLabSettings":
        """Exact inverse of :meth:`to_dict`; unknown or missing keys are refused (a recipe is complete), except
        that a recipe older than v4 has no v4 keys (they load as :data:`V4_NEUTRAL`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        if isinstance(d.get("version"), int) and d["version"] < 4 and not set(V4_NEUTRAL) & set(d):
            d.update(V4_NEUTRAL)
        if isinstance(d.get("base"), dict):
            d["base"] = cls.from_dict(d["base"])
        if set(d) != names:
            raise DebiasError(f"bias-lab recipe keys differ from this version's settings: missing "
                              f"{sorted(names - set(d))}, unknown {sorted(set(d) - names)}")
        return cls(**d)

    def key(self, data_fingerprint: str) -> str:
        blob = json.dumps({"settings": self.to_dict(), "data": data_fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    """``$DEBIAS_EXPORT_CACHE/biaslab`` or ``~/.cache/debias-export/biaslab`` (retrained labs only)."""
    root = os.environ.get("DEBIAS_EXPORT_CACHE")
    return Path(root) / "biaslab" if root else Path.home() / ".cache" / "debias-export" / "biaslab"
