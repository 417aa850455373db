"""Every CLI command works on every registered model family, through the same adapter interface.

``FAMILY_SPECS`` maps each registered family to a tiny offline model spec: registering a family without
adding it here fails ``test_table_covers_every_registered_family``, and adding a command without a test
here fails ``test_every_command_is_covered``. Per family, one chain of real CLI invocations (click's
CliRunner) on a small synthetic data folder laid out like the shared data: capture -> train-sae ->
probe -> patch -> export (+ONNX) -> validate / verify / bench / eval, plus project, locate and a tiny recipe run.
Each artifact is built once per family (module-scoped fixtures) and checked by its own test.
"""
from __future__ import annotations

import csv
import json
import math
import traceback

import pytest
import torch
import yaml
from click.testing import CliRunner

from debias_export.adapters import registered_families
from debias_export.workflow.model_specs import load_model_spec
from debias_export.cli.main import cli

FAMILY_SPECS = {"hf_clip": "tiny-clip", "hf_dual_encoder": "tiny-dual-encoder", "llava": "tiny-llava",
                "open_clip": "tiny-open-clip"}
COMMANDS = ("capture", "train-sae", "probe", "project", "locate", "patch", "export", "validate", "verify", "bench", "eval",
            "run")
NOT_PER_FAMILY = {"bias-lab", "reproduce", "compare"}  # own model; re-runs a recorded recipe; reads two runs' summaries: tests/test_biaslab.py, tests/test_reproduce.py, tests/test_compare_runs.py
N_FACES = 8  # 4 female + 4 male


def invoke(*args: str) -> str:
    """Run one CLI command in-process; fail with its output (and exception) when it does not exit 0."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exit_code != 0:
        where = ""
        if result.exc_info and not isinstance(result.exception, SystemExit):
            where = "".join(traceback.format_exception(*result.exc_info)[-3:])  # the raising frame, not just repr
        pytest.fail(f"debias-export {args[0]} exited {result.exit_code}: {result.output[-1500:]}\n{where}")
    return result.output


def _png(path, seed: int) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 255, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()).save(path)


def _write_csv(path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def test_table_covers_every_registered_family():
    assert set(FAMILY_SPECS) == set(registered_families())


def test_every_command_is_covered():
    assert set(cli.list_commands(None)) - NOT_PER_FAMILY == set(COMMANDS)  # commands load lazily: list, not .commands
    assert all(f"test_{c.replace('-', '_')}" in globals() for c in COMMANDS)  # each with its own per-family test


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny folder in the shared-data layout: fairface540 (8 labelled faces), pairs (1 scenario per
    section), prompts (2 templates x 2 concepts per set). Random pixels: the commands, not the bias, are tested."""
    root = tmp_path_factory.mktemp("data")
    races = ["White", "Black", "East Asian", "Indian"]
    faces = []
    for i in range(N_FACES):
        name = f"{i:03d}.png"
        (root / "fairface540" / "images").mkdir(parents=True, exist_ok=True)
        _png(root / "fairface540" / "images" / name, i)
        faces.append([name, ("20-29", "30-39")[i % 2], ("Female", "Male")[i // 4], races[i % 4], name])
    _write_csv(root / "fairface540" / "labels.csv", ["file", "age", "gender", "race", "fairface_file"], faces)
    pairs = []
    for s, section in enumerate(("occupations", "status", "potential_crime")):
        for j, (race, gender) in enumerate([(r, g) for r in ("black", "white") for g in ("man", "woman")]):
            name = f"{section}/s0/{race}_{gender}.png"
            (root / "pairs" / section / "s0").mkdir(parents=True, exist_ok=True)
            _png(root / "pairs" / name, 100 + 4 * s + j)
            pairs.append([name, section, "s0", race, gender])
    _write_csv(root / "pairs" / "labels.csv", ["file", "section", "scenario", "race", "gender"], pairs)
    prompts = {"adjectives": ("This person is {}", "kind", "smart"), "occupations": ("A photo of a {}", "doctor", "nurse"),
               "activities": ("A person who likes {}", "painting", "tennis")}
    for name, (template, *concepts) in prompts.items():
        _write_csv(root / "prompts" / f"{name}.csv", ["template", "concept"],
                   [[template, concepts[0]], ["This is a photo of " + template.lower(), concepts[1]]])
    return root


@pytest.fixture(scope="module", params=sorted(FAMILY_SPECS))
def ws(request, tmp_path_factory):
    """Per family: its spec, the default (consumed) image site, a work folder and the adapter's facts."""
    family = request.param
    adapter = load_model_spec(FAMILY_SPECS[family])
    assert adapter.family == family
    return {"family": family, "spec": FAMILY_SPECS[family], "site": adapter.default_site("image").name,
            "width": adapter.width("image"), "dir": tmp_path_factory.mktemp(family)}


@pytest.fixture(scope="module")
def captured(ws, data_dir):
    out = ws["dir"] / "capture"
    invoke("capture", "--model", ws["spec"], "--site", ws["site"], "--images", data_dir / "fairface540" / "labels.csv",
           "--columns", "gender,race", "--k", "2", "--batch-size", "4", "--out", out, "--no-progress")
    return out


@pytest.fixture(scope="module")
def sae_dir(captured, ws):
    out = ws["dir"] / "sae"
    invoke("train-sae", "--activations", captured, "--out", out, "--k", "4", "--expansion", "4", "--batch-size", "8",
           "--steps", "5", "--no-progress")
    return out


@pytest.fixture(scope="module")
def probe_report(captured, sae_dir, ws):
    out = ws["dir"] / "probe.json"
    invoke("probe", "--capture", captured, "--sae", sae_dir, "--column", "gender", "--tau", "0.02", "--out", out)
    return out


@pytest.fixture(scope="module")
def edit_dir(sae_dir, probe_report, ws):
    out = ws["dir"] / "edit"
    # explicit neurons: a random model has no reliable social neurons for --probe-report to find
    invoke("patch", "--model", ws["spec"], "--sae", sae_dir, "--neurons", "1,2,3", "--alpha", "1.0", "--value", "1.0",
           "--out", out)
    return out


@pytest.fixture(scope="module")
def export_dir(edit_dir, ws):
    out = ws["dir"] / "export"
    invoke("export", "--model", ws["spec"], "--edit", edit_dir, "--out", out)
    return out


def test_capture(captured, ws):
    from debias_export.capture.store import ActivationStore

    store = ActivationStore(captured)
    assert store.width == ws["width"] and store.num_inputs == N_FACES and store.num_tokens == 2 * N_FACES
    assert store.labels("gender").count("Female") == N_FACES // 2


def test_train_sae(sae_dir, ws):
    from debias_export.sae import SparseAutoencoder

    sae = SparseAutoencoder.load(sae_dir)
    assert sae.d_in == ws["width"] and sae.num_latents == 4 * ws["width"]
    assert torch.isfinite(sae.W_enc).all()


def test_probe(probe_report):
    report = json.loads(probe_report.read_text())
    assert set(report["groups"]) == {"Female", "Male"}
    assert all(g["n"] == N_FACES // 2 for g in report["groups"].values())


def test_project(captured, ws):
    from debias_export.edits import load_edit

    out = ws["dir"] / "projection"
    invoke("project", "--capture", captured, "--column", "gender", "--model", ws["spec"], "--out", out)
    edit = load_edit(out)
    assert edit.kind == "projection" and edit.in_dirs.shape[0] == ws["width"]


def test_patch(edit_dir, ws):
    from debias_export.edits import load_edit

    edit = load_edit(edit_dir)
    assert load_model_spec(ws["spec"]).resolve_site(edit.site) == load_model_spec(ws["spec"]).resolve_site(ws["site"])


def test_export(export_dir):
    assert (export_dir / "hf" / "manifest.json").is_file()
    assert any((export_dir / "onnx").glob("*.onnx"))


def test_validate(export_dir):
    assert "manifests verified, hf loads" in invoke("validate", export_dir, "--seed", "1")


def test_verify(export_dir):
    assert invoke("verify", export_dir).startswith("ok ")


def test_bench(edit_dir, ws):
    out = ws["dir"] / "bench"
    invoke("bench", "--model", ws["spec"], "--edit", edit_dir, "--batch-sizes", "1", "--reps", "1", "--warmup", "0",
           "--runtimes", "torch,ort", "--out", out)
    headline = json.loads((out / "bench.json").read_text())["headline"]
    assert {h["runtime"] for h in headline} == {"torch", "ort"}
    assert all(h["ratio_of_medians"] > 0 for h in headline)


def test_eval(edit_dir, data_dir, ws):
    out = ws["dir"] / "eval"
    # the metric the family supports: yes/no gender bias (llava) or retrieval skew (two-tower families)
    extra = [] if ws["family"] == "llava" else ["-k", "4", "--shuffles", "1"]
    invoke("eval", "--model", ws["spec"], "--edit", edit_dir, "--data", data_dir, "--limit", N_FACES, *extra, "--out", out)
    res = json.loads((out / "metrics.json").read_text())
    before, after = res["base"], res["patched"]
    if ws["family"] == "llava":
        assert before["n_questions"] == 6 and before["n_female"] == before["n_male"] == N_FACES // 2
        assert math.isfinite(after["mean_abs_dev"]) and res["fidelity"]["mean_abs_delta_p_yes"] > 0
    else:
        assert before["fairface_images"] == N_FACES
        assert math.isfinite(after["retrieval"]["occupations"]["gender"]["max_skew"])
    assert (out / "report.md").read_text().startswith("# Before / after the patch")


def test_locate(ws, data_dir):
    out = ws["dir"] / "locate"
    invoke("locate", "--model", ws["spec"], "--data", data_dir / "fairface540", "--column", "gender",
           "--prompts", data_dir / "prompts" / "occupations.csv", "--k", "4", "--no-heads", "--out", out)
    report = json.loads((out / "locate.json").read_text())
    # one curve point per block up to the one the model consumes (LLaVA reads block L-2)
    assert len(report["layers"]) == load_model_spec(ws["spec"]).consumed_layer("image") + 1


def test_run(ws, data_dir):
    recipe = {"name": f"tiny-{ws['family']}", "seed": 0, "model": {"spec": ws["spec"]}, "site": ws["site"],
              "data": {"dir": str(data_dir), "images": "fairface540/labels.csv"},
              "sae": {"k": 4, "expansion": 4, "batch_size": 8, "steps": 5},
              "edit": {"alpha": 1.0, "value": 1.0, "neurons": [1, 2, 3]}, "export": {"onnx": False},
              "eval": {"alphas": [0.0, 1.0], "k": 4}, "output": {"dir": str(ws["dir"] / "run")}}
    path = ws["dir"] / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    invoke("run", path, "--no-progress")
    run = json.loads((ws["dir"] / "run" / "run.json").read_text())
    assert run["site"].startswith("image.") and [r["alpha"] for r in run["eval"]["sweep"]] == [0.0, 1.0]
    assert (ws["dir"] / "run" / "export" / "hf" / "manifest.json").is_file()
