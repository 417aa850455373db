"""Controls of an SAE edit (``eval.controls``), evaluated beside the chosen edit on the evaluation data.

A drop in skew under an SAE edit is evidence about the chosen neurons only if edits that share everything but the
neurons do not drop it as much. Two controls per SAE seed, built from the very SAE, site, ``a`` and value rule of
the chosen edit:

- ``reconstruction`` (reconstruct mode only): the SAE's reconstruction mixed in with weight ``a``, no latent
  changed. Reconstruct mode replaces part of the hidden state by the SAE's reconstruction, whose error term may
  carry the label by itself; a residual edit keeps that error, so it has no such control.
- ``random``: as many latents as the edit has, drawn at random (seeded by the SAE seed) among those that fire as
  often as each chosen neuron (:func:`~debias_export.analysis.probe.matched_random_neurons`), set to their value by
  the same rule (0, or ``mean``: their own group-balanced mean).

Controls are read once, after selection, like the edit itself; nothing is chosen from them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..analysis.probe import matched_random_neurons
from ..core.choices import SAE_CONTROLS
from ..edits.sae import SAEEdit, reconstruction_only_hook
from .steps import Captured, neuron_values, probed_latents

RECONSTRUCTION, RANDOM = SAE_CONTROLS
NOT_APPLICABLE = {RECONSTRUCTION: "residual mode keeps the SAE's reconstruction error, so with no latent changed "
                                  "it is the unmodified model"}
NO_NEURONS = "a projection edit has no SAE neurons to control for"


def control_edits(kind: str, edits: dict[int, SAEEdit], recipe, cap: Captured,
                  latents: dict | None = None) -> dict[int, SAEEdit | Callable[[Any], Any]] | None:
    """Per seed, the ``kind`` control of that seed's edit: an installer ``fn(adapter) -> handle`` (reconstruction)
    or an :class:`SAEEdit` of matched random neurons; ``None`` when the control does not apply to the edit's mode."""
    if kind == RECONSTRUCTION:
        if recipe.edit.mode != "reconstruct":
            return None
        return {seed: (lambda adapter, e=e: reconstruction_only_hook(adapter, e)) for seed, e in edits.items()}
    out = {}
    for seed, e in edits.items():
        z = probed_latents(recipe, e.sae, cap, latents)
        neurons = matched_random_neurons(z, e.neurons, seed=seed)
        out[seed] = dataclasses.replace(e, neurons=neurons, value=neuron_values(recipe, e.sae, cap, neurons, latents),
                                        provenance={**e.provenance, "control": RANDOM})
    return out
