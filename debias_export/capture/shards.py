"""Activations on disk for SAE training: a capture directory, or a folder of plain ``[N, d]`` safetensors shards."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from ..core.errors import DebiasError, check_finite
from ..sae.model import read_safetensors
from .store import MANIFEST, ActivationStore


class ActivationShards:
    """Re-iterable ``[N, d]`` tensors named ``activations`` in every ``*.safetensors`` of a folder, by name."""

    def __init__(self, folder: str | Path, key: str = "activations"):
        self.folder, self.key = Path(folder), key
        self.files = sorted(p for p in self.folder.glob("*.safetensors")) if self.folder.is_dir() else []
        if not self.files:
            raise DebiasError(f"no *.safetensors activation shards in {self.folder}")

    def __iter__(self) -> Iterator[torch.Tensor]:
        for path in self.files:
            tensors = read_safetensors(path)
            if self.key not in tensors:
                raise DebiasError(f"shard {path} has no tensor named {self.key!r}")
            check_finite(f"activations in {path}", tensors[self.key])
            yield tensors[self.key]


def open_activations(folder: Path) -> tuple[Any, int, dict[str, Any]]:
    """``(re-iterable [N, d] tensors, d, metadata)`` from a capture dir or a folder of plain shards."""
    if (folder / MANIFEST).is_file():
        store = ActivationStore(folder)
        s = store.settings
        site = str(store.site)
        layer = site.split(".")[1] if site.count(".") >= 1 else None
        meta = {"model": s.get("model"), "tower": s.get("tower"), "site": site, **store.model_record,
                "layer": int(layer) if layer and layer.lstrip("-").isdigit() else None,
                "capture": {"dir": str(folder), "tokens": s.get("tokens"), "num_tokens": store.num_tokens,
                            "source": s.get("source")}}
        return store, store.width, meta  # train_sae reads its shards one at a time
    shards = ActivationShards(folder)
    first = next(iter(shards))
    if first.ndim != 2:
        raise DebiasError(f"{shards.files[0]}: activations have shape {tuple(first.shape)}, expected [N, d]")
    return shards, int(first.shape[1]), {"capture": {"dir": str(folder)}}
