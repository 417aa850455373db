"""The recipe's ``eval`` step: the evaluator of the metric the model's family declares (``ModelAdapter.bias_metric``).

Each evaluator writes ``compare/`` and ``sweep/`` report folders under ``out`` and returns the compact numbers a
recipe's ``run.json`` carries.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..adapters import ModelAdapter
from ..core.errors import DebiasError
from .llava_eval import recipe_eval as vla_gender_bias_recipe_eval
from .report import write_report
from .retrieval import EvalData, compare, sweep_alpha


def retrieval_recipe_eval(recipe: Any, adapter: ModelAdapter, make_edit: Callable[[float], Any], out: Path) -> dict[str, Any]:
    """Retrieval metrics before/after at the recipe's alpha, plus the alpha sweep (trade-off curve)."""
    data = EvalData.load(adapter, recipe.data.dir, max_images=recipe.eval.limit)
    cmp = compare(adapter, make_edit(recipe.edit.alpha), k=recipe.eval.k, shuffles=10, data=data)
    write_report(cmp, out / "compare", overwrite=True)
    rows = sweep_alpha(adapter, make_edit, recipe.eval.alphas, k=recipe.eval.k, data=data)
    write_report(rows, out / "sweep", overwrite=True)

    def skew(res: dict, attr: str = "gender") -> dict[str, float]:
        return {name: per[attr]["max_skew"] for name, per in res["retrieval"].items() if attr in per}

    return {"max_skew_gender_before": skew(cmp["base"]), "max_skew_gender_after": skew(cmp["patched"]),
            "noise_floor": {n: p["gender"].get("max_skew_shuffled") for n, p in cmp["base"]["retrieval"].items()},
            "utility_before": cmp["base"]["utility"], "utility_after": cmp["patched"]["utility"],
            "fidelity": cmp["fidelity"],
            "max_skew_gender_change_ci": {n: [c["gender"]["ci_low"], c["gender"]["ci_high"]]
                                          for n, c in cmp["bias_change"].items() if "gender" in c},
            "sweep": [{"alpha": r["alpha"], "max_skew_gender": skew(r), "utility": r["utility"]} for r in rows]}


RECIPE_EVALUATORS: dict[str, Callable[[Any, ModelAdapter, Callable[[float], Any], Path], dict[str, Any]]] = {
    "retrieval": retrieval_recipe_eval,
    "vla_gender_bias": vla_gender_bias_recipe_eval,
}


def recipe_eval(recipe: Any, adapter: ModelAdapter, make_edit: Callable[[float], Any], out: Path) -> dict[str, Any]:
    """Before/after at the recipe's alpha + the sweep, with the evaluator of ``adapter.bias_metric``."""
    evaluator = RECIPE_EVALUATORS.get(adapter.bias_metric)
    if evaluator is None:
        raise DebiasError(f"no evaluator for bias metric {adapter.bias_metric!r} (family {adapter.family}); "
                          f"known: {', '.join(sorted(RECIPE_EVALUATORS))}")
    return evaluator(recipe, adapter, make_edit, out)
