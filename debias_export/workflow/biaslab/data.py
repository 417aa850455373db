"""UTKFace for the bias lab: rows, the fixed validation split, fingerprints, decoded-image tensors.

The validation split is a pure function of the file name (``sha256(name) % val_mod == 0``), so it is the
same on every machine, for every seed and for every subset: training never sees it, and later protocol
steps (selecting edit settings) can use it as their selection split.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ...core.errors import DebiasError
from ...data.captions import RACE_WORDS, age_group
from ...data.datasets import load_rgb, read_csv_table
from .captions import GENDERS


def load_utkface(data_dir: str | Path) -> list[dict]:
    """All UTKFace rows with a race label (the 2 files without one are skipped), in labels.csv order."""
    root = Path(data_dir) / "utkface"
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DebiasError(f"UTKFace labels not found at {labels}; point --data / DEBIAS_EXPORT_DATA at the shared data")
    rows = [r for r in read_csv_table(labels, "UTKFace label file")[1] if r.get("race") in RACE_WORDS and r.get("gender") in GENDERS]
    if not rows:
        raise DebiasError(f"{labels} has no usable rows (need file, age, gender in {GENDERS}, race in {list(RACE_WORDS)})")
    for r in rows:
        try:
            r["age"] = int(r["age"])
        except (TypeError, ValueError):
            raise DebiasError(f"{labels}: file {r.get('file')!r} has a non-integer age {r.get('age')!r}") from None
        r["path"] = str(root / "images" / r["file"])
    return rows


def is_validation(file_name: str, val_mod: int) -> bool:
    """The fixed UTKFace validation rule (independent of seed, machine and subset)."""
    return int(hashlib.sha256(file_name.encode()).hexdigest()[:8], 16) % val_mod == 0


def split_utkface(rows: list[dict], val_mod: int) -> tuple[list[dict], list[dict]]:
    """``(train, validation)`` rows by :func:`is_validation`."""
    val = [r for r in rows if is_validation(r["file"], val_mod)]
    train = [r for r in rows if not is_validation(r["file"], val_mod)]
    return train, val


def subsample(rows: list[dict], max_images: int | None, seed: int) -> list[dict]:
    """A seeded random subset (order kept) of ``rows``; all of them when ``max_images`` is None."""
    if max_images is None or max_images >= len(rows):
        return rows
    g = torch.Generator().manual_seed(seed)
    return [rows[i] for i in sorted(torch.randperm(len(rows), generator=g)[:max_images].tolist())]


def rows_fingerprint(rows: list[dict]) -> str:
    """sha256 of the ``file,age,gender,race`` lines (sorted by file): which labelled files a split holds."""
    lines = sorted(f"{r['file']},{r['age']},{r['gender']},{r['race']}" for r in rows)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def images_fingerprint(rows: list[dict]) -> str:
    """sha256 over the image files' bytes (sorted by file): what the pixels were."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["file"]):
        h.update(r["file"].encode())
        h.update(Path(r["path"]).read_bytes())
    return h.hexdigest()


def data_fingerprint(data_dir: str | Path) -> str:
    """Hash of the UTKFace label file: the retrained-lab cache is keyed by what the model was trained on."""
    path = Path(data_dir) / "utkface" / "labels.csv"
    if not path.is_file():
        raise DebiasError(f"UTKFace labels not found at {path}; point --data / DEBIAS_EXPORT_DATA at the shared data")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def label_tensor(rows: list[dict]) -> torch.Tensor:
    """``[N, 3]`` (age group, gender index, race index)."""
    races = list(RACE_WORDS)
    return torch.tensor([(age_group(r["age"]), GENDERS.index(r["gender"]), races.index(r["race"])) for r in rows])


def preload_images(paths: list[str], size: int, cache_file: Path | None = None) -> torch.Tensor:
    """Decode + bicubic-resize every image once into a uint8 ``[N, 3, size, size]`` tensor (cached on disk)."""
    if cache_file is not None and cache_file.is_file():
        t = load_file(str(cache_file))["images"]
        if t.shape[0] == len(paths) and t.shape[-1] == size:
            return t
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        img = load_rgb(p).resize((size, size), Image.BICUBIC)  # load_rgb: one error naming an unreadable file
        out[i] = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        save_file({"images": out}, str(tmp))
        tmp.replace(cache_file)
    return out
