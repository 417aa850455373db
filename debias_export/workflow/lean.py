"""Fit data for erasing *implicit* gender in the text tower (issue #15 part 3, ``benchmarks/experiments/text_tower.md``).

Edits fitted on explicit gender (label captions, gendered words, minimal pairs) raise retrieval skew on the
bias lab: they pin neutral prompts to a point that is not retrieval-neutral. What held out is a LEACE eraser fitted
on *neutral* sentences labelled by the sign of their retrieval lean: the mean cosine of a sentence to the
selection split's faces of one class minus the other, split at the median. Two recipe keys make that a recipe
option on any data:

- ``data.texts: prompts:neutral``: the neutral corpus built here (every template of each prompt set x its
  ``select``-half concepts, plus our own concepts of the same kind that appear in no prompt set and no PAIRS
  label list), so it never holds an evaluation concept; or any prompt / text file of the user's;
- ``data.label_by: lean``: each fit sentence's ``probe.column`` label is its lean over the ``select:`` faces
  (unedited model), so only selection data labels the fit data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..core.errors import DebiasError
from ..data.captions import NEUTRAL_CONCEPTS, fix_articles
from ..data.datasets import is_missing_label, read_csv_table
from ..eval.retrieval import PAIRS_LABELS, SELECT_HALF, load_prompt_sets
from .recipe import NEUTRAL_PROMPTS  # noqa: F401 (the data.texts value this module builds)


def neutral_prompts(data_dir: str | Path) -> list[str]:
    """The neutral corpus: select-half prompts of every prompt set, plus each CSV set's templates x our own
    concepts of that kind that no prompt set and no PAIRS label list names (deduplicated, in a fixed order)."""
    root = Path(data_dir)
    named = {c.lower() for v in load_prompt_sets(root).values() for _, c in v}
    named |= {c.lower() for v in PAIRS_LABELS.values() for c in v}
    texts = [p for v in load_prompt_sets(root, half=SELECT_HALF).values() for p, _ in v]
    for kind, own in NEUTRAL_CONCEPTS.items():
        rows = read_csv_table(root / "prompts" / f"{kind}.csv", "prompt set")[1]
        templates = [r["template"] for r in rows if r.get("template")]
        texts += [fix_articles(t.format(c)) for t in templates for c in own if c.lower() not in named]
    return list(dict.fromkeys(texts))


@torch.no_grad()
def lean_labels(adapter, texts: Sequence[str], faces: torch.Tensor, face_labels: Sequence[str],
                batch_size: int = 256) -> tuple[list[str], dict]:
    """Label each text by the sign of its retrieval lean over ``faces`` (normalised image embeddings, the
    unedited model's) whose ``face_labels`` hold two classes: the first class (sorted) when the text's mean
    cosine to that class's faces minus the other's is above the median lean, else the second. Returns the
    labels and a summary (classes, median, the share of each label)."""
    keep = [i for i, lab in enumerate(face_labels) if not is_missing_label(lab)]
    classes = sorted({face_labels[i] for i in keep})
    if len(classes) != 2:
        raise DebiasError(f"data.label_by: lean needs a label column with two classes on the select: faces, got "
                          f"{classes}")
    if not texts:
        raise DebiasError("data.label_by: lean: the fit data holds no text")
    tok = adapter.prepare_texts(list(texts))
    emb = torch.cat([adapter.embed("text", {k: v[i:i + batch_size] for k, v in tok.items()})
                     for i in range(0, len(texts), batch_size)]).float()
    emb = torch.nn.functional.normalize(emb, dim=-1)
    sc = emb @ faces[keep].float().T
    first = torch.tensor([face_labels[i] == classes[0] for i in keep])
    lean = sc[:, first].mean(1) - sc[:, ~first].mean(1)
    median = float(lean.median())
    labels = [classes[0] if v > median else classes[1] for v in lean.tolist()]
    return labels, {"classes": classes, "median_lean": median, "texts": len(labels),
                    "first_class_share": labels.count(classes[0]) / len(labels)}
