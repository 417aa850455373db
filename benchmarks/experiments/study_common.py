"""Shared helpers for the demo-edit study (issue #6): bias lab, captures, SAEs, evaluation with noise estimates.

Everything heavy is cached under ``$DEMO_STUDY_CACHE`` (default ``/tmp/debias-demo-study``), outside the repo.
Probing data is UTKFace only (faces, captions built from its labels, or gendered-word templates);
FairFace 540 and the prompt CSVs are used for evaluation only.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from debias_export.adapters.dual_encoder import DualEncoderAdapter
from debias_export.capture import ActivationStore, capture_activations
from debias_export.data.datasets import LabelledImages, TextPrompts
from debias_export.analysis.metrics import cosine_scores, retrieval_skew, shuffled_skew, zero_shot_probs
from debias_export.eval.retrieval import EvalData, utility_metrics
from debias_export.sae import SparseAutoencoder
from debias_export.sae.train import TrainConfig, train_sae

torch.set_num_threads(int(os.environ.get("STUDY_THREADS", "1")))
CACHE = Path(os.environ.get("DEMO_STUDY_CACHE", "/tmp/debias-demo-study"))
LAB_DIR = Path(os.path.expanduser("~/.cache/debias-export/biaslab/f074df2361d1c9ad"))
DATA = Path(os.environ.get("DEBIAS_EXPORT_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data")).resolve()
SETS = ("occupations", "adjectives", "activities", "stereotypes")
FEMALE_WORDS = ("woman", "girl", "lady", "female", "she", "her", "mother", "daughter", "sister", "wife", "queen", "mom")
MALE_WORDS = ("man", "boy", "gentleman", "male", "he", "him", "father", "son", "brother", "husband", "king", "dad")
WORD_TEMPLATES = ("a photo of a {}", "a face of a {}", "a portrait of a {}", "{}", "a close-up photo of a {}",
                  "this is a {}", "the face of the {}", "a picture of one {}")


def lab() -> DualEncoderAdapter:
    if not (LAB_DIR / "model.safetensors").is_file():
        raise SystemExit(f"bias lab not cached at {LAB_DIR}; run the demo recipe once (debias-export run recipes/demo.yaml)")
    return DualEncoderAdapter.load(str(LAB_DIR))


# ----- probing data (UTKFace only) ------------------------------------------------------------------
def utk_images() -> LabelledImages:
    return LabelledImages(DATA / "utkface" / "labels.csv", columns=["gender", "race", "age"],
                          filter=lambda r: r["race"] in ("White", "Black", "Asian", "Indian", "Others"))


def utk_captions() -> TextPrompts:
    """Captions built from UTKFace labels exactly as the pipeline does (data.captions_from)."""
    from debias_export.workflow.pipeline import _caption_csv

    path = CACHE / "utk_captions.csv"
    if not path.is_file():
        _caption_csv(DATA / "utkface" / "labels.csv", path)
    return TextPrompts(path)


def gender_words() -> TextPrompts:
    """Contrastive gendered-word prompts (templates x words; no occupation/trait words)."""
    path = CACHE / "gender_words.csv"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["text", "gender"])
            w.writeheader()
            for t in WORD_TEMPLATES:
                for g, words in (("Female", FEMALE_WORDS), ("Male", MALE_WORDS)):
                    for word in words:
                        w.writerow({"text": t.format(word), "gender": g})
    return TextPrompts(path)


SOURCES = {"utk_images": utk_images, "utk_captions": utk_captions, "gender_words": gender_words}


def capture(adapter, site: str, source: str, tokens: str = "random-k", k: int = 2) -> ActivationStore:
    """Capture (cached) ``site`` activations of a probing source."""
    out = CACHE / f"capture-{source}-{site}-{tokens}{k}"
    capture_activations(adapter, site, SOURCES[source](), out, tokens=tokens, k=k, batch_size=128, seed=0, progress=False)
    return ActivationStore(out)


def sae_for(store: ActivationStore, name: str, k: int = 16, expansion: int = 8, steps: int = 600,
            batch_size: int = 1024, seed: int = 0, data: str = "tokens") -> SparseAutoencoder:
    """Train (cached) a Matryoshka BatchTopK SAE on a capture's tokens (``data='tokens'``, the pipeline's
    choice) or on tokens plus every input's output-token activation (``'tokens+output'``)."""
    out = CACHE / f"sae-{name}-k{k}-x{expansion}-s{steps}-seed{seed}-{data}"
    if (out / "sae.safetensors").is_file():
        return SparseAutoencoder.load(out)
    x = store.activations()
    if data == "tokens+output":
        x = torch.cat([x, store.output_activations()])
    cfg = TrainConfig(d_in=x.shape[1], expansion=expansion, k=k, batch_size=batch_size, steps=steps, seed=seed)
    sae = train_sae(x, cfg, progress=False)
    sae.save(out)
    return sae


@torch.no_grad()
def embed_inputs(adapter, tower: str, source) -> torch.Tensor:
    """Raw (unnormalised) tower embeddings of every input of a probing source, cached."""
    out = CACHE / f"emb-{tower}-{type(source).__name__}-{len(source)}-{source.describe()['rows_sha256'][:12]}.pt"
    if out.is_file():
        return torch.load(out, weights_only=True)
    parts = []
    for raw, _rows in source.batches(256):
        inputs = adapter.prepare_images(raw) if tower == "image" else adapter.prepare_texts(raw)
        parts.append(adapter.embed(tower, inputs).float())
    emb = torch.cat(parts)
    torch.save(emb, out)
    return emb


# ----- evaluation ---------------------------------------------------------------------------------------
class Evaluator:
    """Base embeddings once; ``run(edits, tower)`` re-embeds only the edited tower and scores it."""

    def __init__(self, adapter, boot: int = 1000, seed: int = 0):
        self.adapter = adapter
        self.data = EvalData.load(adapter, DATA)
        self.data.inputs.pop("pairs")  # PAIRS is not part of this study; skip embedding it
        self.text_groups = self.data.texts()
        self.base = self._embed("image") | self._embed("text")
        self.boot, self.seed = boot, seed
        self.labels = [r["gender"] for r in self.data.fairface]
        self.base_scores = {s: cosine_scores(self.base[f"text:prompts/{s}"], self.base["fairface"]) for s in SETS}
        self.floor = {s: shuffled_skew(self.base_scores[s], self.labels, 50, 10, seed) for s in SETS}
        self.base_res = self.score(self.base)

    @torch.no_grad()
    def _embed(self, tower: str) -> dict[str, torch.Tensor]:
        out = {}
        if tower == "image":
            px = self.data.inputs["fairface"]
            e = torch.cat([self.adapter.embed("image", {"pixel_values": px[i:i + 128]}) for i in range(0, len(px), 128)])
            out["fairface"] = e.float()
        else:
            for name, texts in self.text_groups.items():
                if name.startswith("pairs/"):
                    continue
                tok = self.adapter.prepare_texts(texts)
                out["text:" + name] = torch.cat([self.adapter.embed("text", {k: v[i:i + 256] for k, v in tok.items()})
                                                 for i in range(0, len(texts), 256)]).float()
        return {k: torch.nn.functional.normalize(v, dim=-1) for k, v in out.items()}

    def score(self, emb: dict[str, torch.Tensor]) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for s in SETS:
            r = retrieval_skew(cosine_scores(emb[f"text:prompts/{s}"], emb["fairface"]), self.labels, 50)
            res[s] = {"max_skew": r["max_skew"], "per_prompt": r["max_skew_per_prompt"]}
        u = utility_metrics(emb, self.data, ks=(10, 50))
        res["utility"] = {k: u[k] for k in ("caption_recall@10", "caption_recall@50", "gender_zero_shot_acc", "age_zero_shot_acc")}
        return res

    def fidelity(self, emb: dict[str, torch.Tensor]) -> dict[str, float]:
        b = self.base
        out = {"image_cos": float((emb["fairface"] * b["fairface"]).sum(-1).mean())}
        keys = [f"text:prompts/{s}" for s in SETS]
        out["prompt_cos"] = float(torch.cat([(emb[k] * b[k]).sum(-1) for k in keys]).mean())
        for name in ("concepts/occupations", "age", "captions"):
            p0 = zero_shot_probs(b["fairface"], b["text:" + name]).argmax(-1)
            p1 = zero_shot_probs(emb["fairface"], emb["text:" + name]).argmax(-1)
            out[f"agree/{name}"] = float((p0 == p1).float().mean())
        return out

    def _boot(self, s: str, after: list[float]) -> tuple[float, float]:
        """95% CI of the relative MaxSkew change, resampling concepts (templates of one concept move together)."""
        concepts = [c for _, c in self.data.prompt_sets[s]]
        names = sorted(set(concepts))
        idx = {c: [i for i, x in enumerate(concepts) if x == c] for c in names}
        before = torch.tensor(self.base_res[s]["per_prompt"])
        aft = torch.tensor(after)
        g = torch.Generator().manual_seed(self.seed)
        rel = []
        for _ in range(self.boot):
            pick = torch.randint(0, len(names), (len(names),), generator=g).tolist()
            rows = torch.tensor([i for p in pick for i in idx[names[p]]])
            rel.append(float(aft[rows].mean() / before[rows].mean() - 1))
        rel_t = torch.tensor(rel)
        return float(rel_t.quantile(0.025)), float(rel_t.quantile(0.975))

    def run(self, edits=None, tower: str = "image", fold=None) -> dict[str, Any]:
        """Scores with ``edits`` applied (or ``fold``: a callable returning a handle), relative to the base."""
        from debias_export.edits import apply_edits

        handle = fold() if fold is not None else apply_edits(self.adapter, edits)
        try:
            emb = dict(self.base) | self._embed(tower)
        finally:
            handle.remove()
        return self.summarise(emb)

    def summarise(self, emb: dict[str, torch.Tensor]) -> dict[str, Any]:
        res = self.score(emb)
        out: dict[str, Any] = {}
        for s in SETS:
            b, a, fl = self.base_res[s]["max_skew"], res[s]["max_skew"], self.floor[s]["max_skew"]
            lo, hi = self._boot(s, res[s]["per_prompt"])
            out[s] = {"before": b, "after": a, "rel": a / b - 1, "ci95": (lo, hi), "floor": fl,
                      "excess_removed": (b - a) / (b - fl)}
        out["utility"] = res["utility"]
        out["utility_before"] = self.base_res["utility"]
        out["fidelity"] = self.fidelity(emb)
        return out


def row(name: str, r: dict[str, Any]) -> str:
    """One markdown table row: skew changes per set (with CI for occupations) and utility."""
    o = r["occupations"]
    u, f = r["utility"], r["fidelity"]
    cells = [name, f"{o['after']:.3f}", f"{100 * o['rel']:+.1f}% [{100 * o['ci95'][0]:+.0f},{100 * o['ci95'][1]:+.0f}]",
             f"{100 * o['excess_removed']:+.0f}%"]
    cells += [f"{100 * r[s]['rel']:+.1f}%" for s in SETS[1:]]
    cells += [f"{u['caption_recall@10']:.3f}", f"{u['caption_recall@50']:.3f}", f"{u['gender_zero_shot_acc']:.3f}",
              f"{u['age_zero_shot_acc']:.3f}", f"{f['image_cos']:.3f}", f"{f['prompt_cos']:.3f}",
              f"{f['agree/concepts/occupations']:.2f}", f"{f['agree/captions']:.2f}"]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| variant | occ. MaxSkew | occ. change [95% CI] | occ. excess removed | adj. | act. | ster. | R@10 | R@50 | "
          "gender zs acc | age zs acc | img cos | prompt cos | agree occ | agree capt |\n"
          "|" + "---|" * 15)


def save_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def gender_ids(labels: Sequence[str]) -> torch.Tensor:
    return torch.tensor([0 if g == "Female" else 1 for g in labels])
