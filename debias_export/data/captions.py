"""Caption builders and the label vocabularies behind them (FairFace and UTKFace), in one place.

:func:`label_caption` is the one caption of a labelled face ("a photo of a young Black woman"): the text
inputs of probes and locate, the retrieval ground truth of the caption-recall metric, and (with its
UTKFace vocabulary) the word tables the bias lab's training captions use.
"""
from __future__ import annotations

import re
from typing import Collection, Mapping, Sequence

from ..core.errors import DebiasError

# UTKFace integer ages -> caption words. Children get "girl"/"boy" nouns, adults an adjective.
AGE_GROUPS = [  # (max age inclusive, adjective, female noun, male noun)
    (2, "baby", "girl", "boy"),
    (12, "little", "girl", "boy"),
    (19, "teenage", "girl", "boy"),
    (34, "young", "woman", "man"),
    (54, "middle-aged", "woman", "man"),
    (74, "older", "woman", "man"),
    (200, "elderly", "woman", "man"),
]
RACE_WORDS = {"White": "White", "Black": "Black", "Asian": "Asian", "Indian": "Indian", "Others": None}

FAIRFACE_AGE_WORDS = {"0-2": "baby", "3-9": "child", "10-19": "teenage", "20-29": "young", "30-39": "young",
                      "40-49": "middle-aged", "50-59": "middle-aged", "60-69": "older", "70+": "elderly"}
FAIRFACE_RACE_WORDS = {"White": "White", "Black": "Black", "Latino_Hispanic": "Latino", "East Asian": "East Asian",
                       "Southeast Asian": "Southeast Asian", "Indian": "Indian", "Middle Eastern": "Middle Eastern"}

AGE_BINS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")  # FairFace's; integer ages map here


def age_bin(age: object) -> str:
    """FairFace's age bin of an integer age (UTKFace); a bin string is returned unchanged."""
    text = str(age)
    return text if not text.isdigit() else next(b for b, hi in zip(AGE_BINS, (2, 9, 19, 29, 39, 49, 59, 69, 10**9))
                                                 if int(text) <= hi)


def race_word(race: object) -> str | None:
    """The caption word of a FairFace or UTKFace race label (None: no word, e.g. UTKFace 'Others')."""
    return FAIRFACE_RACE_WORDS.get(str(race)) or RACE_WORDS.get(str(race))


def age_group(age: int) -> int:
    """:data:`AGE_GROUPS` index of an integer age."""
    return next(i for i, (hi, *_rest) in enumerate(AGE_GROUPS) if age <= hi)


CAPTION_TEMPLATES = ("a photo of a {}", "a portrait of a {}", "a close-up photo of the face of a {}")


def label_caption(row: Mapping[str, str], template: str = CAPTION_TEMPLATES[0], drop: Collection[str] = ()) -> str | None:
    """A caption naming a face's labels ("a photo of a young Black woman"), or None without a Male/Female gender.

    Understands FairFace rows (age bins, FairFace race names) and UTKFace rows (integer ages); unknown
    race/age values are left out. Used to give text towers labelled inputs (probing, locate). ``drop``
    leaves attributes out: ``("gender",)`` names "a young Black person" / "a teenage child" (any gender
    label, or none, is then fine), ``("race",)`` or ``("age",)`` drop that word.
    """
    gender = row.get("gender")
    if "gender" not in drop and gender not in ("Male", "Female"):
        return None
    age = str(row.get("age", "") or "")
    if age.isdigit():
        group = age_group(int(age))
        adj, fem, male = AGE_GROUPS[group][1:]
        child = group <= 2
    else:
        child = age in ("0-2", "3-9", "10-19")
        adj, fem, male = (None if age == "3-9" else FAIRFACE_AGE_WORDS.get(age)), ("girl" if child else "woman"), ("boy" if child else "man")
    race = race_word(row.get("race", ""))
    # Without gender, children stay "child" (a noun that carries age, as girl/boy do) and adults "person".
    noun = ("child" if child else "person") if "gender" in drop else (fem if gender == "Female" else male)
    words = " ".join(w for w in (None if "age" in drop else adj, None if "race" in drop else race, noun) if w)
    return _fix_articles(template.format(words))  # "a elderly" -> "an elderly"


def fairface_caption(row: Mapping[str, str], drop: Collection[str] = ()) -> str | None:
    """The caption-recall ground truth of a FairFace row: :func:`label_caption` with the default template
    (None for a row without a Male/Female gender unless gender is dropped: it matches no caption)."""
    return label_caption(row, drop=drop)


# Gendered minimal pairs: the same sentence with a female or a male word, nothing else changed. Probing on
# their contrast finds latents that track the gender word itself rather than "this text describes a face".
PAIR_WORDS = (("woman", "man"), ("girl", "boy"), ("lady", "gentleman"), ("mother", "father"), ("sister", "brother"),
              ("wife", "husband"), ("daughter", "son"), ("female", "male"))
PAIR_TEMPLATES = ("a photo of a {g} who is a {c}", "a {g} working as a {c}", "the {g} is a {c}",
                  "a portrait of a {g}, a {c}")


def _fix_articles(text: str) -> str:
    return re.sub(r"\b([aA]) (?=[aeiouAEIOU])", r"\1n ", text)


def gendered_minimal_pairs(concepts: Sequence[str], templates: Sequence[str] = PAIR_TEMPLATES,
                           words: Sequence[tuple[str, str]] = PAIR_WORDS) -> list[tuple[str, str, str]]:
    """``(female text, male text, concept)`` for every template x concept x word pair.

    Templates hold ``{g}`` (the gender word) and ``{c}`` (the concept), e.g. "a photo of a {g} who is a {c}";
    the two texts differ only in the gender word (and the article before it: "an elderly" / "a" fix-ups
    apply to both). Concepts must be non-empty; templates must contain both fields.
    """
    for t in templates:
        if "{g}" not in t or "{c}" not in t:
            raise DebiasError(f"minimal-pair template {t!r} needs both {{g}} and {{c}}")
    for f, m in words:
        if not f or not m or f == m:
            raise DebiasError(f"bad gender word pair ({f!r}, {m!r})")
    out = []
    for c in concepts:
        if not c or not c.strip():
            raise DebiasError("empty concept in minimal-pair concepts")
        for t in templates:
            for f, m in words:
                out.append((_fix_articles(t.format(g=f, c=c)), _fix_articles(t.format(g=m, c=c)), c))
    return out


# Neutral concepts of our own (no gender word), for a fitting corpus of neutral sentences that never needs an
# evaluation prompt (text-tower erasers of *implicit* gender, issue #15; benchmarks/experiments/text_tower.md):
# each kind is crossed with the prompt templates of the matching prompt set.
NEUTRAL_CONCEPTS = {
    "occupations": ("baker", "plumber", "judge", "farmer", "carpenter", "cashier", "pharmacist", "electrician",
                    "accountant", "journalist", "veterinarian", "police officer", "bus driver", "gardener", "tailor",
                    "butcher", "fisherman", "miner", "soldier", "sailor", "barista", "translator", "economist",
                    "biologist", "chemist", "historian", "politician", "lifeguard", "paramedic", "zookeeper",
                    "cook", "florist", "jeweler", "locksmith", "optician", "welder", "shepherd", "potter"),
    "adjectives": ("calm", "curious", "honest", "loud", "polite", "brave", "shy", "funny", "serious", "patient",
                   "careful", "cheerful", "generous", "lazy", "proud", "quiet", "rude", "wise", "nervous", "bold"),
    "activities": ("reading a book", "riding a bike", "cooking dinner", "playing chess", "swimming", "running",
                   "painting a wall", "fixing a car", "gardening", "knitting", "fishing", "hiking", "dancing",
                   "writing a letter", "shopping", "cleaning the house", "driving a truck", "playing guitar"),
}


def fix_articles(text: str) -> str:
    """"a elderly" -> "an elderly" (templates written for consonant-initial words)."""
    return _fix_articles(text)
