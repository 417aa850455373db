"""Activation capture: run a tower over labelled inputs and store a site's activations as safetensors shards.

Layout of a capture directory::

    capture.json                    manifest: settings, cache key, status, counts, shard list (written last)
    shard-00000.safetensors         activations [n_tok, d], row_index [n_tok], token_index [n_tok],
                                    mean_activations [n_in, d], output_activations [n_in, d], output_token_index [n_in]
    shard-00000.rows.jsonl          one JSON row (CSV columns / prompt fields) per input of the shard

Shards are written atomically (tmp file + rename) and the manifest is rewritten after each one, so an
interrupted capture resumes from its last completed shard. Settings (model fingerprint, site, inputs,
token mode, k, seed, dtype, shard size) are hashed into a cache key: rerunning with the same settings
resumes or returns at once, different settings in the same directory are refused unless ``overwrite``.
Random-k positions are drawn per input from a generator seeded by ``(seed, input index)``, so results
do not depend on batch size or on where a run was interrupted.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..adapters.base import ModelAdapter
from ..data.datasets import LabelledImages, TextPrompts
from ..core.errors import DebiasError, IntegrityError
from ..core.model_match import FINGERPRINT_KEY, model_fingerprint as family_fingerprint
from ..sae.model import read_safetensors
from ..core.sites import Site

MANIFEST = "capture.json"
FORMAT = "debias-export/capture"
VERSION = 1
TOKEN_MODES = ("random-k", "output", "all")
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

    def summary(self) -> str:
        per = f", {1000 * self.seconds / self.computed_inputs:.1f} ms/input" if self.computed_inputs else ""
        return (f"captured {self.num_inputs} inputs -> {self.num_tokens} tokens x {self.settings['width']} at "
                f"{self.settings['site']} ({self.settings['tokens']}) into {self.out_dir}: {self.num_shards} shards "
                f"({self.resumed_shards} resumed) in {self.seconds:.1f} s{per}")


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


def _forward(adapter: ModelAdapter, module: torch.nn.Module, tower: str, raw: list) -> tuple[torch.Tensor, dict]:
    """Site activations ``[B, T, d]`` of one batch, and the model inputs used."""
    inputs = adapter.prepare_images(raw) if tower == "image" else adapter.prepare_texts(raw)
    param = next(adapter.model.parameters())
    inputs = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
              if torch.is_tensor(v) else v for k, v in inputs.items()}
    seen: dict[str, torch.Tensor] = {}

    def hook(_mod, _inp, out):
        seen["h"] = (out[0] if isinstance(out, tuple) else out).detach()
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        adapter.run_tower(tower, inputs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "h" not in seen:
        raise DebiasError(f"the site module {type(module).__name__} did not run during the {tower} tower's forward")
    return seen["h"], inputs


def _select(tokens: str, k: int, seed: int, first_row: int, valid: torch.Tensor, out_idx: torch.Tensor) -> list[torch.Tensor]:
    """Positions to keep for each input of a batch (``valid``: bool ``[B, T]`` of real tokens)."""
    picks = []
    for b in range(valid.shape[0]):
        real = valid[b].nonzero().reshape(-1)
        if tokens == "all":
            picks.append(real)
        elif tokens == "output":
            picks.append(out_idx[b:b + 1])
        else:  # random-k, with replacement, CLS included, padding never
            g = torch.Generator().manual_seed((seed * 1_000_003 + first_row + b) % (2 ** 63))
            picks.append(real[torch.randint(0, real.numel(), (k,), generator=g)])
    return picks


def capture_activations(adapter: ModelAdapter, site: str | Site, source: LabelledImages | TextPrompts,
                        out_dir: str | os.PathLike, tokens: str = "random-k", k: int = 2, batch_size: int = 32,
                        seed: int = 0, shard_size: int | None = None, dtype: str = "float32", overwrite: bool = False,
                        progress: bool = True) -> CaptureResult:
    """Capture ``site`` activations of ``source`` into ``out_dir`` (see the module docstring for the layout).

    ``tokens``: ``random-k`` (k positions per input drawn with replacement, DeBiasLens default k=2),
    ``output`` (the token the tower pools), ``all`` (every real token; text padding excluded).
    ``shard_size`` inputs per shard bounds memory (default 4096, or 128 for ``all``).
    """
    if tokens not in TOKEN_MODES:
        raise DebiasError(f"unknown token mode {tokens!r}; expected one of {', '.join(TOKEN_MODES)}")
    if dtype not in DTYPES:
        raise DebiasError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if k < 1 or batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise DebiasError(f"k, batch size and shard size must be >= 1 (got k={k}, batch_size={batch_size}, shard_size={shard_size})")
    site = adapter.resolve_site(site)
    if site.tower != source.tower:
        raise DebiasError(f"site {site.name} reads the {site.tower} tower but the inputs are {source.tower} inputs")
    if len(source) == 0:
        raise DebiasError("no inputs to capture (empty file or everything filtered out)")
    shard_size = shard_size or (128 if tokens == "all" else 4096)
    module_path = adapter.site_module_path(site)
    module = adapter.model.get_submodule(module_path)
    settings = {"model": {"family": adapter.family, "source": adapter.source, "class": type(adapter.model).__name__,
                          "fingerprint": model_fingerprint(adapter.model)},
                "site": site.name, "site_module": module_path, "tower": site.tower, "width": adapter.width(site.tower),
                "tokens": tokens, "k": k if tokens == "random-k" else None, "seed": seed, "dtype": dtype,
                "shard_size": shard_size, "source": source.describe()}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    out = Path(out_dir)
    shards, old = _prepare_out_dir(out, key, overwrite)
    n = len(source)
    n_shards = -(-n // shard_size)
    if old is not None and old.get("status") == "complete" and len(shards) == n_shards:
        # Same settings, already complete: nothing to do (the manifest keeps the original timing).
        return CaptureResult(out, n, old["counts"]["tokens"], n_shards, n_shards, 0.0, 0, settings)
    # what SAEs trained on this capture are made for (outside ``settings``: not part of the cache key, so
    # captures made before it existed still resume)
    manifest = {"format": FORMAT, "version": VERSION, "cache_key": key, "status": "running", "settings": settings,
                "shards": shards, FINGERPRINT_KEY: family_fingerprint(adapter)}
    resumed = len(shards)
    start_time = time.perf_counter()
    computed = 0
    bar = _progress_bar(n, sum(e["inputs"] for e in shards), source.tower, progress)
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        with torch.no_grad():
            for s in range(resumed, n_shards):
                lo, hi = s * shard_size, min((s + 1) * shard_size, n)
                entry = _capture_shard(adapter, module, site.tower, source, out, s, lo, hi, tokens, k, seed,
                                       DTYPES[dtype], batch_size, bar)
                computed += hi - lo
                shards.append(entry)
                _write_manifest(out, manifest)  # a crash after this point resumes after shard s
    finally:
        bar.close()
        adapter.model.train(was_training)
    seconds = time.perf_counter() - start_time
    n_tokens = sum(e["tokens"] for e in shards)
    manifest.update(status="complete", counts={"inputs": n, "tokens": n_tokens, "shards": len(shards)},
                    timing={"seconds": round(seconds, 3), "computed_inputs": computed,
                            "seconds_per_input": round(seconds / computed, 6) if computed else None})
    _write_manifest(out, manifest)  # written last: a complete capture.json means a complete capture
    return CaptureResult(out, n, n_tokens, len(shards), resumed, seconds, computed, settings)


def _progress_bar(total: int, initial: int, tower: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img" if tower == "image" else "prompt", disable=not enabled,
                file=sys.stderr, desc="capture", dynamic_ncols=True)


def _capture_shard(adapter, module, tower, source, out: Path, s: int, lo: int, hi: int, tokens: str, k: int,
                   seed: int, dtype: torch.dtype, batch_size: int, bar) -> dict:
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in PER_TOKEN + PER_INPUT}
    rows: list[dict] = []
    first = lo
    for raw, batch_rows in source.batches(batch_size, start=lo, stop=hi):
        h, inputs = _forward(adapter, module, tower, raw)
        h = h.float().cpu()
        B, T = h.shape[:2]
        mask = inputs.get("attention_mask")
        valid = mask.cpu().bool() if torch.is_tensor(mask) and tuple(mask.shape) == (B, T) else torch.ones(B, T, dtype=torch.bool)
        try:
            out_idx = adapter.output_token_index(tower, inputs).cpu().long().reshape(B)
        except DebiasError:
            # Families whose consumer reads every token (LLaVA) have no single output token: such a
            # capture has no output_* tensors, and asking for them later is a clear error.
            if tokens == "output":
                raise
            out_idx = None
        for b, pos in enumerate(_select(tokens, k, seed, first, valid, out_idx)):
            parts["activations"].append(h[b, pos])
            parts["row_index"].append(torch.full((pos.numel(),), first + b, dtype=torch.long))
            parts["token_index"].append(pos.long())
        w = valid.unsqueeze(-1).float()
        parts["mean_activations"].append((h * w).sum(1) / w.sum(1).clamp_min(1))
        if out_idx is not None:
            parts["output_activations"].append(h[torch.arange(B), out_idx])
            parts["output_token_index"].append(out_idx)
        rows.extend(batch_rows)
        first += B
        bar.update(B)
    tensors = {name: torch.cat(vals).contiguous() for name, vals in parts.items() if vals}
    for name in ("activations", "mean_activations", "output_activations"):
        if name in tensors:
            tensors[name] = tensors[name].to(dtype).contiguous()
    from safetensors.torch import save

    name = f"shard-{s:05d}"
    rows_bytes = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    # One metadata key: safetensors orders several keys differently from run to run (hash map).
    data = save(tensors, metadata={"rows": f"{lo}:{hi}"})
    # Rows first, tensors second: the manifest (updated after both) is what marks the shard complete.
    _atomic_write_bytes(out / f"{name}.rows.jsonl", rows_bytes)
    _atomic_write_bytes(out / f"{name}.safetensors", data)
    return {"file": f"{name}.safetensors", "rows_file": f"{name}.rows.jsonl", "first_row": lo, "inputs": hi - lo,
            "tokens": int(tensors["activations"].shape[0]), "sha256": hashlib.sha256(data).hexdigest(),
            "rows_sha256": hashlib.sha256(rows_bytes).hexdigest(), "bytes": len(data)}


class ActivationStore:
    """Read a finished capture directory, checking every shard against the manifest."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise DebiasError(f"not a capture directory (no {MANIFEST}): {self.path}")
        try:
            self.manifest: dict = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"corrupt capture manifest {mpath}: {exc}") from None
        if self.manifest.get("format") != FORMAT:
            raise IntegrityError(f"{mpath} is not a capture manifest (format {self.manifest.get('format')!r})")
        if self.manifest.get("status") != "complete":
            raise IntegrityError(f"capture {self.path} is incomplete ({len(self.manifest.get('shards', []))} shards "
                                 "written); rerun the same capture command to resume it")
        for entry in self.shards:
            for name in (entry["file"], entry["rows_file"]):
                if not (self.path / name).is_file():
                    raise IntegrityError(f"capture shard missing: {self.path / name}")
            if (self.path / entry["file"]).stat().st_size != entry["bytes"]:
                raise IntegrityError(f"capture shard {self.path / entry['file']} has {(self.path / entry['file']).stat().st_size} bytes, manifest says {entry['bytes']}")
        self._rows: list[dict] | None = None

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def model_record(self) -> dict:
        """What the capture was made with, for :func:`debias_export.core.model_match.check_made_for`: model family and
        architecture fingerprint (captures older than fingerprints: the family only), tower and site."""
        model = self.settings.get("model") or {}
        fp = self.manifest.get(FINGERPRINT_KEY) or ({"family": model["family"]} if model.get("family") else None)
        return {**({FINGERPRINT_KEY: fp} if fp else {}), "tower": self.settings.get("tower"), "site": self.site}

    @property
    def site(self) -> str:
        return self.settings["site"]

    @property
    def width(self) -> int:
        return int(self.settings["width"])

    @property
    def num_inputs(self) -> int:
        return int(self.manifest["counts"]["inputs"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["counts"]["tokens"])

    @property
    def rows(self) -> list[dict]:
        """Row metadata (CSV columns / prompt fields) of every input, in input order."""
        if self._rows is None:
            rows = []
            for entry in self.shards:
                p = self.path / entry["rows_file"]
                if _sha256(p) != entry["rows_sha256"]:
                    raise IntegrityError(f"capture rows file {p} does not match its manifest checksum")
                rows.extend(json.loads(line) for line in p.read_text().splitlines() if line)
            if len(rows) != self.num_inputs:
                raise IntegrityError(f"capture {self.path} lists {self.num_inputs} inputs but its rows files hold {len(rows)}")
            self._rows = rows
        return self._rows

    def labels(self, column: str) -> list[str]:
        """One row column for every input (e.g. ``gender``), naming the columns there are when absent."""
        rows = self.rows
        if rows and column not in rows[0]:
            raise DebiasError(f"capture {self.path} has no label column {column!r}; columns: {', '.join(rows[0])}")
        return [r[column] for r in rows]

    def load_shard(self, i: int) -> dict[str, torch.Tensor]:
        """Tensors of shard ``i`` after checksum and shape checks."""
        entry = self.shards[i]
        p = self.path / entry["file"]
        if _sha256(p) != entry["sha256"]:
            raise IntegrityError(f"capture shard {p} does not match its manifest checksum (modified or damaged)")
        t = read_safetensors(p)
        optional = ("output_activations", "output_token_index") if "output_token_index" not in t else ()
        missing = [n for n in PER_TOKEN + PER_INPUT if n not in t and n not in optional]
        if missing:
            raise IntegrityError(f"capture shard {p} lacks tensors {', '.join(missing)}")
        if (any(t[n].shape[0] != entry["tokens"] for n in PER_TOKEN)
                or any(t[n].shape[0] != entry["inputs"] for n in PER_INPUT if n in t)):
            raise IntegrityError(f"capture shard {p} tensor lengths do not match the manifest counts")
        return t

    def iter_shards(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self.shards)):
            yield self.load_shard(i)

    def iter_activations(self, batch_size: int = 65536, with_index: bool = False) -> Iterator[Any]:
        """Token activations in batches of at most ``batch_size`` rows (one shard in memory at a time).

        With ``with_index`` each item is ``(activations, row_index, token_index)``.
        """
        for t in self.iter_shards():
            for lo in range(0, t["activations"].shape[0], batch_size):
                sl = slice(lo, lo + batch_size)
                yield (t["activations"][sl], t["row_index"][sl], t["token_index"][sl]) if with_index else t["activations"][sl]

    def _cat(self, name: str) -> torch.Tensor:
        return torch.cat([t[name] for t in self.iter_shards()])

    def activations(self) -> torch.Tensor:
        """All captured token activations ``[n_tokens, d]``."""
        return self._cat("activations")

    def row_index(self) -> torch.Tensor:
        return self._cat("row_index")

    def token_index(self) -> torch.Tensor:
        return self._cat("token_index")

    def mean_activations(self) -> torch.Tensor:
        """Per-input mean over real tokens ``[n_inputs, d]``."""
        return self._cat("mean_activations")

    def output_activations(self) -> torch.Tensor:
        """Per-input activation at the token the tower pools ``[n_inputs, d]``."""
        self._require_output_token()
        return self._cat("output_activations")

    def output_token_index(self) -> torch.Tensor:
        self._require_output_token()
        return self._cat("output_token_index")

    def _require_output_token(self) -> None:
        if self.shards and "output_token_index" not in self.load_shard(0):
            raise DebiasError(f"capture {self.path} has no per-input output token: the model's consumer reads every "
                              "token (e.g. LLaVA); use mean_activations")
