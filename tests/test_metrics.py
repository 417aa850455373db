"""Bias / utility metrics against hand-computed values; evaluation pipeline on the shared data."""
import dataclasses
import json
import math

import pytest
import torch

from debias_export import DebiasError, SAEEdit
from debias_export.analysis.metrics import (accuracy, confidence_gap, cosine_scores, embedding_cosine, max_skew,
                                            ndkl, recall_at_k, retrieval_skew, shuffled_skew, zero_shot_agreement,
                                            zero_shot_probs)
from debias_export.workflow.testing import random_sae


def test_max_skew_hand_values():
    assert max_skew(["F", "F", "F", "M"], ["F", "M"]) == pytest.approx(math.log(0.75 / 0.5))
    assert max_skew(["F", "M", "F", "M"], ["F", "M"]) == pytest.approx(0.0)
    # an absent class counts as 1/k, the present one p=1: ln(1 / (1/3)) = ln 3
    assert max_skew(["A"] * 4, ["A", "B", "C"]) == pytest.approx(math.log(3))
    # the minority class can be the max only through the 1/k smoothing: k=2, classes A,B,C
    assert max_skew(["A", "B"], ["A", "B", "C"]) == pytest.approx(math.log(0.5 * 3))


def test_ndkl_hand_values():
    # i=1: D=(1,0), KL=ln2, weight 1; i=2: D=(.5,.5), KL=0, weight 1/log2(3)
    assert ndkl(["F", "M"], ["F", "M"]) == pytest.approx(math.log(2) / (1 + 1 / math.log2(3)))
    assert ndkl(["F", "F"], ["F", "M"]) == pytest.approx(math.log(2))
    z = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    # i=3: D=(2/3,1/3): KL = 2/3 ln(4/3) + 1/3 ln(2/3)
    kl3 = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    assert ndkl(["F", "M", "F"], ["F", "M"]) == pytest.approx((math.log(2) + kl3 / math.log2(4)) / z)


def test_metric_errors_are_one_line():
    with pytest.raises(DebiasError, match="not one of the attribute classes"):
        max_skew(["X"], ["F", "M"])
    with pytest.raises(DebiasError, match="k=5 is larger"):
        retrieval_skew(torch.zeros(1, 3), ["F", "M", "F"], 5)
    with pytest.raises(DebiasError, match="width 3 but image embeddings 4"):
        cosine_scores(torch.zeros(1, 3), torch.zeros(2, 4))


def test_retrieval_skew_ranks_by_cosine_and_matches_scalar_formulas():
    labels = ["F", "F", "M", "M", "M", "F"]
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.3, 0.7],   # top3 = F F F
                           [0.1, 0.2, 0.9, 0.3, 0.8, 0.0]])  # top3 = M M M... order 2,4,3
    res = retrieval_skew(scores, labels, k=3)
    assert res["max_skew_per_prompt"] == pytest.approx([math.log(2), math.log(2)])
    assert res["ndkl_per_prompt"][0] == pytest.approx(ndkl(["F", "F", "F"], ["F", "M"]))
    scores2 = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.0]])  # top4 = F, M, M, M (idx 0, 2, 4, 3)
    res2 = retrieval_skew(scores2, labels, k=4)
    assert res2["max_skew"] == pytest.approx(max_skew(["F", "M", "M", "M"], ["F", "M"]))
    assert res2["ndkl"] == pytest.approx(ndkl(["F", "M", "M", "M"], ["F", "M"]))
    keep = torch.tensor([False, True, True, True, True, True])  # drop image 0 from the pool
    res3 = retrieval_skew(scores2, labels, k=2, keep=keep)
    assert res3["pool"] == 5 and res3["max_skew"] == pytest.approx(math.log(2))  # top2 = M, M


def test_shuffled_floor_is_below_a_perfectly_sorted_ranking():
    labels = ["F"] * 50 + ["M"] * 50
    scores = torch.linspace(1, 0, 100)[None].repeat(3, 1)  # every prompt ranks all F first
    real = retrieval_skew(scores, labels, k=20)
    floor = shuffled_skew(scores, labels, k=20, shuffles=8, seed=0)
    assert real["max_skew"] == pytest.approx(math.log(2))
    assert floor["max_skew"] < 0.4 and floor["max_skew_sd"] > 0
    assert shuffled_skew(scores, labels, k=20, shuffles=8, seed=0) == floor  # fixed seed, same floor
    keep = torch.tensor([i % 2 == 0 for i in range(100)])
    assert shuffled_skew(scores, labels, k=10, shuffles=2, keep=keep)["k"] == 10


def test_confidence_gap_hand_values():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    res = confidence_gap(probs, ["x", "x", "y", "y"])  # conf x = (.7, .3), y = (.4, .6)
    assert res["gap_per_label"] == pytest.approx([0.3, 0.3])
    kl0 = 0.7 / 1.1 * math.log(2 * 0.7 / 1.1) + 0.4 / 1.1 * math.log(2 * 0.4 / 1.1)
    kl1 = 1 / 3 * math.log(2 / 3) + 2 / 3 * math.log(4 / 3)
    assert res["kl"] == pytest.approx((kl0 + kl1) / 2, rel=1e-5)  # float32 probabilities
    same = confidence_gap(torch.tensor([[0.5, 0.5]] * 4), ["a", "b", "c", "d"])
    assert same["gap"] == pytest.approx(0.0) and same["kl"] == pytest.approx(0.0, abs=1e-9)


def test_utility_metrics_hand_values():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    assert recall_at_k(scores, torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.bool), 1) == 1.0
    # q1: top2 {0,2} has no relevant (0/1); q2: top2 {1,2} holds 1 of min(2, 2) -> 0.5; mean 0.25
    assert recall_at_k(scores, torch.tensor([[0, 1, 0], [1, 1, 0]], dtype=torch.bool), 2) == pytest.approx(0.25)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    cos = embedding_cosine(b, a)
    assert cos["mean"] == pytest.approx((1 + 2 ** -0.5) / 2) and cos["min"] == pytest.approx(2 ** -0.5)
    p1 = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    p2 = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.6, 0.4]])
    assert zero_shot_agreement(p1, p2) == pytest.approx(2 / 3)
    assert accuracy(p1, [0, 1, 1]) == pytest.approx(2 / 3)
    probs = zero_shot_probs(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), scale=2.0)
    assert probs[0].tolist() == pytest.approx([math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)])


# ----- pipeline on the shared data (tiny random CLIP: checks plumbing, not the numbers) ----------
@pytest.fixture(scope="module")
def eval_setup():
    import os

    from debias_export.eval.retrieval import EvalData
    from debias_export.workflow.testing import tiny_clip

    path = os.environ.get("DEBIAS_EXPORT_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    if not os.path.isdir(path):
        pytest.skip("shared data not found")
    clip = tiny_clip(seed=0)
    return clip, EvalData.load(clip, path, ["occupations", "stereotypes"], max_images=90)


def test_prompt_sets_and_captions(shared_data):
    from debias_export.eval.retrieval import fairface_caption, load_prompt_sets

    sets = load_prompt_sets(shared_data)
    assert len(sets["occupations"]) == 7 * 41 and len(sets["adjectives"]) == 12 * 29 and len(sets["activities"]) == 6 * 33
    assert ("This is the face of a doctor", "doctor") in sets["occupations"]
    assert fairface_caption({"age": "20-29", "gender": "Female", "race": "Black"}) == "a photo of a young Black woman"
    assert fairface_caption({"age": "70+", "gender": "Male", "race": "East Asian"}) == "a photo of an elderly East Asian man"
    # gender-free captions: the noun keeps child vs adult (as girl / boy vs woman / man do), any gender label is fine
    assert fairface_caption({"age": "20-29", "gender": "Female", "race": "Black"}, ("gender",)) == "a photo of a young Black person"
    assert fairface_caption({"age": "3-9", "gender": "Male", "race": "East Asian"}, ("gender",)) == "a photo of an East Asian child"
    assert fairface_caption({"age": "70+", "gender": "", "race": "Indian"}, ("gender",)) == "a photo of an elderly Indian person"
    assert fairface_caption({"age": "70+", "gender": "", "race": "Indian"}) is None
    assert fairface_caption({"age": "15", "gender": "Female", "race": "Others"}, ("gender",)) == "a photo of a teenage child"


def test_gender_free_caption_recall_keeps_what_a_gender_edit_must_keep():
    """Images whose gender reads wrong lose gendered-caption recall but keep gender-free recall: the metric a
    gender edit is held to measures the other attributes, the gendered one the edit's own target."""
    from debias_export.eval.retrieval import EvalData, utility_metrics

    rows = [{"age": "20-29", "gender": g, "race": r} for r in ("Black", "White") for g in ("Female", "Male")]
    data = EvalData(rows, [], {})
    texts = data.texts()
    assert texts["captions_no_gender"] == ["a photo of a young Black person", "a photo of a young White person"]
    axis = {"Black": 0, "White": 1, "Female": 2, "Male": 3}  # one embedding direction per label word

    def vec(*words):
        v = torch.zeros(4)
        for w in words:
            v[axis[w]] = 1.0
        return torch.nn.functional.normalize(v, dim=0)

    def text_vec(caption):
        return vec(*[w for w, word in (("Black", "Black"), ("White", "White"), ("Female", "woman"), ("Male", " man"))
                     if word in caption])

    emb = {f"text:{g}": torch.stack([text_vec(c) for c in texts[g]]) for g in ("captions", "captions_no_gender")}
    flip = {"Female": "Male", "Male": "Female"}
    right = utility_metrics({**emb, "fairface": torch.stack([vec(r["race"], r["gender"]) for r in rows])}, data, ks=(1, 2))
    wrong = utility_metrics({**emb, "fairface": torch.stack([vec(r["race"], flip[r["gender"]]) for r in rows])}, data, ks=(1, 2))
    assert right["caption_recall@1"] == 1.0 and wrong["caption_recall@1"] == 0.0
    assert right["caption_recall_no_gender@2"] == wrong["caption_recall_no_gender@2"] == 1.0
    assert right["caption_queries"] == 4 and right["caption_queries_no_gender"] == 2


def test_evaluate_compare_sweep_and_report(eval_setup, tmp_path):
    from debias_export.eval.report import write_report
    from debias_export.eval.retrieval import compare, evaluate, sweep_alpha

    clip, data = eval_setup
    res = evaluate(clip, k=10, shuffles=3, data=data)
    occ = res["retrieval"]["occupations"]
    assert occ["prompts"] == 287 and occ["age"]["pool"] < occ["gender"]["pool"] == 90  # 0-2 / 70+ dropped for age
    for attr in ("gender", "race", "age"):
        assert 0 <= occ[attr]["max_skew"] <= math.log(occ[attr]["classes"]) + 1e-9
    assert set(res["pairs"]) == {"occupations", "status", "potential_crime"}
    assert res["pairs"]["occupations"]["scenarios"] == 20 and 0 <= res["utility"]["caption_recall@10"] <= 1
    edit = SAEEdit(site="image.-1", sae=random_sae(32, 64), neurons=[1, 2, 3], alpha=1.0)
    cmp = compare(clip, edit, k=10, data=data)
    assert cmp["fidelity"]["image_cosine"]["mean"] < 1 - 1e-6  # the edit moved image embeddings
    assert cmp["fidelity"]["prompt_cosine"]["mean"] == pytest.approx(1.0)  # image-tower edit: text untouched
    rows = sweep_alpha(clip, lambda a: SAEEdit(site="image.-1", sae=random_sae(32, 64), neurons=[1, 2, 3], alpha=a),
                       [0.0, 1.0], k=10, data=data)
    assert rows[0]["fidelity"]["image_cosine"]["min"] == pytest.approx(1.0)  # alpha 0 = identity
    for attr in ("gender", "race", "age"):  # alpha 0 reproduces the unpatched metrics
        assert rows[0]["retrieval"]["occupations"][attr]["max_skew"] == res["retrieval"]["occupations"][attr]["max_skew"]
    assert rows[1]["fidelity"]["image_cosine"]["mean"] == pytest.approx(cmp["fidelity"]["image_cosine"]["mean"], abs=1e-6)
    for result, name in ((res, "e"), (cmp, "c"), (rows, "s")):
        out = write_report(result, tmp_path / name)
        assert (out / "report.md").read_text().startswith("#") and json.loads((out / "metrics.json").read_text())
    assert (tmp_path / "s" / "tradeoff.png").stat().st_size > 0
    with pytest.raises(DebiasError, match="already exists"):
        write_report(res, tmp_path / "e")


def test_cli_eval(shared_data, tmp_path):
    from debias_export.cli.main import main

    out = tmp_path / "rep"
    args = ["eval", "--model", "tiny-clip", "--data", shared_data, "--out", str(out), "-k", "10", "--shuffles", "2",
            "--prompt-sets", "stereotypes", "--max-images", "90"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["retrieval"]["stereotypes"]["prompts"] == 80
    assert main(args) == 2  # refuses to overwrite
    assert main(args[:-4] + ["--prompt-sets", "nope", "--overwrite"]) == 2


def test_paired_bootstrap_change_by_hand():
    from debias_export.analysis.metrics import paired_bootstrap_change

    # every item drops by exactly 20%: any resample gives -20%, so the interval collapses onto it
    out = paired_bootstrap_change([1.0, 2.0, 3.0, 4.0], [0.8, 1.6, 2.4, 3.2], ["a", "a", "b", "c"], n=200)
    assert out["change"] == pytest.approx(-0.2) and out["ci_low"] == pytest.approx(-0.2) and out["ci_high"] == pytest.approx(-0.2)
    # one concept falls, one rises: the point estimate is their pooled ratio, the interval spans both extremes
    out = paired_bootstrap_change([1.0, 1.0], [0.5, 1.5], ["x", "y"], n=2000, seed=1)
    assert out["change"] == pytest.approx(0.0)
    assert out["ci_low"] == pytest.approx(-0.5) and out["ci_high"] == pytest.approx(0.5)
    with pytest.raises(DebiasError):
        paired_bootstrap_change([1.0], [1.0, 2.0], ["a"])


def test_blank_labels_are_skipped_not_a_group(eval_setup):
    """The one missing-label rule: a face with a blank label leaves the pool instead of forming a third group."""
    from debias_export.eval.retrieval import bias_metrics, embed

    clip, data = eval_setup
    emb = embed(clip, data)
    blanked = dataclasses.replace(data, fairface=[dict(r, gender="" if i % 10 == 0 else r["gender"])
                                                  for i, r in enumerate(data.fairface)])
    gender = bias_metrics(emb, blanked, k=10)["occupations"]["gender"]
    assert gender["classes"] == 2 and gender["pool"] == 81 and gender["unlabelled_skipped"] == 9
    assert "unlabelled_skipped" not in bias_metrics(emb, data, k=10)["occupations"]["gender"]
