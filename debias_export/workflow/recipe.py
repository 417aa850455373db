"""YAML recipes: a typed schema, parsed strictly (unknown/missing keys and bad values name their key path).

A recipe chains capture -> train-sae -> probe -> patch -> export -> validate (-> bench -> eval); with
``edit.kind: projection`` it chains capture -> fit (LEACE / mean difference of ``probe.column``) -> fold or
patch -> export -> validate (-> bench -> eval) and trains no SAE. Paths in
``data`` are relative to ``data.dir`` (default: ``$DEBIAS_EXPORT_DATA`` or ``../shared/data``); ``output.dir``
is relative to the current directory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..core.choices import EDIT_KINDS, MAX_OPSET, MIN_OPSET, ONNX_EXPORTERS, SAE_CONTROLS, SAE_MODES
from ..core.choices import EXPORT_FOLDS as FOLDS
from ..core.errors import ConfigError
from .recipe_coerce import build_section as _build
from .recipe_coerce import coerce as _coerce
from .recipe_coerce import show as _show
from .recipe_lines import check_duplicate_keys, key_lines, line_of, yaml_error_message
from .recipe_select import SelectSection, apply_cell, check_select, grid_cells  # noqa: F401 (re-exported schema)

BENCH_RUNTIMES = ("torch", "ort", "torch-cuda", "ort-cuda")
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")  # export.quantize.PRECISIONS (not imported: recipes load without onnx)
NEUTRAL_PROMPTS = "prompts:neutral"  # data.texts value: the built-in neutral corpus (workflow.lean)
LABEL_BY = ("column", "lean")  # data.label_by: the file's probe.column (default) or the retrieval lean


@dataclass
class ModelSection:
    spec: str  # hub id, local dir, "tiny-clip[:seed]", or "arch:<real config name>" (random weights)
    family: Optional[str] = None


@dataclass
class DataSection:
    dir: Optional[str] = None
    images: Optional[str] = None  # labelled image CSV (relative to dir)
    image_dir: Optional[str] = None
    texts: Optional[str] = None  # prompts file for text-tower capture, or prompts:neutral (the built-in neutral corpus)
    captions_from: Optional[str] = None  # labelled image CSV whose labels become captions (text tower)
    limit: Optional[int] = None
    # where the fit data's probe.column labels come from: the file (column) or, for text fit data under select:,
    # the sign of each sentence's retrieval lean over the selection faces (lean: erase *implicit* gender)
    label_by: str = "column"


@dataclass
class CaptureSection:
    tokens: str = "random-k"
    k: int = 2
    batch_size: int = 32


@dataclass
class SAESection:
    path: Optional[str] = None  # reuse/import an SAE instead of training
    k: int = 20
    expansion: int = 8
    batch_size: int = 4096
    steps: int = 1000
    lr: Optional[float] = None


@dataclass
class ProbeSection:
    column: str = "gender"
    tau: float = 0.1
    top_n: int = 1
    # which per-input activations are encoded for probing: the mean over the captured tokens (DeBiasLens) or
    # the token the tower output reads (CLS/EOS) - what a last-block edit touches
    activations: str = "mean"


@dataclass
class EditSection:
    kind: str = "sae"  # sae (DeBiasLens neuron edit) | projection (LEACE / mean-difference erasure of probe.column)
    alpha: float = 0.6
    # v the neurons are set to: a number (0 = DeBiasLens' zeroing) or "mean": each neuron's group-balanced mean
    # activation on the probed inputs (mean ablation)
    value: Union[float, str] = 0.0
    mode: str = "reconstruct"
    neurons: Optional[list[int]] = None  # explicit neurons instead of the probe's
    # kind: projection (fitted on the capture, labels from probe.column; the eval sweep's alpha is b)
    method: str = "leace"  # leace | mean_diff
    strength: float = 1.0  # b
    amplify: float = 0.0  # g, needs fair_from
    fair_from: Optional[str] = None  # safetensors with raw fair directions [d, m] (relative to the current dir)
    center: bool = True
    fold: str = "none"  # none (fused patch) | site | output | every_writer
    # per-input activations the projection is fitted on: auto (the pooled output token where the family has one,
    # else the token mean), mean (mean over the captured tokens: an edit of every token) or output
    fit_on: str = "auto"
    # label columns whose linear information the erasure leaves intact (LEACE only), e.g. [age]: erase gender
    # without erasing age (integer ages are binned as FairFace's age bins)
    keep: list[str] = field(default_factory=list)


PROJECTION_FIELDS = ("method", "strength", "amplify", "fair_from", "center", "fold", "fit_on", "keep")


@dataclass
class ExportSection:
    onnx: bool = True
    opset: int = 20
    atol: float = 1e-4
    rtol: float = 1e-5  # ONNX parity bound is atol + rtol * max|ref| (export.onnx_export.DEFAULT_RTOL)
    exporter: str = "dynamo"  # dynamo | torchscript | optimum (where optimum-onnx is installed)
    # ONNX variants (export --precision): fp32 always, fp16 / int8 added and validated on the edit; the bench
    # step (when the recipe has one) times each of them
    precisions: list[str] = field(default_factory=lambda: ["fp32"])


@dataclass
class BenchSection:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    reps: int = 10
    runtimes: list[str] = field(default_factory=lambda: ["torch", "ort"])


@dataclass
class EvalSection:
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.6, 0.9])
    k: int = 50
    # faces evaluated: the first N of FairFace 540 (CLIP-style families) or a gender-balanced sample of N
    # (LLaVA, where every face costs one LM forward per question; defaults to data.limit there)
    limit: Optional[int] = None
    # SAE edits only: controls evaluated beside the chosen edit, per seed (workflow.controls): "reconstruction"
    # (the SAE's reconstruction, no latent changed) and / or "random" (frequency-matched random latents)
    controls: list[str] = field(default_factory=list)


@dataclass
class OutputSection:
    dir: str
    overwrite: bool = False


@dataclass
class Recipe:
    name: str
    model: ModelSection
    site: str
    output: OutputSection
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    capture: CaptureSection = field(default_factory=CaptureSection)
    sae: SAESection = field(default_factory=SAESection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    edit: EditSection = field(default_factory=EditSection)
    export: ExportSection = field(default_factory=ExportSection)
    bench: Optional[BenchSection] = None
    eval: Optional[EvalSection] = None
    select: Optional[SelectSection] = None
    seeds: Optional[list[int]] = None  # SAE seeds (>= 1); default [seed]; capture uses the first
    # Each variant is a mapping with a ``name`` plus any sections to override; it runs as its own recipe.
    variants: Optional[list[dict]] = None
    source: Optional[str] = None  # path of the YAML file (set by the loader)


def _check_values(r: Recipe, where: str) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {msg}")

    if not 0.0 <= r.edit.alpha <= 1.0:
        raise bad("edit.alpha", f"must be in [0, 1], got {r.edit.alpha}")
    _check_edit_kind(r.edit, bad)
    if r.probe.column in r.edit.keep:
        raise bad("edit.keep", f"cannot keep {r.probe.column!r}: it is probe.column, the label the edit erases")
    if r.edit.mode not in SAE_MODES:
        raise bad("edit.mode", f"must be reconstruct or residual, got {r.edit.mode!r}")
    if isinstance(r.edit.value, str) and r.edit.value != "mean":
        raise bad("edit.value", f"must be a number or 'mean', got {_show(r.edit.value)}")
    if r.capture.tokens not in ("random-k", "output", "all"):
        raise bad("capture.tokens", f"must be random-k, output or all, got {r.capture.tokens!r}")
    for key, val in (("capture.k", r.capture.k), ("capture.batch_size", r.capture.batch_size), ("sae.k", r.sae.k),
                     ("sae.expansion", r.sae.expansion), ("sae.batch_size", r.sae.batch_size), ("sae.steps", r.sae.steps),
                     ("probe.top_n", r.probe.top_n)):
        if val <= 0:
            raise bad(key, f"must be positive, got {val}")
    if r.edit.neurons is not None:
        if any(n < 0 for n in r.edit.neurons):
            raise bad("edit.neurons", f"must be >= 0, got {_show(r.edit.neurons)}")
        if len(set(r.edit.neurons)) != len(r.edit.neurons):
            raise bad("edit.neurons", f"duplicated neuron ids in {_show(r.edit.neurons)}")
    if r.data.limit is not None and r.data.limit < 0:
        raise bad("data.limit", f"must be >= 0, got {r.data.limit}")
    if r.export.atol < 0:
        raise bad("export.atol", f"must be >= 0, got {r.export.atol}")
    if r.export.rtol < 0:
        raise bad("export.rtol", f"must be >= 0, got {r.export.rtol}")
    if r.export.exporter not in ONNX_EXPORTERS:
        raise bad("export.exporter", f"must be one of {', '.join(ONNX_EXPORTERS)}, got {_show(r.export.exporter)}")
    lo, hi = MIN_OPSET[r.export.exporter], MAX_OPSET[r.export.exporter]
    if not lo <= r.export.opset <= hi:
        raise bad("export.opset", f"must be in [{lo}, {hi}] for the {r.export.exporter} exporter, got {r.export.opset}")
    if not r.export.precisions or len(set(r.export.precisions)) != len(r.export.precisions) or \
            any(p not in EXPORT_PRECISIONS for p in r.export.precisions):
        raise bad("export.precisions", f"must be distinct values from {', '.join(EXPORT_PRECISIONS)}, "
                                       f"got {_show(r.export.precisions)}")
    if not r.export.onnx and r.export.precisions != ["fp32"]:
        raise bad("export.precisions", f"{_show(r.export.precisions)} needs export.onnx: true (variants are ONNX graphs)")
    if r.sae.lr is not None and r.sae.lr <= 0:
        raise bad("sae.lr", f"must be positive, got {r.sae.lr}")
    if r.bench is not None:
        if r.bench.reps <= 0:
            raise bad("bench.reps", f"must be positive, got {r.bench.reps}")
        if not r.bench.batch_sizes or any(b <= 0 for b in r.bench.batch_sizes):
            raise bad("bench.batch_sizes", f"must be positive integers, got {_show(r.bench.batch_sizes)}")
        unknown = [x for x in r.bench.runtimes if x not in BENCH_RUNTIMES]
        if unknown:
            raise bad("bench.runtimes", f"unknown {_show(unknown)}; expected some of {', '.join(BENCH_RUNTIMES)}")
    if r.eval is not None:
        if any(not 0.0 <= a <= 1.0 for a in r.eval.alphas):
            raise bad("eval.alphas", f"must lie in [0, 1], got {_show(r.eval.alphas)}")
        if r.eval.k <= 0:
            raise bad("eval.k", f"must be positive, got {r.eval.k}")
        if r.eval.limit is not None and r.eval.limit < 2:
            raise bad("eval.limit", f"must be >= 2 (faces of both genders), got {r.eval.limit}")
        if any(c not in SAE_CONTROLS for c in r.eval.controls) or len(set(r.eval.controls)) != len(r.eval.controls):
            raise bad("eval.controls", f"must be distinct values from {', '.join(SAE_CONTROLS)}, got {_show(r.eval.controls)}")
        if r.eval.controls and r.select is None and r.seeds is None:
            raise bad("eval.controls", "needs the held-out protocol (seeds: and / or select:): controls are evaluated per "
                                       "SAE seed beside the chosen edit")
    if r.probe.activations not in ("mean", "output"):
        raise bad("probe.activations", f"must be mean or output, got {r.probe.activations!r}")
    if not 0.0 < r.probe.tau <= 1.0:
        raise bad("probe.tau", f"must be in (0, 1], got {r.probe.tau}")
    given = [k for k in ("images", "texts", "captions_from") if getattr(r.data, k)]
    if len(given) != 1:
        raise bad("data", f"needs exactly one of images (labelled image CSV), texts or captions_from; got {given or 'none'}")
    _check_label_by(r, bad)
    if r.seeds is not None:
        if not r.seeds or any(x < 0 for x in r.seeds) or len(set(r.seeds)) != len(r.seeds):
            raise bad("seeds", f"must be a non-empty list of distinct integers >= 0, got {_show(r.seeds)}")
    if r.select is not None:
        check_select(r, bad, where, _check_values, _coerce)


def _check_label_by(r: Recipe, bad: Any) -> None:
    if r.data.label_by not in LABEL_BY:
        raise bad("data.label_by", f"must be one of {', '.join(LABEL_BY)}, got {_show(r.data.label_by)}")
    if r.data.label_by == "lean":
        if r.data.images:
            raise bad("data.label_by", "lean labels text fit data (data.texts / captions_from), not images")
    elif r.data.texts == NEUTRAL_PROMPTS:
        raise bad("data.texts", f"{NEUTRAL_PROMPTS} has no labels; use it with data.label_by: lean")


def _check_edit_kind(e: EditSection, bad: Any) -> None:
    if e.kind not in EDIT_KINDS:
        raise bad("edit.kind", f"must be sae or projection, got {e.kind!r}")
    if e.kind == "sae":
        defaults = EditSection()
        for key in PROJECTION_FIELDS:
            if getattr(e, key) != getattr(defaults, key):
                raise bad(f"edit.{key}", "only applies to edit.kind: projection")
        return
    if e.method not in ("leace", "mean_diff"):
        raise bad("edit.method", f"must be leace or mean_diff, got {e.method!r}")
    if e.fold not in FOLDS:
        raise bad("edit.fold", f"must be one of {', '.join(FOLDS)}, got {e.fold!r}")
    if not 0.0 <= e.strength <= 1.0:
        raise bad("edit.strength", f"must be in [0, 1], got {e.strength}")
    if e.fit_on not in ("auto", "mean", "output"):
        raise bad("edit.fit_on", f"must be auto, mean or output, got {_show(e.fit_on)}")
    if e.amplify != 0.0 and not e.fair_from:
        raise bad("edit.amplify", "needs edit.fair_from (there are no fair directions to amplify)")
    if e.keep and e.method != "leace":
        raise bad("edit.keep", "needs edit.method: leace (mean_diff erases orthogonally and cannot keep other labels)")
    if e.neurons is not None:
        raise bad("edit.neurons", "only applies to edit.kind: sae")
    if e.value != 0.0:
        raise bad("edit.value", "only applies to edit.kind: sae (a projection has no neurons to set)")


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        # a variant's select.grid replaces the base grid (merging would sweep keys that do not apply to it)
        merge = isinstance(value, dict) and isinstance(out.get(key), dict) and key != "grid"
        out[key] = _merge(out[key], value) if merge else value
    return out


def parse_recipe(raw: Any, where: str = "recipe") -> Recipe:
    """Validate a recipe mapping (as loaded from YAML); each variant is validated as a full recipe too."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping, got {type(raw).__name__}")
    try:
        recipe = _build(Recipe, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check_values(recipe, where)
    if recipe.data.label_by == "lean" and recipe.select is None:  # here: select.grid cells are checked without select
        raise ConfigError(f"{where}: data.label_by: lean is measured over the selection faces: it needs a select: section")
    names = []
    for i, variant in enumerate(recipe.variants or []):
        if not isinstance(variant, dict) or not isinstance(variant.get("name"), str) or not variant["name"].strip():
            raise ConfigError(f"{where}: variants[{i}] must be a mapping with a non-empty 'name'")
        if "variants" in variant or "output" in variant:
            raise ConfigError(f"{where}: variants[{i}] may not set 'variants' or 'output'")
        if variant["name"] in names or "/" in variant["name"]:
            raise ConfigError(f"{where}: variants[{i}].name {variant['name']!r} is duplicated or contains '/'")
        names.append(variant["name"])
        base = {k: v for k, v in raw.items() if k != "variants"}
        parse_recipe(_merge(base, variant), where=f"{where}: variants[{i}] ({variant['name']})")
    return recipe


def expand_variants(recipe: Recipe) -> list[Recipe]:
    """The recipes a (possibly multi-variant) recipe runs, each named after its variant."""
    if not recipe.variants:
        return [recipe]
    base = dataclasses.asdict(recipe)
    base.pop("variants")
    base.pop("source")
    out = []
    for variant in recipe.variants:
        r = _build(Recipe, _merge(base, variant), "")
        r.source = recipe.source
        out.append(r)
    return out


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file; errors name the key path and its line."""
    path = Path(path)
    lines: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
        tree = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only: nothing is constructed
        check_duplicate_keys(tree, "", path)
        lines = key_lines(tree)
        raw = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"recipe not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_message(path, exc)) from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer past Python's int-string digit limit
        raise ConfigError(f"{path}: unreadable value ({str(exc).splitlines()[0][:80]})") from None
    try:
        recipe = parse_recipe(raw, where=str(path))
    except ConfigError as exc:
        rest = str(exc)[len(f"{path}: "):] if str(exc).startswith(f"{path}: ") else None
        line = line_of(rest, lines) if rest is not None else None
        if line is None:
            raise
        raise ConfigError(f"{path} line {line}: {rest}") from None
    recipe.source = str(path)
    return recipe
