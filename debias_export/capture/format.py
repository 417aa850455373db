"""The capture directory format: file names, tensor names, the manifest and its atomic writes, the cache key's
model fingerprint, and the preparation (resume / refuse / overwrite) of an output directory.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.choices import TOKEN_MODES as CAPTURE_TOKEN_MODES
from ..core.errors import DebiasError

MANIFEST = "capture.json"
FORMAT = "debias-export/capture"
VERSION = 1
TOKEN_MODES = CAPTURE_TOKEN_MODES  # one list: core.choices
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PER_TOKEN = ("activations", "row_index", "token_index")
PER_INPUT = ("mean_activations", "output_activations", "output_token_index")


@dataclass
class CaptureResult:
    """What a capture run produced (``resumed_shards`` were already on disk and not recomputed)."""

    out_dir: Path
    num_inputs: int
    num_tokens: int
    num_shards: int
    resumed_shards: int
    seconds: float
    computed_inputs: int
    settings: dict
    processes: int = 1

    def summary(self) -> str:
        per = f", {self.computed_inputs / self.seconds:.1f} inputs/s" if self.computed_inputs and self.seconds > 0 else ""
        procs = f" by {self.processes} processes" if self.processes > 1 else ""
        return (f"captured {self.num_inputs} inputs -> {self.num_tokens} tokens x {self.settings['width']} at "
                f"{self.settings['site']} ({self.settings['tokens']}) into {self.out_dir}: {self.num_shards} shards "
                f"({self.resumed_shards} resumed) in {self.seconds:.1f} s{procs}{per}")


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the site is needed, so the forward stops there."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """Cheap identity of a model's weights: names, shapes, dtypes and a few values of every tensor.

    Reading whole tensors would cost seconds on 7B models; the first/last values of each tensor
    already tell different checkpoints and random seeds apart.
    """
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        flat = t.detach().reshape(-1)
        sample = torch.cat([flat[:4], flat[-4:]]).float().cpu() if flat.numel() else flat.float().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    _atomic_write_bytes(out_dir / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def _shard_ok(out_dir: Path, entry: dict) -> bool:
    for name, digest in ((entry["file"], entry["sha256"]), (entry["rows_file"], entry["rows_sha256"])):
        p = out_dir / name
        if not p.is_file() or _sha256(p) != digest:
            return False
    return True


def _is_capture_file(name: str) -> bool:
    return name == MANIFEST or name.startswith(MANIFEST) or name.startswith("shard-")


def _prepare_out_dir(out_dir: Path, key: str, overwrite: bool) -> tuple[list[dict], dict | None]:
    """Completed shard entries to resume from (validated) and the old manifest; clears the dir when overwriting."""
    if out_dir.exists() and not out_dir.is_dir():
        if not overwrite:
            raise DebiasError(f"output {out_dir} exists and is a file, not a directory (pass --overwrite to replace it)")
        out_dir.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    mpath = out_dir / MANIFEST
    old = None
    if mpath.is_file():
        try:
            old = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
    if not overwrite:
        if old is None and any(out_dir.iterdir()):
            raise DebiasError(f"output {out_dir} exists and is not a capture directory (pass --overwrite to replace it)")
        if old is not None and old.get("cache_key") != key:
            raise DebiasError(f"capture directory {out_dir} holds a capture with different settings "
                              f"(cache key {old.get('cache_key')} != {key}); pass --overwrite to replace it or pick another --out")
    if overwrite or old is None:
        # Only our own files are removed: --overwrite must never wipe a directory the user pointed at by mistake.
        for p in out_dir.iterdir():
            if p.is_file() and _is_capture_file(p.name):
                p.unlink()
        return [], None
    done = []
    for entry in old.get("shards", []):
        if not _shard_ok(out_dir, entry):
            break  # resume from the first missing or damaged shard
        done.append(entry)
    keep = {e["file"] for e in done} | {e["rows_file"] for e in done} | {MANIFEST}
    for p in out_dir.iterdir():
        if p.is_file() and _is_capture_file(p.name) and p.name not in keep:
            p.unlink()
    return done, old
