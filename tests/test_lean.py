"""Text fit data for erasing implicit gender (``data.texts: prompts:neutral``, ``data.label_by: lean``,
``edit.fit_on``): the corpus never holds a held-out concept, lean labels match a direct computation, the recipe keys
are validated with line-numbered errors, and a protocol run fits on lean labels without reading evaluation data."""
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from debias_export.cli.main import main
from debias_export.data.captions import NEUTRAL_CONCEPTS
from debias_export.eval.retrieval import HELD_OUT_HALF, PAIRS_LABELS, SELECT_HALF, load_prompt_sets
from debias_export.workflow import protocol
from debias_export.workflow.lean import lean_labels, neutral_prompts
from debias_export.workflow.model_specs import load_model_spec

_OPENED: dict = {"on": False, "paths": []}


def _audit(event, args):
    if _OPENED["on"] and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
        _OPENED["paths"].append(str(args[0]))


sys.addaudithook(_audit)  # records only while a test switches it on


def test_neutral_corpus_holds_select_prompts_and_no_held_out_concept(shared_data):
    corpus = neutral_prompts(shared_data)
    assert len(corpus) == len(set(corpus)) > 500
    held = {p for v in load_prompt_sets(shared_data, half=HELD_OUT_HALF).values() for p, _ in v}
    sel = {p for v in load_prompt_sets(shared_data, half=SELECT_HALF).values() for p, _ in v}
    assert not set(corpus) & held and sel <= set(corpus)
    named = {c.lower() for v in load_prompt_sets(shared_data).values() for _, c in v}
    named |= {c.lower() for v in PAIRS_LABELS.values() for c in v}
    own = [t for t in corpus if t not in sel]  # our own concepts: none named by a prompt set or PAIRS
    assert own and all(any(c in t for cs in NEUTRAL_CONCEPTS.values() for c in cs if c.lower() not in named) for t in own)
    assert corpus == neutral_prompts(shared_data)  # fixed order: the capture cache key depends on it


def test_lean_labels_split_at_the_median_of_a_direct_computation():
    adapter = load_model_spec("tiny-clip")
    texts = [f"a photo of a {w}" for w in ("cat", "dog", "nurse", "pilot", "tree", "house", "car", "judge", "bird")]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = adapter.embed("text", adapter.prepare_texts(texts)).float()
    faces = torch.nn.functional.normalize(torch.randn(12, emb.shape[1], generator=g), dim=-1)
    face_labels = ["Male", "Female", ""] * 4  # blanks are skipped, not a third class
    labels, info = lean_labels(adapter, texts, faces, face_labels)
    lean = []  # the same quantity written out per text: mean cosine to Female faces minus to Male faces
    for e in torch.nn.functional.normalize(emb, dim=-1):
        fem = [float(e @ faces[i]) for i, lab in enumerate(face_labels) if lab == "Female"]
        mal = [float(e @ faces[i]) for i, lab in enumerate(face_labels) if lab == "Male"]
        lean.append(sum(fem) / len(fem) - sum(mal) / len(mal))
    median = sorted(lean)[len(lean) // 2]
    assert info["classes"] == ["Female", "Male"] and info["median_lean"] == pytest.approx(median, abs=1e-6)
    assert labels == ["Female" if v > median + 1e-9 else "Male" for v in lean]
    assert labels.count("Female") == 4  # 9 texts: the median one and those below are "Male"
    with pytest.raises(Exception, match="two classes"):
        lean_labels(adapter, texts, faces, ["Male"] * 12)


def _recipe(tmp_path, shared_data, **extra) -> Path:
    raw = {"name": "lean", "seeds": [0], "model": {"spec": "tiny-clip"}, "site": "text.1",
           "data": {"dir": shared_data, "texts": "prompts:neutral", "label_by": "lean", "limit": 120},
           "capture": {"tokens": "all", "batch_size": 64},
           "probe": {"column": "gender"},
           "edit": {"kind": "projection", "method": "leace", "strength": 1.0, "fit_on": "mean"},
           "export": {"onnx": False},
           "select": {"limit": 40, "k": 5, "grid": {"edit.strength": [0.5, 1.0]}},
           "eval": {"alphas": [0.0, 1.0], "k": 5, "limit": 30}, "output": {"dir": str(tmp_path / "out")}}
    raw.update(extra)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_protocol_fits_text_eraser_on_lean_labels_without_evaluation_data(tmp_path, shared_data, monkeypatch):
    real_select = protocol.select_variant

    def select_audited(*args, **kwargs):
        _OPENED["on"] = True
        try:
            return real_select(*args, **kwargs)
        finally:
            _OPENED["on"] = False

    from debias_export.workflow import pipeline
    monkeypatch.setattr(pipeline, "select_variant", select_audited)
    _OPENED["paths"].clear()
    assert main(["run", str(_recipe(tmp_path, shared_data)), "--no-progress"]) == 0
    assert not [p for p in _OPENED["paths"] if "fairface540" in p or "/pairs/" in p]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())[0]
    assert summary["fit_data"]["label_by"] == "lean" and summary["fit_data"]["texts"] == "prompts:neutral"
    assert summary["kind"] == "projection" and summary["site"].startswith("text.1")
    assert '"activations": "mean"' in (out / "edit" / "edit_config.json").read_text()  # fit_on: mean reached the fit
    assert len(json.loads((out / "selection.json").read_text())["cells"]) == 2


@pytest.mark.parametrize("change,words", [
    ({"select": None}, "needs a select: section"),
    ({"data": {"texts": "prompts:neutral"}}, "data.texts: prompts:neutral has no labels"),
    ({"data": {"texts": "prompts:neutral", "label_by": "vibes"}}, "data.label_by: must be one of column, lean"),
    ({"edit": {"kind": "projection", "fit_on": "cls"}}, "edit.fit_on: must be auto, mean or output"),
    ({"edit": {"kind": "sae", "fit_on": "mean"}}, "edit.fit_on: only applies to edit.kind: projection"),
    ({"data": {"images": "utkface/labels.csv", "label_by": "lean"}, "site": "image.1"}, "lean labels text fit data"),
])
def test_bad_lean_keys_exit_2_with_a_line_number(tmp_path, shared_data, capsys, change, words):
    extra = {k: v for k, v in change.items() if v is not None}
    if "data" in extra:
        extra["data"] = {"dir": shared_data, **extra["data"]}
    path = _recipe(tmp_path, shared_data, **extra)
    if "select" in change and change["select"] is None:
        raw = yaml.safe_load(path.read_text())
        raw.pop("select")
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert " line " in err[0]
    assert not (tmp_path / "out").exists()
