"""The recipe's ``select:`` section (the held-out protocol) and its grid: schema, validation, cells.

A grid maps recipe keys (:data:`GRID_KEYS`) to value lists; every combination is a cell, validated as if it
were written into the recipe, and scored on the selection split by :mod:`.protocol`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..core.errors import ConfigError
from .recipe_coerce import show


SELECT_LAB_SPLIT = "biaslab:validation"  # the UTKFace faces the shipped bias lab never trained on
# recipe keys a selection grid may sweep (each value list is validated as if written in the recipe)
GRID_KEYS = ("site", "capture.tokens", "sae.k", "sae.expansion", "probe.tau", "probe.top_n", "probe.activations",
             "edit.alpha", "edit.value", "edit.mode", "edit.method", "edit.strength", "edit.fold", "edit.center",
             "edit.keep")
UTILITY_METRICS = ("caption_recall@5", "caption_recall@10", "caption_recall@50", "caption_recall_no_gender@5",
                   "caption_recall_no_gender@10", "caption_recall_no_gender@50", "gender_zero_shot_acc",
                   "age_zero_shot_acc", "race_zero_shot_acc")
MAX_GRID_CELLS = 256


@dataclass
class SelectSection:
    """The held-out protocol: every setting in ``grid`` is chosen on this split only (faces + the ``select``
    half of each prompt set's concepts); the evaluation data is read once, after selection."""

    images: str = SELECT_LAB_SPLIT  # labelled image CSV (relative to data.dir) or biaslab:validation
    image_dir: Optional[str] = None
    column: Optional[str] = None  # the label whose retrieval skew is minimised (default: probe.column)
    limit: Optional[int] = None
    k: int = 50
    max_utility_loss: float = 0.02  # relative drop allowed in each utility metric on the selection split
    utility: list[str] = field(default_factory=lambda: ["age_zero_shot_acc", "race_zero_shot_acc", "caption_recall@10"])
    grid: dict = field(default_factory=dict)  # {recipe key (GRID_KEYS): [values]}; every combination is scored


def grid_cells(r: Any) -> list[dict[str, Any]]:
    """Every combination of ``select.grid`` (in key order, last key fastest); ``[{}]`` without a grid."""
    cells: list[dict[str, Any]] = [{}]
    for key, values in ((r.select.grid if r.select else None) or {}).items():
        cells = [{**c, key: v} for c in cells for v in values]
    return cells


def apply_cell(r: Any, cell: dict[str, Any]) -> Any:
    """``r`` with the grid cell's settings (``"site"`` or ``"section.field"`` keys) written in."""
    for key, value in cell.items():
        if key == "site":
            r = dataclasses.replace(r, site=value)
            continue
        section, name = key.split(".")
        r = dataclasses.replace(r, **{section: dataclasses.replace(getattr(r, section), **{name: value})})
    return r


def check_select(r: Any, bad: Any, where: str, check_values: Callable[[Any, str], None],
                 coerce: Callable[[Any, Any, str], Any]) -> None:
    """Validate ``r.select``: its numbers, utility names and every grid cell as a full recipe (``check_values``,
    the recipe's own value check; ``coerce`` converts grid values to the swept field's type)."""
    s = r.select
    if s.k <= 0:
        raise bad("select.k", f"must be positive, got {s.k}")
    if s.limit is not None and s.limit < 2:
        raise bad("select.limit", f"must be >= 2, got {s.limit}")
    if not 0.0 <= s.max_utility_loss <= 1.0:
        raise bad("select.max_utility_loss", f"must be in [0, 1] (a relative drop), got {s.max_utility_loss}")
    unknown = [m for m in s.utility if m not in UTILITY_METRICS]
    if unknown:
        raise bad("select.utility", f"unknown {show(unknown)}; expected some of {', '.join(UTILITY_METRICS)}")
    if not isinstance(s.grid, dict):
        raise bad("select.grid", f"must be a mapping of recipe key -> list of values, got {show(s.grid)}")
    hints = {f"{sec}.{f.name}": typing.get_type_hints(type(getattr(r, sec)))[f.name]
             for sec in ("capture", "sae", "probe", "edit") for f in dataclasses.fields(getattr(r, sec))}
    hints["site"] = str
    for key, values in s.grid.items():
        if key not in GRID_KEYS:
            raise bad("select.grid", f"unknown key {show(key)}; a grid may sweep {', '.join(GRID_KEYS)}")
        if not isinstance(values, list) or not values:
            raise bad(f"select.grid.{key}", f"must be a non-empty list of values, got {show(values)}")
        s.grid[key] = [coerce(v, hints[key], f"{where}: select.grid.{key}[{i}]") for i, v in enumerate(values)]
    cells = grid_cells(r)
    if len(cells) > MAX_GRID_CELLS:
        raise bad("select.grid", f"{len(cells)} combinations; at most {MAX_GRID_CELLS}")
    for cell in cells:
        cr = apply_cell(dataclasses.replace(r, select=None), cell)
        try:
            check_values(cr, where)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (select.grid cell {show(cell)})") from None
