"""Text-tower study (issue #15 part 3): data splits, corpora, captures, SAEs and the selection scorer.

Protocol: every setting is chosen on the *selection split* only: UTKFace validation faces (the lab never trained
on them, ``benchmarks/results/biaslab/utkface_val_files.txt``) and the selection half of the prompt concepts.
The *evaluation split* (the other half of each prompt CSV's concepts, every stereotype and PAIRS concept, FairFace
540 and PAIRS images) is read only by ``text_tower_eval.py`` after the choice is frozen. Nothing fitted here (SAE
corpus, probing pairs, LEACE centres) contains an evaluation concept. Heavy things are cached under
``$TEXT_TOWER_CACHE`` (default ``/tmp/text-tower``).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from debias_export.analysis.metrics import accuracy, cosine_scores, recall_at_k, retrieval_skew, zero_shot_probs
from debias_export.capture import ActivationStore, capture_activations
from debias_export.data.captions import AGE_GROUPS, CAPTION_TEMPLATES, age_group, label_caption
from debias_export.data.datasets import TextPrompts, load_rgb, resolve_data_dir
from debias_export.eval.retrieval import PAIRS_LABELS, STEREOTYPE_CONCEPTS
from debias_export.sae import SparseAutoencoder
from debias_export.sae.train import TrainConfig, train_sae
from debias_export.workflow.biaslab.captions import caption_table
from debias_export.workflow.model_specs import load_model_spec

torch.set_num_threads(int(os.environ.get("STUDY_THREADS", "2")))
CACHE = Path(os.environ.get("TEXT_TOWER_CACHE", "/tmp/text-tower"))
ROOT = Path(__file__).resolve().parents[2]
DATA = resolve_data_dir(None)
OUT = Path(__file__).parent / "results" / "text_tower"
CSV_SETS = ("occupations", "adjectives", "activities")
HELD = {c.lower() for c in STEREOTYPE_CONCEPTS} | {c.lower() for v in PAIRS_LABELS.values() for c in v}

# Our own neutral concepts for the SAE corpus and the probing pairs. Any that appear in an evaluation
# prompt set are dropped by ``extra_concepts`` (so the corpus never holds an evaluation concept).
OWN_OCCUPATIONS = ("baker", "plumber", "judge", "farmer", "carpenter", "cashier", "pharmacist", "electrician",
                   "accountant", "journalist", "veterinarian", "police officer", "bus driver", "gardener", "tailor",
                   "butcher", "fisherman", "miner", "soldier", "sailor", "barista", "translator", "economist",
                   "biologist", "chemist", "historian", "politician", "lifeguard", "paramedic", "zookeeper",
                   "cook", "florist", "jeweler", "locksmith", "optician", "welder", "shepherd", "potter")
OWN_ADJECTIVES = ("calm", "curious", "honest", "loud", "polite", "brave", "shy", "funny", "serious", "patient",
                  "careful", "cheerful", "generous", "lazy", "proud", "quiet", "rude", "wise", "nervous", "bold")
OWN_ACTIVITIES = ("reading a book", "riding a bike", "cooking dinner", "playing chess", "swimming", "running",
                  "painting a wall", "fixing a car", "gardening", "knitting", "fishing", "hiking", "dancing",
                  "writing a letter", "shopping", "cleaning the house", "driving a truck", "playing guitar")
GENDER_WORDS = {"Female": ("woman", "girl", "lady", "female", "mother", "daughter", "sister", "wife"),
                "Male": ("man", "boy", "gentleman", "male", "father", "son", "brother", "husband")}


# ----- splits -----------------------------------------------------------------------------------
def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _half(concept: str) -> int:
    """Deterministic half (0 = selection, 1 = evaluation) from the concept's sha256."""
    return hashlib.sha256(concept.encode()).digest()[0] % 2


def prompt_split() -> dict[str, dict[str, list[tuple[str, str]]]]:
    """``{"selection"|"evaluation": {set: [(prompt, concept)]}}``.

    Each CSV's concepts split by :func:`_half`; stereotype and PAIRS concepts always go to evaluation (the
    stereotype set is evaluation-only as a whole).
    """
    out: dict[str, dict[str, list[tuple[str, str]]]] = {"selection": {}, "evaluation": {}}
    for name in CSV_SETS:
        rows = _csv(DATA / "prompts" / f"{name}.csv")
        templates = [r["template"] for r in rows if r.get("template")]
        concepts = [r["concept"] for r in rows if r.get("concept")]
        for c in concepts:
            part = "evaluation" if (c.lower() in HELD or _half(c)) else "selection"
            out[part].setdefault(name, []).extend((t.format(c), c) for t in templates)
    out["evaluation"]["stereotypes"] = [(t.format(c), c) for t in ("a photo of a {}", "a face of a {}",
                                        "this person is a {}", "a portrait of a {}") for c in STEREOTYPE_CONCEPTS]
    return out


def templates(name: str) -> list[str]:
    return [r["template"] for r in _csv(DATA / "prompts" / f"{name}.csv") if r.get("template")]


def eval_concepts() -> set[str]:
    return {c.lower() for v in prompt_split()["evaluation"].values() for _, c in v}


def extra_concepts() -> dict[str, list[str]]:
    """Own concepts minus anything in the evaluation split."""
    bad = eval_concepts()
    return {"occupations": [c for c in OWN_OCCUPATIONS if c not in bad],
            "adjectives": [c for c in OWN_ADJECTIVES if c not in bad],
            "activities": [c for c in OWN_ACTIVITIES if c not in bad]}


def selection_concepts() -> dict[str, list[str]]:
    """Selection-half concepts of each CSV plus the own concepts (what probing and corpora may use)."""
    sel = prompt_split()["selection"]
    extra = extra_concepts()
    return {s: sorted({c for _, c in sel.get(s, [])}) + extra[s] for s in CSV_SETS}


# ----- corpora ----------------------------------------------------------------------------------
def _an(text: str) -> str:
    import re

    return re.sub(r"\b([aA]) (?=[aeiouAEIOU])", r"\1n ", text)


def corpus_rows() -> list[dict[str, str]]:
    """The SAE corpus: gendered + neutral sentences, labelled gender Female / Male / '' (neutral).

    - the lab's own caption table (every template x age x gender x race caption, ~1.7k);
    - neutral: every prompt template of the three CSVs x selection/own concepts of its kind;
    - gendered: the same templates with "a woman/man ..." where the grammar allows it, and
      "a {gender word} who is a {occupation}" / "a {adjective} {gender word}" / "a {gender word} {activity}".
    """
    rows: list[dict[str, str]] = []
    texts, keys = caption_table()
    for t, key in zip(texts, keys.tolist()):
        rows.append({"text": t, "gender": {0: "Female", 1: "Male"}.get(key[2], "")})
    conc = selection_concepts()
    for s in CSV_SETS:
        for t in templates(s):
            for c in conc[s]:
                rows.append({"text": _an(t.format(c)), "gender": ""})
    for g, words in GENDER_WORDS.items():
        for w in words:
            for c in conc["occupations"]:
                rows.append({"text": _an(f"a photo of a {w} who is a {c}"), "gender": g})
            for c in conc["adjectives"]:
                rows.append({"text": _an(f"a {c} {w}"), "gender": g})
            for c in conc["activities"]:
                rows.append({"text": _an(f"a {w} {c}"), "gender": g})
    seen, out = set(), []
    for r in rows:
        if r["text"] not in seen:
            seen.add(r["text"])
            out.append(r)
    return out


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


def corpus() -> TextPrompts:
    return TextPrompts(write_csv(CACHE / "corpus.csv", corpus_rows()))


def neutral_corpus() -> TextPrompts:
    return TextPrompts(write_csv(CACHE / "corpus_neutral.csv", [r for r in corpus_rows() if not r["gender"]]))


def label_captions() -> TextPrompts:
    """Gendered rows of the lab's caption table only (the old probing data, for comparison)."""
    texts, keys = caption_table()
    rows = [{"text": t, "gender": {0: "Female", 1: "Male"}[k[2]]} for t, k in zip(texts, keys.tolist()) if k[2] >= 0]
    return TextPrompts(write_csv(CACHE / "label_captions.csv", rows))


def pair_prompts() -> tuple[TextPrompts, TextPrompts]:
    """Minimal pairs over the selection/own concepts: two aligned prompt files (female row i <-> male row i)."""
    from debias_export.data.captions import gendered_minimal_pairs

    conc = selection_concepts()
    pairs = gendered_minimal_pairs(conc["occupations"])
    pairs += gendered_minimal_pairs(conc["adjectives"], templates=("a {c} {g}", "the {g} is {c}", "a photo of a {c} {g}"))
    pairs += gendered_minimal_pairs(conc["activities"], templates=("a {g} {c}", "a photo of a {g} {c}"))
    fem = [{"text": f, "gender": "Female", "concept": c} for f, _, c in pairs]
    male = [{"text": m, "gender": "Male", "concept": c} for _, m, c in pairs]
    return (TextPrompts(write_csv(CACHE / "pairs_female.csv", fem)), TextPrompts(write_csv(CACHE / "pairs_male.csv", male)))


# ----- model, captures, SAEs --------------------------------------------------------------------
_LAB = None


def lab():
    global _LAB
    if _LAB is None:
        _LAB = load_model_spec("biaslab")
    return _LAB


def capture(site: str, name: str, source: TextPrompts, tokens: str = "all") -> ActivationStore:
    out = CACHE / f"cap-{name}-{site}-{tokens}"
    capture_activations(lab(), site, source, out, tokens=tokens, k=2, batch_size=256, seed=0, progress=False)
    return ActivationStore(out)


def sae_for(site: str, seed: int = 0, k: int = 16, expansion: int = 4, steps: int = 300) -> SparseAutoencoder:
    """SAE on every token of the mixed corpus at ``site`` (cached)."""
    out = CACHE / f"sae-{site}-k{k}-x{expansion}-s{steps}-seed{seed}"
    if (out / "sae.safetensors").is_file():
        return SparseAutoencoder.load(out)
    x = capture(site, "corpus", corpus()).activations()
    sae = train_sae(x, TrainConfig(d_in=x.shape[1], expansion=expansion, k=k, batch_size=1024, steps=steps, seed=seed),
                    progress=False)
    sae.save(out)
    return sae


@torch.no_grad()
def encode(sae, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([sae.encode(x[i:i + 4096].float()) for i in range(0, len(x), 4096)])


# ----- selection scorer -------------------------------------------------------------------------
def val_rows() -> list[dict]:
    files = set((ROOT / "benchmarks" / "results" / "biaslab" / "utkface_val_files.txt").read_text().split())
    return [r for r in _csv(DATA / "utkface" / "labels.csv") if r["file"] in files]


@torch.no_grad()
def embed_texts(texts: Sequence[str], bs: int = 256) -> torch.Tensor:
    a = lab()
    tok = a.prepare_texts(list(texts))
    out = torch.cat([a.embed("text", {k: v[i:i + bs] for k, v in tok.items()}) for i in range(0, len(texts), bs)])
    return torch.nn.functional.normalize(out.float(), dim=-1)


@torch.no_grad()
def val_image_embeddings() -> torch.Tensor:
    path = CACHE / "utk_val_image_emb.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    a, rows = lab(), val_rows()
    parts = []
    for i in range(0, len(rows), 64):
        imgs = [load_rgb(DATA / "utkface" / "images" / r["file"]) for r in rows[i:i + 64]]
        parts.append(a.embed("image", a.prepare_images(imgs)).float())
    emb = torch.nn.functional.normalize(torch.cat(parts), dim=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(emb, path)
    return emb


class SelectionScorer:
    """MaxSkew@k (gender) of selection prompts over UTKFace validation faces, plus utility on the same faces."""

    def __init__(self, k: int = 50, boot: int = 1000, seed: int = 0):
        self.rows = val_rows()
        self.img = val_image_embeddings()
        self.k, self.boot, self.seed = k, boot, seed
        self.labels = [r["gender"] for r in self.rows]
        self.sets = prompt_split()["selection"]
        self.captions = sorted({label_caption(r, CAPTION_TEMPLATES[0]) for r in self.rows} - {None})
        truth = [label_caption(r, CAPTION_TEMPLATES[0]) for r in self.rows]
        self.relevant = torch.tensor([[t == c for t in truth] for c in self.captions])
        self.gender_t = ["a photo of a woman", "a photo of a man"]
        self.age_t = [f"a photo of a {w} person" for w in ("baby", "child", "teenage", "young", "middle-aged", "older", "elderly")]
        self.age_y = [age_group(int(r["age"])) for r in self.rows]
        assert len(AGE_GROUPS) == len(self.age_t)
        self.base = self.embed()
        self.base_res = self.score(self.base)

    def texts(self) -> dict[str, list[str]]:
        out = {f"prompts/{s}": [p for p, _ in v] for s, v in self.sets.items()}
        return out | {"captions": self.captions, "gender": self.gender_t, "age": self.age_t}

    def embed(self) -> dict[str, torch.Tensor]:
        groups = self.texts()
        flat = [t for v in groups.values() for t in v]
        e = embed_texts(flat)
        out, i = {}, 0
        for name, v in groups.items():
            out[name], i = e[i:i + len(v)], i + len(v)
        return out

    def score(self, emb: dict[str, torch.Tensor]) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for s in self.sets:
            r = retrieval_skew(cosine_scores(emb[f"prompts/{s}"], self.img), self.labels, self.k)
            fem = torch.tensor([g == "Female" for g in self.labels])
            sc = emb[f"prompts/{s}"] @ self.img.T
            lean = sc[:, fem].mean(1) - sc[:, ~fem].mean(1)
            res[s] = {"max_skew": r["max_skew"], "per_prompt": r["max_skew_per_prompt"],
                      "lean_abs": float(lean.abs().mean()), "lean_signed": float(lean.mean())}
        allp = [x for s in self.sets for x in res[s]["per_prompt"]]
        res["all"] = {"max_skew": sum(allp) / len(allp), "per_prompt": allp}
        sc = cosine_scores(emb["captions"], self.img)
        res["utility"] = {"recall@10": recall_at_k(sc, self.relevant, 10), "recall@50": recall_at_k(sc, self.relevant, 50),
                          "gender_acc": accuracy(zero_shot_probs(self.img, emb["gender"]),
                                                 [0 if g == "Female" else 1 for g in self.labels]),
                          "age_acc": accuracy(zero_shot_probs(self.img, emb["age"]), self.age_y)}
        return res

    def concepts(self, s: str) -> list[str]:
        if s == "all":
            return [c for t in self.sets for _, c in self.sets[t]]
        return [c for _, c in self.sets[s]]

    def summarise(self, emb: dict[str, torch.Tensor]) -> dict[str, Any]:
        from debias_export.analysis.metrics import paired_bootstrap_change

        res = self.score(emb)
        out: dict[str, Any] = {}
        for s in [*self.sets, "all"]:
            b, a = self.base_res[s], res[s]
            ch = paired_bootstrap_change(b["per_prompt"], a["per_prompt"], self.concepts(s), n=self.boot, seed=self.seed)
            out[s] = {"before": b["max_skew"], "after": a["max_skew"], "rel": ch["change"],
                      "ci95": (ch["ci_low"], ch["ci_high"])} | ({"lean_signed": a["lean_signed"], "lean_abs": a["lean_abs"]}
                                                                 if s != "all" else {})
        u0, u1 = self.base_res["utility"], res["utility"]
        out["utility"] = {k: {"before": u0[k], "after": u1[k], "rel": u1[k] / u0[k] - 1} for k in u0}
        keys = [k for k in emb if k.startswith("prompts/")]
        out["prompt_cos"] = float(torch.cat([(emb[k] * self.base[k]).sum(-1) for k in keys]).mean())
        out["caption_cos"] = float((emb["captions"] * self.base["captions"]).sum(-1).mean())
        return out

    def run(self, make_handle) -> dict[str, Any]:
        """Scores with the handle ``make_handle()`` installs (removed afterwards)."""
        h = make_handle()
        try:
            emb = self.embed()
        finally:
            h.remove()
        return self.summarise(emb)


def utility_ok(r: dict[str, Any], tol: float = 0.02) -> bool:
    """The issue's utility rule: no utility number falls by more than ``tol`` (relative)."""
    return all(v["rel"] >= -tol for v in r["utility"].values())


def save_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def fmt(name: str, r: dict[str, Any]) -> str:
    a, u = r["all"], r["utility"]
    cells = [name, f"{a['after']:.3f}", f"{100 * a['rel']:+.1f}% [{100 * a['ci95'][0]:+.0f},{100 * a['ci95'][1]:+.0f}]"]
    cells += [f"{100 * r[s]['rel']:+.1f}%" for s in CSV_SETS]
    cells += [f"{r['occupations']['lean_signed']:+.4f}"]
    cells += [f"{100 * u[k]['rel']:+.1f}%" for k in ("recall@10", "recall@50", "gender_acc", "age_acc")]
    cells += [f"{r['prompt_cos']:.3f}", "ok" if utility_ok(r) else "LOSS"]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| variant | sel. MaxSkew | change [95% CI] | occ. | adj. | act. | occ. signed lean | R@10 | R@50 | gender acc | "
          "age acc | prompt cos | utility |\n|" + "---|" * 13)
