"""Projection edits as a product: `project` CLI per fold mode, folded export = stock checkpoint, recipes, bench."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from debias_export import SAEEdit, load_edit
from debias_export.capture.store import ActivationStore
from debias_export.cli.main import main
from debias_export.edits.projection import ProjectionEdit, fold_all, reference_map
from debias_export.analysis.leace import one_hot
from debias_export.workflow.testing import random_sae, tiny_clip

ROOT = Path(__file__).resolve().parents[1]
FOLDS = ["none", "site", "output", "every_writer"]


@pytest.fixture(scope="module")
def caps(tmp_path_factory):
    """40 labelled noise images (one group red-shifted) captured at image.-1 and image.1.mlp_out of tiny-clip."""
    from PIL import Image

    d = tmp_path_factory.mktemp("proj")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        arr = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
        if i % 2:
            arr[..., 0] = np.clip(arr[..., 0].astype(int) + 60, 0, 255)
        Image.fromarray(arr).save(d / f"{i}.png")
        rows.append(f"{i}.png,{'Female' if i % 2 else 'Male'}")
    (d / "labels.csv").write_text("file,gender\n" + "\n".join(rows) + "\n")
    for name, site in (("cap", "image.-1"), ("cap_mlp", "image.1.mlp_out")):
        assert main(["capture", "--model", "tiny-clip", "--site", site, "--images", str(d / "labels.csv"),
                     "--out", str(d / name), "--no-progress"]) == 0
    return d


def project(caps, fold, out, *extra):
    cap = caps / ("cap_mlp" if fold == "site" else "cap")
    argv = ["project", "--capture", str(cap), "--column", "gender", "--fold", fold, "--out", str(out), *extra]
    if fold != "none":
        argv += ["--model", "tiny-clip"]
    if fold == "output":
        argv += ["--no-center"]
    assert main(argv) == 0
    return load_edit(out)


def xcov(x, labels):
    z = one_hot(labels).double()
    return ((x.double() - x.double().mean(0)).T @ (z - z.mean(0))).norm()


@pytest.mark.parametrize("fold", FOLDS)
def test_project_cli_each_fold_mode(caps, tmp_path, fold):
    edit = project(caps, fold, tmp_path / "e")
    assert isinstance(edit, ProjectionEdit) and edit.fold == fold and edit.in_dirs.shape[1] == 1
    cfg = json.loads((tmp_path / "e" / "edit_config.json").read_text())
    assert cfg["kind"] == "projection" and cfg["fold"] == fold and cfg["rank"] == 1
    store = ActivationStore(caps / ("cap_mlp" if fold == "site" else "cap"))
    labels = store.labels("gender")
    x = store.output_activations()
    if fold == "output":  # fitted on the embeddings: the tower's own final norm + projection of the output token
        clip = tiny_clip(0)
        with torch.no_grad():
            x = clip.model.visual_projection(clip.model.vision_model.post_layernorm(x))
        assert edit.width == 16 and edit.provenance["activations"] == "embedding"
    # the fitted map removes every linear trace of the label from the data it was fitted on
    assert xcov(reference_map(edit, x), labels) < 1e-4 * xcov(x, labels)
    # exporting it: folds give a stock directory (no patches, no remote code), "none" a patched one
    assert main(["export", "--model", "tiny-clip", "--edit", str(tmp_path / "e"), "--out", str(tmp_path / "b"),
                 "--no-onnx"]) == 0
    hf = tmp_path / "b" / "hf"
    stock = fold != "none"
    assert (hf / "debias_patches.safetensors").exists() is not stock
    assert ("auto_map" in json.loads((hf / "config.json").read_text())) is not stock
    dcfg = json.loads((hf / "debias_config.json").read_text())
    assert [f["mode"] for f in dcfg.get("folds", [])] == ([fold] if stock else [])


STOCK_CHECK = """
import sys
sys.modules["debias_export"] = None  # the folded checkpoint must not need this package
import torch
from safetensors.torch import load_file
from transformers import CLIPModel
m = CLIPModel.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
t = load_file(sys.argv[2])
with torch.no_grad():
    img = m.get_image_features(pixel_values=t["pixel_values"])
img = getattr(img, "pooler_output", img)  # transformers 5 returns an output object
print(float((img - t["image"]).abs().max()), float((img - t["base"]).abs().max()))
"""


def test_folded_export_is_a_stock_clip_checkpoint(caps, tmp_path):
    """Three folds (site, output, every writer) exported together: plain CLIPModel loads the folded model."""
    from debias_export import load_patched

    edits = [project(caps, f, tmp_path / f) for f in ("site", "output", "every_writer")]
    assert main(["export", "--model", "tiny-clip", *[a for f in ("site", "output", "every_writer")
                                                     for a in ("--edit", str(tmp_path / f))],
                 "--out", str(tmp_path / "b"), "--tower", "image"]) == 0
    clip = tiny_clip(0)
    x = {"pixel_values": torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))}
    with torch.no_grad():
        base = clip.embed("image", x)
        handles = fold_all(clip, edits)
        want = clip.embed("image", x)
    assert [h.describe()["stock"] for h in handles] == [True] * 3
    save_file({"pixel_values": x["pixel_values"], "image": want, "base": base}, str(tmp_path / "io.safetensors"))
    (tmp_path / "check.py").write_text(STOCK_CHECK)
    res = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(tmp_path / "b" / "hf"), str(tmp_path / "io.safetensors")],
                         capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    err, moved = map(float, res.stdout.split())
    assert err < 1e-5 and moved > 1e-3  # the checkpoint carries the (non-trivial) edit
    with torch.no_grad():
        assert torch.equal(load_patched(tmp_path / "b").embed("image", x), want)
    report = json.loads((tmp_path / "b" / "export_report.json").read_text())
    assert report["stock"] and report["onnx"]["patched"] is False
    assert main(["validate", str(tmp_path / "b")]) == 0


def test_fold_combined_with_patched_sae_edit(caps, tmp_path):
    """A folded projection + a patched SAE edit: patched export whose base weights carry the fold."""
    from debias_export import apply_edits, load_patched

    proj = project(caps, "every_writer", tmp_path / "p")
    sae = SAEEdit(site="image.1", sae=random_sae(32, 64), neurons=[2, 5], alpha=0.6)
    sae.save(tmp_path / "s")
    assert main(["export", "--model", "tiny-clip", "--edit", str(tmp_path / "p"), "--edit", str(tmp_path / "s"),
                 "--out", str(tmp_path / "b"), "--no-onnx"]) == 0
    clip = tiny_clip(0)
    x = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))}
    with torch.no_grad():
        fold_all(clip, [proj])
        apply_edits(clip, sae)
        want = clip.embed("image", x)
        assert torch.equal(load_patched(tmp_path / "b").embed("image", x), want)
    dcfg = json.loads((tmp_path / "b" / "hf" / "debias_config.json").read_text())
    assert [f["mode"] for f in dcfg["provenance"]["folds"]] == ["every_writer"] and len(dcfg["patches"]) == 1


def test_fair_directions_from_file(caps, tmp_path):
    save_file({"directions": torch.randn(32, 2, generator=torch.Generator().manual_seed(0))}, str(tmp_path / "f.safetensors"))
    edit = project(caps, "none", tmp_path / "e", "--fair-from", str(tmp_path / "f.safetensors"), "--amplify", "0.5")
    assert edit.fair.shape == (32, 2) and edit.amplify == 0.5
    assert (edit.fair.double().T @ edit.out_dirs.double()).abs().max() < 1e-4  # orthogonal to the erased subspace


def test_bench_folded_variant_adds_no_flops(caps, tmp_path):
    """Folded = same operators and shapes: FLOPs ratio exactly 1 (PyTorch and ONNX), outputs still edited."""
    from debias_export.bench import PatchSet, run_benchmark

    edit = project(caps, "every_writer", tmp_path / "e")
    clip = tiny_clip(0)
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    variants = {"folded": PatchSet.compile("folded", clip, [edit]),
                "patched": PatchSet.compile("patched", clip, [dataclasses.replace(edit, fold="none")])}
    assert all(torch.equal(v, before[k]) for k, v in clip.model.state_dict().items())  # compile restored the weights
    res = run_benchmark(clip, variants, ["image"], batch_sizes=[2], runtimes=["torch", "ort"], reps=2, warmup=1)
    flops = {r["variant"]: r for r in res["flops"]}
    assert flops["folded"]["torch_ratio"] == 1.0 and flops["folded"]["onnx_ratio"] == 1.0
    assert flops["patched"]["torch_ratio"] > 1.0  # the fused low-rank module costs a little
    checks = [c for c in res["checks"] if c["variant"] == "folded"]
    assert {c["runtime"] for c in checks} == {"torch", "ort"} and min(c["max_abs_diff_vs_unmodified"] for c in checks) > 1e-3
    assert res["variants"]["folded"]["folded"][0]["mode"] == "every_writer" and res["variants"]["folded"]["edit_params"] == 0
    assert all(torch.equal(v, before[k]) for k, v in clip.model.state_dict().items())  # benchmark left it unmodified


def test_repo_recipe_projection_and_sae_variants(tmp_path, shared_data):
    """recipes/tiny-clip-fairface.yaml: an SAE variant and two folded projection variants, exported, evaluated,
    benched and reported side by side."""
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-clip-fairface.yaml").read_text())
    assert [v["name"] for v in raw["variants"]] == ["sae-reconstruct", "leace-every-writer", "leace-output"]
    raw["data"].update(dir=shared_data, limit=64)
    raw["sae"]["steps"] = 30
    raw["edit"]["neurons"] = [1, 2]
    raw["export"]["onnx"] = False
    raw["output"]["dir"] = str(tmp_path / "out")
    raw["eval"] = {"alphas": [0.0, 1.0], "k": 20}
    raw["bench"] = {"batch_sizes": [1], "reps": 2, "runtimes": ["torch"]}
    for v in raw["variants"][1:]:
        v["edit"]["neurons"] = None  # the base's explicit SAE neurons do not apply to projections
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "r.yaml"), "--no-progress"]) == 0
    out = tmp_path / "out"
    summary = {s["variant"]: s for s in json.loads((out / "summary.json").read_text())}
    assert summary["sae-reconstruct"]["kind"] == "sae"
    for name, fold in (("leace-every-writer", "every_writer"), ("leace-output", "output")):
        p = summary[name]
        assert (p["kind"], p["method"], p["fold"], p["rank"], p["stock"]) == ("projection", "leace", fold, 1, True)
        assert json.loads((out / name / "run.json").read_text())["fold"] == fold
        assert not (out / name / "export" / "hf" / "debias_patches.safetensors").exists()
        ev = p["eval"]
        assert ev["sweep"][0]["max_skew_gender"] == ev["max_skew_gender_before"]  # b = 0 is the unmodified model
        assert ev["sweep"][1]["max_skew_gender"] == ev["max_skew_gender_after"]  # b = 1 is the deployed edit
        assert ev["fidelity"]["image_cosine"]["mean"] < 0.9999  # ... and it changes the embeddings
        head = p["bench"]["headline"]
        assert head and head[0]["variant"] == "folded" and head[0]["flops_ratio"] == 1.0
    report = (out / "report.md").read_text()
    assert "| sae-reconstruct | sae | image.2.resid_post | reconstruct |" in report
    assert "| leace-every-writer | projection | image.2.resid_post | leace, fold every_writer | 1.0 | rank 1 |" in report
    assert "| leace-output | projection | image.2.resid_post | leace, fold output | 1.0 | rank 1 |" in report


def test_eval_installs_folded_edits_as_exported(caps, tmp_path, clip, clip_inputs):
    """compare/sweep_alpha given a folded edit evaluate the folded model (not a single-site patch of it)."""
    from debias_export.edits.install import install_edits

    edit = project(caps, "every_writer", tmp_path / "e")
    sae = SAEEdit(site="image.1", sae=random_sae(32, 64), neurons=[3], alpha=0.6)
    x = clip_inputs["image"]
    with torch.no_grad():
        base = clip.embed("image", x)
        handles = fold_all(clip, [edit])
        from debias_export import apply_edits

        patch = apply_edits(clip, sae)
        want = clip.embed("image", x)
        patch.remove()
        handles[0].remove()
        single_site = dataclasses.replace(edit, fold="none")
        installed = install_edits(clip, [edit, sae])
        got = clip.embed("image", x)
        installed.remove()
        assert torch.equal(clip.embed("image", x), base)
        other = install_edits(clip, single_site)
        patched = clip.embed("image", x)
        other.remove()
    assert torch.equal(got, want)
    assert (patched - got).abs().max() > 1e-3  # erasing every write is not the same map as patching one site
