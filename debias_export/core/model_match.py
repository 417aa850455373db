"""Which model an SAE or an edit was made for, and the check that it is used on that model.

An SAE trained on one site only means something at that site: the same width at another tower, layer or
model family (``tiny-clip`` and ``tiny-open-clip`` are both 32 wide) accepts it and silently computes
nonsense. So ``train-sae`` (from the capture), ``patch`` and ``project`` record what they were made for:

- the SAE's ``cfg.json`` metadata: ``tower``, ``site`` and ``model_fingerprint``;
- an edit's ``provenance["model_fingerprint"]``.

The **model fingerprint** is ``{"family": ..., "arch": ...}``: the model family plus a hash of the
architecture as the family adapter sees it (per tower: number of blocks, residual width, the shapes of
one block's parameters). It is cheap (no weights are read), the same for every checkpoint of one
architecture (an SAE may be reused on a fine-tune) and the same under transformers 4 and 5 (parameter
names are left out, shapes are not).

:func:`check_made_for` compares a record with the model and site in use: a difference is a
:class:`~debias_export.core.errors.ConfigError` naming it, unless the caller allows mismatches
(:func:`allow_mismatch`, the CLI's ``--allow-mismatch``), in which case it is one warning line.
Records without some field (imported SAEs, older files) are checked on what they have.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
from typing import Any, Iterator, Mapping

from .errors import ConfigError, DebiasError

FINGERPRINT_KEY = "model_fingerprint"
log = logging.getLogger("debias_export.core.model_match")
_ALLOW: contextvars.ContextVar[bool] = contextvars.ContextVar("debias_export_allow_mismatch", default=False)
# differences already warned about within the current allow_mismatch() block (an alpha sweep re-applies the edit)
_WARNED: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("debias_export_mismatch_warned", default=None)


def arch_fingerprint(adapter: Any) -> str:
    """16 hex digits identifying ``adapter``'s architecture (family, towers, blocks, widths, block shapes)."""
    towers = {}
    for tower in adapter.towers():
        blocks = adapter.blocks(tower)
        shapes = sorted(list(p.shape) for p in blocks[0].parameters()) if len(blocks) else []
        towers[tower] = {"layers": adapter.num_layers(tower), "width": adapter.width(tower), "block_param_shapes": shapes}
    blob = json.dumps({"family": adapter.family, "towers": towers}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_fingerprint(adapter: Any) -> dict[str, str]:
    """``{"family": ..., "arch": ...}`` of ``adapter`` (see the module docstring)."""
    return {"family": adapter.family, "arch": arch_fingerprint(adapter)}


@contextlib.contextmanager
def allow_mismatch(allowed: bool = True) -> Iterator[None]:
    """Within the block, :func:`check_made_for` warns (once per difference) instead of refusing (``--allow-mismatch``)."""
    token, warned = _ALLOW.set(bool(allowed)), _WARNED.set(set())
    try:
        yield
    finally:
        _ALLOW.reset(token)
        _WARNED.reset(warned)


def record_of(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields of an SAE metadata / edit provenance dict that say what it was made for (any may be absent)."""
    meta = meta if isinstance(meta, Mapping) else {}
    out: dict[str, Any] = {}
    fp = meta.get(FINGERPRINT_KEY)
    if isinstance(fp, Mapping):
        out.update({k: str(fp[k]) for k in ("family", "arch") if fp.get(k)})
    model = meta.get("model")
    if "family" not in out and isinstance(model, Mapping) and model.get("family"):
        out["family"] = str(model["family"])  # a capture's model record (train-sae before fingerprints)
    for key in ("site", "tower"):
        if isinstance(meta.get(key), str) and meta[key]:
            out[key] = meta[key]
    return out


def fingerprint_record(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only the model part (family, architecture) of :func:`record_of`: for edits, whose site is their own."""
    return {k: v for k, v in record_of(meta).items() if k in ("family", "arch")}


def _differences(record: Mapping[str, Any], adapter: Any, site: Any) -> list[str]:
    diffs = []
    family = record.get("family")
    if family and family != adapter.family:
        diffs.append(f"model family {family} vs {adapter.family}")
    elif record.get("arch") and record["arch"] != arch_fingerprint(adapter):
        diffs.append(f"architecture fingerprint {record['arch']} vs {arch_fingerprint(adapter)}")
    if site is None:
        return diffs
    if record.get("site"):
        try:
            made = adapter.resolve_site(record["site"])
        except DebiasError:
            made = None
        if made is None:
            diffs.append(f"site {record['site']} (not a site of this model) vs {site.name}")
        elif made.name != site.name:
            diffs.append(f"site {made.name} vs {site.name}")
    elif record.get("tower") and record["tower"] != site.tower:
        diffs.append(f"tower {record['tower']} vs {site.tower}")
    return diffs


def check_made_for(what: str, record: Mapping[str, Any], adapter: Any, site: Any = None) -> list[str]:
    """Refuse (or, when mismatches are allowed, warn once) if ``record`` was made for another model or site.

    ``what`` names the thing in the message (e.g. "SAE /path/to/sae"); ``site`` is the resolved
    :class:`~debias_export.core.sites.Site` it is applied at. Returns the differences found.
    """
    diffs = _differences(record, adapter, site)
    if not diffs:
        return diffs
    msg = f"{what} was made for another model or site: {'; '.join(diffs)} (recorded vs in use)"
    if not _ALLOW.get():
        raise ConfigError(f"{msg}; pass --allow-mismatch to use it anyway")
    key = "; ".join(diffs)  # the same difference found twice (capture, then the edit fitted on it): one warning
    warned = _WARNED.get()
    if warned is None or key not in warned:
        if warned is not None:
            warned.add(key)
        log.warning("warning: %s; used anyway (--allow-mismatch)", msg)
    return diffs
