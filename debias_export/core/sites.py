"""Names of places in an encoder where activations are read and edits are applied.

A site is ``<tower>.<layer>.<kind>``, e.g. ``image.11.resid_post`` (the residual stream after
block 11 of the image tower). Negative layers count from the end (``image.-2.resid_post``), as in
LLaVA's ``vision_feature_layer``; adapters resolve them to absolute indices.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import DebiasError

SITE_KINDS = ("resid_post", "attn_out", "mlp_out")


@dataclass(frozen=True)
class Site:
    """One activation site of one tower."""

    tower: str
    layer: int
    kind: str = "resid_post"

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise DebiasError(f"unknown site kind {self.kind!r}; expected one of {', '.join(SITE_KINDS)}")

    @property
    def name(self) -> str:
        return f"{self.tower}.{self.layer}.{self.kind}"

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.name

    @classmethod
    def parse(cls, text: "str | Site") -> "Site":
        """Parse ``tower.layer[.kind]``; ``kind`` defaults to ``resid_post``."""
        if isinstance(text, Site):
            return text
        parts = str(text).strip().split(".")
        if len(parts) not in (2, 3):
            raise DebiasError(f"bad site {text!r}: expected 'tower.layer[.kind]', e.g. 'image.11.resid_post'")
        try:
            layer = int(parts[1])
        except ValueError:
            raise DebiasError(f"bad site {text!r}: layer {parts[1]!r} is not an integer") from None
        return cls(parts[0], layer, parts[2] if len(parts) == 3 else "resid_post")

    def to_dict(self) -> dict:
        return {"tower": self.tower, "layer": self.layer, "kind": self.kind}
