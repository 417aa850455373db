"""The model-adapter interface every model family implements.

An adapter wraps one loaded model and answers the questions the rest of the toolkit asks:
which towers and blocks exist, what a site name means, which token positions of a block's output
reach the tower's output, how to preprocess inputs and how to compute a tower's embeddings.
Nothing outside ``adapters/`` looks at model internals directly.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..core.errors import DebiasError
from ..core.sites import Site
from ..core.specs import check_source, is_builtin_spec, suggest


@dataclass(frozen=True)
class OutputPositions:
    """Which token positions of a site's output can influence the tower's output.

    ``static_index``: one fixed position (CLS at 0 for ViT towers). Otherwise ``rule`` names a
    position rule of :mod:`debias_export.runtime` (JSON-serialisable, e.g.
    ``{"rule": "eos_first", "input": "input_ids", "eos_token_id": 49407}``) evaluated on the inputs
    of the module at ``hook_path`` (the tower). ``None`` instead of an instance: every position is read.
    """

    static_index: int | None = None
    rule: dict | None = None
    hook_path: str | None = None

    @property
    def is_static(self) -> bool:
        return self.static_index is not None


class ModelAdapter(ABC):
    """Uniform view of one model family. Subclasses register with :func:`register_adapter`."""

    family: ClassVar[str] = ""
    # The bias metric that fits the family, which picks the eval step's evaluator (eval.recipe_eval):
    # "retrieval" (an image and a text tower: MaxSkew, PAIRS) or "vla_gender_bias" (a VLM answering yes/no questions).
    bias_metric: ClassVar[str] = "retrieval"
    # Model spec of a tiny random instance (``tiny-clip[:seed]``) built by :meth:`tiny`, for tests and offline runs.
    tiny_name: ClassVar[str | None] = None

    @classmethod
    def tiny(cls, seed: int = 0) -> "ModelAdapter":
        """A tiny random instance of the family (the model spec ``<tiny_name>[:seed]``)."""
        raise DebiasError(f"model family {cls.family!r} has no tiny builder")

    def __init__(self, model: nn.Module, source: str | None = None, processor: Any = None):
        self.model = model
        self.source = source  # hub id / local dir / "config" — recorded in manifests
        self.processor = processor

    # ----- discovery -------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter understands ``model``."""

    @classmethod
    @abstractmethod
    def load(cls, spec: str, **kwargs: Any) -> "ModelAdapter":
        """Load from a hub id, a local directory or the family's tiny spec (start with :meth:`builtin_spec`)."""

    @classmethod
    def builtin_spec(cls, spec: "str | os.PathLike[str]", check: bool = True) -> "ModelAdapter | None":
        """What a family's :meth:`load` does first: its own tiny spec (``tiny-clip[:seed]``) is built here; a spec
        this family cannot load (``biaslab``, ``arch:...``, another family's tiny model) is a one-line error naming
        ``debias_export.load_adapter`` (the one entry point for every spec, which sits above this layer); a spec
        that is no local path and no cached hub model while hub access is off fails fast with a suggestion.
        None: go on with ``from_pretrained`` (pass it :func:`~debias_export.adapters.specs.hub_kwargs`).
        ``check=False`` skips the last test (open_clip names are neither paths nor hub ids)."""
        spec = os.fspath(spec)
        name, _, seed_text = spec.partition(":")
        if cls.tiny_name and name == cls.tiny_name:
            adapter = cls.tiny(parse_seed(spec, seed_text))
            adapter.source = spec
            return adapter
        if os.path.exists(spec):
            return None
        own = [cls.tiny_name] if cls.tiny_name else []
        if is_builtin_spec(spec) and not suggest(spec, own):
            raise DebiasError(f"{spec!r} is not a {cls.family} model spec: debias_export.load_adapter({spec!r}) loads "
                              f"every model spec (tiny models, biaslab, arch:..., exports, directories, hub ids)")
        if check:
            check_source(spec, own)
        return None

    @abstractmethod
    def towers(self) -> tuple[str, ...]:
        """Tower names present in this model, e.g. ``("image", "text")``."""

    @abstractmethod
    def blocks_path(self, tower: str) -> str:
        """Qualified module name of the ``nn.ModuleList`` holding the tower's blocks."""

    @abstractmethod
    def width(self, tower: str) -> int:
        """Residual-stream width of the tower."""

    @abstractmethod
    def output_positions(self, tower: str) -> OutputPositions | None:
        """Positions of the *last consumed* block's output that reach the tower output."""

    @abstractmethod
    def output_token_index(self, tower: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Index of the token the tower pools into its output, per row (``LongTensor[B]``)."""

    @abstractmethod
    def prepare_images(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """PIL images -> model inputs for the image tower."""

    @abstractmethod
    def prepare_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Strings -> model inputs for the text tower (padded)."""

    @abstractmethod
    def embed(self, tower: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tower's output embedding (projected, not normalised)."""

    def run_tower(self, tower: str, inputs: dict[str, torch.Tensor]) -> None:
        """Run the tower far enough for every block hook to fire (default: full embedding)."""
        self.embed(tower, inputs)

    def sub_module_path(self, site: Site) -> str | None:
        """Module (relative to the block) whose output is the site, for write sites."""
        return None

    # ----- shared logic ------------------------------------------------------------------------
    def blocks(self, tower: str) -> nn.ModuleList:
        self.check_tower(tower)
        return self.model.get_submodule(self.blocks_path(tower))

    def num_layers(self, tower: str) -> int:
        return len(self.blocks(tower))

    def consumed_layer(self, tower: str) -> int:
        """The last block whose output reaches the tower output (LLaVA reads layer -2)."""
        return self.num_layers(tower) - 1

    def default_site(self, tower: str) -> Site:
        return Site(tower, self.consumed_layer(tower))

    def check_tower(self, tower: str) -> None:
        if tower not in self.towers():
            raise DebiasError(f"model family {self.family!r} has no tower {tower!r}; towers: {', '.join(self.towers())}")

    def resolve_site(self, site: "str | Site") -> Site:
        """Absolute-layer site, validated against this model (clear error when it does not exist)."""
        site = Site.parse(site)
        self.check_tower(site.tower)
        n = self.num_layers(site.tower)
        layer = site.layer + n if site.layer < 0 else site.layer
        if not 0 <= layer < n:
            raise DebiasError(f"site {site.name!r}: layer {site.layer} out of range; tower {site.tower!r} has {n} blocks (0..{n - 1})")
        if site.kind != "resid_post" and self.sub_module_path(Site(site.tower, layer, site.kind)) is None:
            raise DebiasError(f"site kind {site.kind!r} is not supported by model family {self.family!r}")
        return Site(site.tower, layer, site.kind)

    def block_path(self, site: Site) -> str:
        return f"{self.blocks_path(site.tower)}.{site.layer}"

    def site_module_path(self, site: "str | Site") -> str:
        """Qualified name of the module whose forward output is the site's activation."""
        site = self.resolve_site(site)
        sub = self.sub_module_path(site)
        return self.block_path(site) + (f".{sub}" if sub else "")

    def site_positions(self, site: "str | Site") -> OutputPositions | None:
        """Positions of this site that matter downstream (pruning applies only at the consumed block)."""
        site = self.resolve_site(site)
        if site.kind == "resid_post" and site.layer == self.consumed_layer(site.tower):
            return self.output_positions(site.tower)
        return None

    def site_is_consumed(self, site: "str | Site") -> bool:
        """False when the site's block lies after the consumed layer (an edit there is a no-op)."""
        site = self.resolve_site(site)
        return site.layer <= self.consumed_layer(site.tower)

    def unread_site_message(self, site: "str | Site") -> str | None:
        """None when the model reads ``site``; else one line saying which block it reads instead (LLaVA reads its
        vision tower only up to ``vision_feature_layer``, so ``image.-1`` is never seen by the language model)."""
        site = self.resolve_site(site)
        last = self.consumed_layer(site.tower)
        if site.layer <= last:
            return None
        why = self.consumed_layer_reason(site.tower)
        return (f"site {site.name} is never read: the {self.family} model reads its {site.tower} tower only up to "
                f"block {last} ({site.tower}.{last}{', ' + why if why else ''}); an edit there changes nothing and "
                f"activations there are not what the model uses")

    def consumed_layer_reason(self, tower: str) -> str:
        """Why :meth:`consumed_layer` is not the last block (for messages; '' when it is)."""
        return ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        return {
            "family": self.family,
            "source": self.source,
            "towers": {t: {"layers": self.num_layers(t), "width": self.width(t)} for t in self.towers()},
        }


def parse_seed(spec: str, seed_text: str) -> int:
    """The ``:seed`` of ``tiny-clip:3`` (0 when absent)."""
    try:
        return int(seed_text) if seed_text else 0
    except ValueError:
        raise DebiasError(f"bad model spec {spec!r}: seed {seed_text!r} is not an integer") from None


def refuse_patched_export(path: str | os.PathLike) -> None:
    """A family's stock loader must not open an exported patched directory: it would silently drop the edits."""
    if os.path.isfile(os.path.join(path, "debias_config.json")):
        raise DebiasError(f"{path} is an exported patched model: load it with debias_export.load_patched "
                          f"(or pass it as --model), which installs its edits")
