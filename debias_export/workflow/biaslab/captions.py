"""Training captions, built only from UTKFace labels (age, gender, race): never an occupation or trait word.

A caption is a key ``(template, age, gender, race)``; ``-1`` means the caption does not mention that
attribute. ``age`` is an :data:`AGE_GROUPS` index, or :data:`CHILD` for "girl" / "boy" / "child" without an
age adjective (true for the three child groups). A caption is a positive for every image whose labels
agree with everything it mentions, so the contrastive targets are multi-positive.
"""
from __future__ import annotations

import re

import torch

from ...data.captions import AGE_GROUPS, RACE_WORDS

CHILD = len(AGE_GROUPS)  # age key: "a girl" / "a boy" / "a child", any of the three child groups
CHILD_GROUPS = (0, 1, 2)
# Without a gender word: a noun that carries the age where English has one ("a baby", "a teenager").
UNGENDERED = {0: (None, "baby"), 1: ("little", "child"), 2: (None, "teenager"), CHILD: (None, "child")}
GENDERS = ("Female", "Male")
TEMPLATES = ("a photo of a {}", "a face of a {}", "a close-up photo of a {}", "a portrait of a {}", "{}",
             "a cropped photo of the face of a {}")


def caption_text(template: int, age: int | None, gender: str | None, race: str | None) -> str:
    """Caption from labels; ``age`` is an :data:`AGE_GROUPS` index or :data:`CHILD`; None = not mentioned.

    ``caption_text(0, 3, "Female", "Black") == "a photo of a young Black woman"``. Never mentions
    occupations or traits.
    """
    if gender is None:
        adj, noun = UNGENDERED[age] if age in UNGENDERED else (None if age is None else AGE_GROUPS[age][1], "person")
    elif age == CHILD:
        adj, noun = None, "girl" if gender == "Female" else "boy"
    elif age is None:
        adj, noun = None, "woman" if gender == "Female" else "man"
    else:
        _, adj, fem, male = AGE_GROUPS[age]
        noun = fem if gender == "Female" else male
    words = [w for w in (adj, RACE_WORDS[race] if race else None, noun) if w]
    text = TEMPLATES[template].format(" ".join(words))
    return re.sub(r"\b([aA]) (?=[aeiouAEIOU])", r"\1n ", text)  # "a elderly" -> "an elderly"


def caption_table() -> tuple[list[str], torch.Tensor]:
    """Every caption the lab trains with and its ``(template, age|-1, gender|-1, race|-1)`` key.

    Left out: captions that mention nothing ("a photo of a person": true of every image).
    """
    races = [r for r in RACE_WORDS if RACE_WORDS[r]]
    texts, keys = [], []
    for t in range(len(TEMPLATES)):
        for a in [None, *range(len(AGE_GROUPS)), CHILD]:
            for gi, g in [(-1, None), *enumerate(GENDERS)]:
                for r in [None, *races]:
                    if a is None and g is None and r is None:
                        continue
                    texts.append(caption_text(t, a, g, r))
                    keys.append((t, -1 if a is None else a, gi, -1 if r is None else list(RACE_WORDS).index(r)))
    return texts, torch.tensor(keys)


def consistent(caption_keys: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[captions, images]`` bool: every attribute the caption names matches the image's labels.

    ``labels``: ``[images, 3]`` (age group, gender index, race index).
    """
    age_c, age_l = caption_keys[:, 1][:, None], labels[:, 0][None, :]
    child = torch.isin(age_l, torch.tensor(CHILD_GROUPS))
    ok = (age_c == -1) | (age_c == age_l) | ((age_c == CHILD) & child)
    for col, lab in ((2, 1), (3, 2)):
        c = caption_keys[:, col][:, None]
        ok &= (c == -1) | (c == labels[:, lab][None, :])
    return ok


def sample_captions(labels: torch.Tensor, drop_age_p: float, drop_race_p: float, g: torch.Generator) -> torch.Tensor:
    """v2's per-image caption keys ("batch" loss): random template, age / race words dropped at random."""
    n = labels.shape[0]
    template = torch.randint(len(TEMPLATES), (n,), generator=g)
    age = torch.where(torch.rand(n, generator=g) < drop_age_p, -1, labels[:, 0])
    race = labels[:, 2].clone()
    race[(torch.rand(n, generator=g) < drop_race_p) | (race == list(RACE_WORDS).index("Others"))] = -1
    return torch.stack([template, age, labels[:, 1], race], dim=1)


def caption_index(keys: torch.Tensor, table_keys: torch.Tensor) -> torch.Tensor:
    """Row of ``table_keys`` for each key (exact match)."""
    eq = (keys[:, None, :] == table_keys[None, :, :]).all(-1)
    return eq.float().argmax(1)
