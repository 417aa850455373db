"""Export a patched model as a Hugging Face directory: original weights + fused edits + remote code.

Layout::

    config.json                  stock config + "debias" summary + "auto_map" -> modeling_debias
    model.safetensors            ORIGINAL weights as save_pretrained writes them, in the layout transformers
                                 4.57 and 5.x both load (5.x's flattened CLIP vision keys are written 4.x-style)
    debias_patches.safetensors   fused edit buffers (debias_patches.<i>.<j>.<buffer>)
    debias_config.json           patch records (site, positions, fused edit specs), the edits' configs,
                                 provenance, base class
    modeling_debias.py           generated: Debias<Stock>(stock class) whose from_pretrained installs the edits
    debias_runtime.py            verbatim copy of debias_export/runtime.py (torch only)
    manifest.json                SHA-256 + size of every file, package versions, provenance

Families plug in with :func:`~.hf_dir.register_hf_spec` (how to save/load the base model, which auto class) from
their ``families/<family>.py`` module.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from .. import runtime
from ..adapters import ModelAdapter, adapter_for
from ..core.errors import DebiasError
from ..edits import PatchHandle, current_patch, patch_tensors
from .hf_dir import (
    DEBIAS_CONFIG,
    DEBIAS_PATCHES,
    FORMAT,
    MODELING_FILE,
    RUNTIME_FILE,
    hf_spec,
    patch_handle,
    unpatched,
)
from .loading import check_reload
from .manifest import atomic_output_dir, write_manifest

TEMPLATE = Path(__file__).parent / "templates" / "hf_modeling.py"


def _edit_summary(edit: Any) -> dict[str, Any]:
    cfg = edit.to_json()
    return {"kind": edit.kind, **{k: v for k, v in cfg.items() if k not in ("sae_config", "provenance")}}


def edit_provenance(adapter: ModelAdapter, handle: PatchHandle, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where the edit came from: source model, each edit's own provenance and SAE metadata, user extras."""
    edits = []
    for edit in handle.edits:
        cfg = edit.to_json()
        edits.append({"kind": edit.kind, "site": cfg.get("site"), "model": cfg.get("model"),
                      "provenance": cfg.get("provenance") or {},
                      "sae_metadata": (cfg.get("sae_config") or {}).get("metadata") or {}})
    return {"source_model": adapter.source, "family": adapter.family, "edits": edits, **(extra or {})}


def modeling_code(class_name: str, stock_module: str) -> str:
    """``modeling_debias.py``: the template with the stock import and the ``Debias<class>`` subclass."""
    text = TEMPLATE.read_text()
    imports = f"from {stock_module} import {class_name}"
    cls = (f"class Debias{class_name}(DebiasPatchedMixin, {class_name}):\n"
           f'    """{class_name} with this directory\'s debiasing edits installed by ``from_pretrained``."""\n'
           f"\n\nshare_stock_conversions({class_name}, Debias{class_name})\n")
    for marker in ("# @@STOCK_IMPORTS@@", "# @@CLASSES@@"):
        if marker not in text:
            raise RuntimeError(f"modeling template {TEMPLATE} lost its {marker} marker")
    return text.replace("# @@STOCK_IMPORTS@@", imports).replace("# @@CLASSES@@", cls)


def write_hf_dir(adapter: ModelAdapter, handle: PatchHandle, out: Path, provenance: dict[str, Any]) -> None:
    """Write every file of the export into ``out`` (an existing, empty directory)."""
    spec = hf_spec(adapter.family)
    with unpatched(handle):
        spec.save_base(adapter, out)
    tensors = {k: v.detach().cpu().contiguous() for k, v in patch_tensors(handle).items()}
    save_file(tensors, str(out / DEBIAS_PATCHES), metadata={"format": FORMAT})
    base = spec.base_info(adapter)
    debias = {"format": FORMAT, "family": adapter.family, "base": base, "patches": handle.records,
              "edits": [{"kind": e.kind, **e.to_json()} for e in handle.edits], "provenance": provenance}
    (out / DEBIAS_CONFIG).write_text(json.dumps(debias, indent=2, sort_keys=True, default=str) + "\n")
    config_file = out / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["debias"] = {"format": FORMAT, "config_file": DEBIAS_CONFIG, "patches_file": DEBIAS_PATCHES,
                            "edits": [_edit_summary(e) for e in handle.edits]}
        if spec.auto_class:
            config["auto_map"] = {spec.auto_class: f"{Path(MODELING_FILE).stem}.Debias{base['class']}"}
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if spec.auto_class:
        (out / MODELING_FILE).write_text(modeling_code(base["class"], base["module"]))
        shutil.copyfile(runtime.__file__, out / RUNTIME_FILE)
    write_manifest(out, kind="hf", provenance=provenance, extra={"family": adapter.family})


def export_folded(adapter: ModelAdapter, out_dir: str | Path, folds: list[dict[str, Any]], overwrite: bool = False,
                  provenance: dict[str, Any] | None = None, validate: bool = True, baseline: bool = False) -> Path:
    """Write a model whose edits are all folded into its weights as a STOCK directory; returns ``out_dir``.

    The family's plain ``save_base`` (for HF CLIP: ``save_pretrained``), so ``CLIPModel.from_pretrained``
    loads it without this package; ``debias_config.json`` (no patches, the fold records) and the manifest
    sit beside it for :func:`load_patched`/``validate``. ``folds``: :func:`edits.projection.fold_record` dicts.
    ``baseline``: export the unmodified model the same way (no folds, no patches; ``"edited": false`` in
    ``debias_config.json`` and the manifest), e.g. for a side-by-side deployment or a latency baseline.
    """
    adapter = adapter_for(adapter)
    if current_patch(adapter.model):
        raise DebiasError("model also carries a runtime patch; export it with export_patched (folds are in its weights)")
    if baseline and folds:
        raise DebiasError("a baseline export has no folds; the model's weights carry folded edits")
    if not folds and not baseline:
        raise DebiasError("no folded edits to export")
    if not all(f.get("stock", True) for f in folds):
        raise DebiasError("a fold added modules the stock class lacks (add_bias=True); it cannot be a stock checkpoint")
    spec = hf_spec(adapter.family)
    out_dir = Path(out_dir)
    prov = {"source_model": adapter.source, "family": adapter.family, "folds": folds, **(provenance or {})}
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        with atomic_output_dir(out_dir, overwrite) as tmp:
            spec.save_base(adapter, tmp)
            debias = {"format": FORMAT, "family": adapter.family, "base": spec.base_info(adapter), "patches": [],
                      "folds": folds, "edits": [f["edit"] for f in folds], "provenance": prov, "edited": not baseline}
            (tmp / DEBIAS_CONFIG).write_text(json.dumps(debias, indent=2, sort_keys=True, default=str) + "\n")
            write_manifest(tmp, kind="hf", provenance=prov, extra={"family": adapter.family, "stock": True,
                                                                   "edited": not baseline})
            if validate:
                check_reload(adapter, tmp)
    finally:
        adapter.model.train(was_training)
    return out_dir


def export_patched(handle_or_adapter: "PatchHandle | ModelAdapter | nn.Module", out_dir: str | Path,
                   overwrite: bool = False, provenance: dict[str, Any] | None = None, validate: bool = True) -> Path:
    """Write the patched model as a self-describing HF directory (see module doc); returns ``out_dir``.

    An unpatched model is an error: there is nothing to add to a plain ``save_pretrained``.
    ``validate`` reloads the directory with :func:`load_patched` before it is published and
    requires bit-identical outputs on every tower. Atomic: a failure leaves no ``out_dir`` and an
    existing one (with ``overwrite``) intact.
    """
    handle = patch_handle(handle_or_adapter)
    adapter = handle.adapter
    out_dir = Path(out_dir)
    prov = edit_provenance(adapter, handle, provenance)
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        with atomic_output_dir(out_dir, overwrite) as tmp:
            write_hf_dir(adapter, handle, tmp, prov)
            if validate:
                check_reload(adapter, tmp)
    finally:
        adapter.model.train(was_training)
    return out_dir
