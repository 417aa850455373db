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

Under torchrun / ``accelerate launch`` the shards are dealt out in rounds (shard ``resumed + r * world + rank``
to ``rank``): every rank writes its own shards, rank 0 records each finished round in the manifest (each
entry names the ``rank`` that wrote it). A shard is the same bytes whoever writes it, so the capture and its
cache key equal the single-process ones, and an interrupted run resumes with any number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from tqdm import tqdm

from ..adapters.base import ModelAdapter
from ..core.errors import DebiasError
from ..core.model_match import FINGERPRINT_KEY
from ..core.model_match import model_fingerprint as family_fingerprint
from ..core.sites import Site
from ..data.datasets import LabelledImages, TextPrompts
from ..sae.distributed import Dist, autocast, check_precision
from .format import (
    DTYPES,
    FORMAT,
    PER_INPUT,
    PER_TOKEN,
    TOKEN_MODES,
    VERSION,
    CaptureResult,
    _atomic_write_bytes,
    _prepare_out_dir,
    _StopForward,
    _write_manifest,
    model_fingerprint,
)


class InputCache:
    """Prepared model inputs of capture batches, kept in memory across captures of the same inputs in one process.

    Why: a run captures several sites of one tower on the same images (a site grid); decoding and resizing the
    images was two thirds of each such capture on the bias lab. Entries are keyed by the adapter, the source's
    description (file, rows digest) and the batch's row range; past ``max_bytes`` batches are prepared as usual
    and not kept, so a large dataset costs no more memory than before."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes, self.bytes = int(max_bytes), 0
        self._items: dict[tuple, tuple[Any, dict, list[dict]]] = {}

    def batch(self, adapter: ModelAdapter, source, source_id: str, lo: int, hi: int) -> tuple[dict, list[dict]]:
        """Model inputs and row dicts of rows ``lo..hi`` of ``source`` (``source_id``: its description as JSON):
        prepared now, or as prepared before."""
        key = (id(adapter), source_id, lo, hi)
        hit = self._items.get(key)
        if hit is not None and hit[0] is adapter:  # the adapter is held, so its id() cannot be reused meanwhile
            return hit[1], [dict(r) for r in hit[2]]
        inputs, rows = _prepare_batch(adapter, source, lo, hi)
        size = sum(v.numel() * v.element_size() for v in inputs.values() if torch.is_tensor(v))
        if self.bytes + size <= self.max_bytes:
            self._items[key] = (adapter, inputs, [dict(r) for r in rows])
            self.bytes += size
        return inputs, rows


def _prepare_batch(adapter: ModelAdapter, source, lo: int, hi: int) -> tuple[dict, list[dict]]:
    raw, rows = next(source.batches(hi - lo, start=lo, stop=hi))
    return (adapter.prepare_images(raw) if source.tower == "image" else adapter.prepare_texts(raw)), rows


def _forward(adapter: ModelAdapter, module: torch.nn.Module, tower: str, inputs: dict) -> tuple[torch.Tensor, dict]:
    """Site activations ``[B, T, d]`` of one batch of prepared inputs, and the model inputs used."""
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
                        progress: bool = True, precision: str = "fp32", dist: Dist | None = None,
                        inputs_cache: InputCache | None = None) -> CaptureResult:
    """Capture ``site`` activations of ``source`` into ``out_dir`` (see the module docstring for the layout).

    ``tokens``: ``random-k`` (k positions per input drawn with replacement, DeBiasLens default k=2),
    ``output`` (the token the tower pools), ``all`` (every real token; text padding excluded).
    ``shard_size`` inputs per shard bounds memory (default 4096, or 128 for ``all``).
    The tower runs on the device its weights are on; ``precision`` ``bf16`` / ``fp16`` autocasts its matmuls
    (part of the cache key). Under a process group (``dist``, default: the initialised one) the shards are
    split between the ranks, each rank writes its own shards and rank 0 the manifest. ``inputs_cache``: prepared
    inputs shared with other captures of the same inputs in this process (:class:`InputCache`; same results).
    """
    check_precision(precision)
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
    if precision != "fp32":  # only then: captures made before --precision existed keep their cache key
        settings["precision"] = precision
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    dist = dist or Dist.current()
    dist.check_same("capture settings (cache key)", key)
    out = Path(out_dir)
    n = len(source)
    n_shards = -(-n // shard_size)
    shards, complete = _prepare_on_main(dist, out, key, overwrite, n_shards)
    if complete is not None:
        # Same settings, already complete: nothing to do (the manifest keeps the original timing).
        return CaptureResult(out, n, complete, n_shards, n_shards, 0.0, 0, settings, dist.world_size)
    device = next(adapter.model.parameters()).device
    if dist.is_main and dist.world_size > n_shards - len(shards):
        print(f"warning: {n_shards - len(shards)} shard(s) left for {dist.world_size} processes: some stay idle "
              "(a smaller --shard-size splits the work further)", file=sys.stderr)
    # what SAEs trained on this capture are made for (outside ``settings``: not part of the cache key, so
    # captures made before it existed still resume); ``runtime`` says how it ran (not part of the key either)
    manifest = {"format": FORMAT, "version": VERSION, "cache_key": key, "status": "running", "settings": settings,
                "shards": shards, FINGERPRINT_KEY: family_fingerprint(adapter),
                "runtime": {"device": device.type, "precision": precision, "processes": dist.world_size}}
    resumed = len(shards)
    todo = list(range(resumed, n_shards))
    start_time = time.perf_counter()
    computed = 0
    bar = _progress_bar(n, sum(e["inputs"] for e in shards), source.tower, progress and dist.is_main)
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        with torch.no_grad(), autocast(device, precision):
            # Round r: rank i captures todo[r * world + i]; rank 0 then records the whole round, so the manifest
            # always lists a prefix of the shards and a rerun (with any number of processes) resumes after it.
            for first in range(0, len(todo), dist.world_size):
                mine = first + dist.rank
                entry = None
                if mine < len(todo):
                    s = todo[mine]
                    lo, hi = s * shard_size, min((s + 1) * shard_size, n)
                    entry = _capture_shard(adapter, module, site.tower, source, out, s, lo, hi, tokens, k, seed,
                                           DTYPES[dtype], batch_size, bar, inputs_cache,
                                           json.dumps(settings["source"], sort_keys=True))
                    entry["rank"] = dist.rank
                round_entries = [e for e in dist.gather_json(entry) if e is not None]
                computed += sum(e["inputs"] for e in round_entries)
                bar.update(sum(e["inputs"] for e in round_entries if e["rank"] != dist.rank))
                shards.extend(round_entries)
                if dist.is_main:
                    _write_manifest(out, manifest)  # a crash after this point resumes after this round
    finally:
        bar.close()
        adapter.model.train(was_training)
    seconds = time.perf_counter() - start_time
    n_tokens = sum(e["tokens"] for e in shards)
    manifest.update(status="complete", counts={"inputs": n, "tokens": n_tokens, "shards": len(shards)},
                    timing={"seconds": round(seconds, 3), "computed_inputs": computed,
                            "seconds_per_input": round(seconds / computed, 6) if computed else None})
    if dist.is_main:
        _write_manifest(out, manifest)  # written last: a complete capture.json means a complete capture
    dist.barrier()  # nobody reads the capture before its manifest says complete
    return CaptureResult(out, n, n_tokens, len(shards), resumed, seconds, computed, settings, dist.world_size)


def _prepare_on_main(dist: Dist, out: Path, key: str, overwrite: bool, n_shards: int) -> tuple[list[dict], int | None]:
    """Rank 0 checks, clears or resumes ``out`` and tells the others: the shards done, and the token count
    when the capture is already complete. Its refusal is raised on every rank (nobody waits forever)."""
    answer: dict = {}
    if dist.is_main:
        try:
            shards, old = _prepare_out_dir(out, key, overwrite)
            done = old is not None and old.get("status") == "complete" and len(shards) == n_shards
            answer = {"shards": shards, "complete": old["counts"]["tokens"] if done else None}
        except DebiasError as exc:
            if not dist.enabled:
                raise
            answer = {"error": str(exc)}
    answer = dist.broadcast_json(answer)
    if "error" in answer:
        raise DebiasError(answer["error"])
    return answer["shards"], answer["complete"]


def _progress_bar(total: int, initial: int, tower: str, enabled: bool):
    return tqdm(total=total, initial=initial, unit="img" if tower == "image" else "prompt", disable=not enabled,
                file=sys.stderr, desc="capture", dynamic_ncols=True)


def _capture_shard(adapter, module, tower, source, out: Path, s: int, lo: int, hi: int, tokens: str, k: int,
                   seed: int, dtype: torch.dtype, batch_size: int, bar, inputs_cache: InputCache | None = None,
                   source_id: str = "") -> dict:
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in PER_TOKEN + PER_INPUT}
    rows: list[dict] = []
    first = lo
    for b in range(lo, hi, batch_size):
        e = min(b + batch_size, hi)
        prepared, batch_rows = (inputs_cache.batch(adapter, source, source_id, b, e) if inputs_cache is not None
                                else _prepare_batch(adapter, source, b, e))
        h, inputs = _forward(adapter, module, tower, prepared)
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
