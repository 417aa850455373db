"""Reading a capture directory back: :class:`ActivationStore` (settings, labelled rows, shards, pooled activations)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from ..core.errors import DebiasError, IntegrityError
from ..core.model_match import FINGERPRINT_KEY
from ..sae.model import read_safetensors
from .format import FORMAT, MANIFEST, PER_INPUT, PER_TOKEN, _sha256


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
