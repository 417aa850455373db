"""The bad-input table: every user mistake is ONE line ``error: ...`` naming the problem, exit code 2.

Data only (no tests): ``tests/test_bad_inputs.py`` runs every row. ``CLI_CASES`` are argv builders run
in-process through ``debias_export.cli.main.main``; ``API_CASES`` call the Python API and name the exception
type and the words its one-line message must hold; ``HANDLED_CASES`` are bad inputs that are handled
correctly rather than refused (their check says what "correctly" means).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from debias_export import DebiasError, SAEEdit, apply_edits, load_edit
from debias_export.adapters import adapter_for, load_adapter
from debias_export.core.errors import ConfigError, IntegrityError, ShapeError
from debias_export.export import export_onnx, export_patched, load_patched
from debias_export.sae.importers import load_any
from debias_export.sae.model import SparseAutoencoder
from debias_export.data.datasets import read_csv_table, to_rgb
from debias_export.export.manifest import find_artifacts
from debias_export.workflow.recipe import load_recipe
from debias_export.sae.train import TrainConfig
from debias_export.workflow.testing import random_sae, tiny_clip

ROOT = Path(__file__).resolve().parents[1]


# ----- small input builders ------------------------------------------------------------------------------
def prompts(tmp: Path) -> Path:
    p = tmp / "prompts.txt"
    p.write_text("a photo of a nurse\na photo of an engineer\n")
    return p


def image_csv(tmp: Path, rows: list[tuple[str, str]] | None = None, header: str = "file,gender",
              broken: str | None = None) -> Path:
    """A labelled-image CSV next to real PNGs; ``broken`` names a listed file holding garbage bytes."""
    rows = rows if rows is not None else [("a.png", "Male"), ("b.png", "Female")]
    for name, _ in rows:
        if name != broken and not name.startswith("missing"):
            Image.new("RGB", (32, 32), (120, 30, 200)).save(tmp / name)
    if broken:
        (tmp / broken).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    csv = tmp / "labels.csv"
    csv.write_text(header + "\n" + "".join(f"{f},{g}\n" for f, g in rows))
    return csv


def existing_capture(tmp: Path) -> Path:
    """A finished capture at ``tmp/o`` (so a second capture with other settings must be refused)."""
    from debias_export.cli.main import main

    out = tmp / "o"
    assert main(["capture", "--model", "tiny-clip", "--site", "text.1", "--texts", str(prompts(tmp)),
                 "--out", str(out), "--no-progress"]) == 0
    return out


def bert_dir(tmp: Path) -> Path:
    """A local model directory of a family no adapter handles."""
    d = tmp / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 30}))
    return d


def capture_argv(tmp: Path, *extra: str, site: str = "text.1", model: str = "tiny-clip") -> list[str]:
    return ["capture", "--model", model, "--site", site, "--out", str(tmp / "o"), "--no-progress", *extra]


# ----- CLI cases ----------------------------------------------------------------------------------------
def build_workspace(w: Path) -> Path:
    """Read-only inputs shared by the cases: SAEs, an edit, a labelled capture, an exported bundle."""
    from debias_export.cli.main import main

    random_sae(32, 64).save(w / "sae")
    random_sae(48, 64).save(w / "sae48")
    _sae_dir(w / "nan", _nan("W_dec"))
    _truncate(_sae_dir(w / "trunc") / "sae.safetensors")
    (w / "notsae").mkdir()
    (w / "notsae" / "weights.bin").write_bytes(b"\0" * 16)
    SAEEdit(site="image.-1", sae=random_sae(32, 64), neurons=[1, 2], alpha=0.8).save(w / "edit")
    _edit_dir(w / "nanedit", _nan("sae.b_enc"))
    (w / "imgs").mkdir()
    csv = image_csv(w / "imgs", [(f"{i}.png", "Male" if i % 2 else "Female") for i in range(4)])
    assert main(["capture", "--model", "tiny-clip", "--site", "image.-1", "--images", str(csv), "--out", str(w / "cap"),
                 "--no-progress"]) == 0
    assert main(["export", "--model", "tiny-clip", "--edit", str(w / "edit"), "--out", str(w / "bundle"), "--tower", "image"]) == 0
    # an SAE trained on that capture (records site image.2 and the model fingerprint) and an edit made from it
    assert main(["train-sae", "--activations", str(w / "cap"), "--out", str(w / "tsae"), "--steps", "2", "--batch-size", "4",
                 "--expansion", "2", "--k", "2", "--no-progress"]) == 0
    assert main(["patch", "--model", "tiny-clip", "--sae", str(w / "tsae"), "--neurons", "1", "--out", str(w / "tedit")]) == 0
    # labels with blanks: two Male, two Female, two unlabelled
    (w / "blank").mkdir()
    blank = image_csv(w / "blank", [("a.png", "Male"), ("b.png", ""), ("c.png", "Female"), ("d.png", "Male"),
                                    ("e.png", " "), ("f.png", "Female")])
    for i, name in enumerate("abcdef"):  # distinct images, so that the fit has something to separate
        Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90 + 20 * (i % 2))).save(w / "blank" / f"{name}.png")
    assert main(["capture", "--model", "tiny-clip", "--site", "image.-1", "--images", str(blank), "--out", str(w / "capblank"),
                 "--no-progress"]) == 0
    return w



def copy_bundle(t: Path, ws: Path) -> Path:
    import shutil

    return Path(shutil.copytree(ws / "bundle", t / "bundle"))


def mismatched_bundle(t: Path, ws: Path) -> Path:
    """A bundle whose ONNX graph comes from a different edit (alpha 0.1), manifests rewritten to match:
    consistent files, wrong numbers -- only the numerical validation can catch it."""
    import shutil

    from debias_export.export import write_manifest

    b = copy_bundle(t, ws)
    export_onnx(_other_alpha(), t / "o2", towers=["image"])
    shutil.copyfile(t / "o2" / "vision_model.onnx", b / "onnx" / "vision_model.onnx")
    write_manifest(b / "onnx", kind="onnx")
    write_manifest(b, kind="bundle")
    return b


def recipe(t: Path, ws: Path, **sections: str) -> list[str]:
    """``run`` argv for a tiny recipe over the workspace images; ``sections`` replace/add YAML lines."""
    lines = {"name": "x", "model": "{spec: tiny-clip}", "site": "image.-1", "data": f"{{dir: {ws}, images: imgs/labels.csv}}",
             "sae": "{steps: 2, batch_size: 4, expansion: 2, k: 2}", "export": "{onnx: false}", "output": f"{{dir: {t / 'out'}}}"}
    lines.update(sections)
    (t / "r.yaml").write_text("".join(f"{k}: {v}\n" for k, v in lines.items() if v is not None))
    return ["run", str(t / "r.yaml"), "--no-progress"]


def _append(argv: list[str], path: Path, text: str) -> list[str]:
    path.write_text(path.read_text() + text)
    return argv


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def tampered_capture(t: Path, ws: Path) -> Path:
    import shutil

    cap = Path(shutil.copytree(ws / "cap", t / "cap"))
    tamper_file(cap / "shard-00000.safetensors")
    return cap


def patch_argv(ws: Path, *extra: str, sae: str = "sae") -> list[str]:
    return ["patch", "--model", "tiny-clip", "--sae", str(ws / sae), "--site", "image.-1", "--out", "e", *extra]


def probe_argv(ws: Path, *extra: str, sae: str = "sae") -> list[str]:
    return ["probe", "--capture", str(ws / "cap"), "--sae", str(ws / sae), "--out", "p.json", *extra]


def tamper_file(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return path


@dataclass
class CliCase:
    id: str
    argv: Callable[[Path, Path], list[str]]  # (tmp dir = cwd, shared workspace) -> argv
    words: tuple[str, ...]  # all must appear in the error line (case-insensitive)
    setup: Callable[[Any], None] | None = None  # gets pytest's monkeypatch (e.g. a writer that hits a full disk)


def unlink_manifests(bundle: Path, *parts: str) -> Path:
    """Delete the manifest of ``bundle`` (part ``""``) and/or of its ``hf`` / ``onnx`` parts; returns ``bundle``."""
    for part in parts:
        (bundle / part / "manifest.json").unlink()
    return bundle


def csv_with(t: Path, lines: str, header: str = "file,gender") -> str:
    """A labelled-image CSV with literal data ``lines`` next to real PNGs a.png, b.png."""
    image_csv(t)
    return write(t / "labels.csv", f"{header}\n{lines}")


def png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit grayscale PNG (PIL writes uint16 arrays as such; it opens as mode I;16)."""
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def float_tiff_csv(t: Path) -> str:
    image_csv(t)
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(t / "f.tiff")
    return write(t / "labels.csv", "file,gender\na.png,Male\nf.tiff,Female\n")


def full_disk(exc: BaseException) -> Callable[[Any], None]:
    """Setup: the safetensors writer of exports fails with ``exc`` (what a full file system raises)."""
    def setup(monkeypatch) -> None:
        from debias_export.export import safetensors_export

        monkeypatch.setattr(safetensors_export, "save_file", _fail_with(exc))
    return setup


ENOSPC_SAFETENSORS = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                     '"No space left on device" })')


T = lambda t: str(prompts(t))  # noqa: E731 - keeps the table readable
CLI_CASES = [
    # capture: sites, inputs, labels, outputs, model families
    CliCase("unknown-layer", lambda t, w: capture_argv(t, "--texts", T(t), site="text.9"), ("layer 9 out of range", "3 blocks")),
    CliCase("unknown-tower", lambda t, w: capture_argv(t, "--texts", T(t), site="audio.1"), ("no tower 'audio'",)),
    CliCase("bad-site-syntax", lambda t, w: capture_argv(t, "--texts", T(t), site="image"), ("bad site 'image'",)),
    CliCase("unknown-site-kind", lambda t, w: capture_argv(t, "--texts", T(t), site="text.1.resid_pre"), ("unknown site kind 'resid_pre'",)),
    CliCase("tower-vs-inputs", lambda t, w: capture_argv(t, "--texts", T(t), site="image.1"), ("image tower", "text inputs")),
    CliCase("missing-image-file", lambda t, w: capture_argv(t, "--images", str(image_csv(t, [("a.png", "Male"), ("missing.png", "Female")]))),
            ("image file not found", "missing.png")),
    CliCase("unreadable-image", lambda t, w: capture_argv(t, "--images", str(image_csv(t, broken="b.png")), site="image.1"),
            ("cannot read image", "b.png")),
    CliCase("label-column-absent", lambda t, w: capture_argv(t, "--images", str(image_csv(t)), "--columns", "race"),
            ("label column 'race'", "columns: file, gender")),
    CliCase("file-column-absent", lambda t, w: capture_argv(t, "--images", str(image_csv(t, header="path,gender"))), ("file column 'file'",)),
    CliCase("empty-group-after-filter", lambda t, w: capture_argv(t, "--images", str(image_csv(t)), "--where", "gender=Nonbinary",
                                                                  site="image.1"), ("no inputs",)),
    CliCase("filter-column-absent", lambda t, w: capture_argv(t, "--images", str(image_csv(t)), "--where", "race=White"),
            ("filter column 'race'",)),
    CliCase("bad-where-syntax", lambda t, w: capture_argv(t, "--images", str(image_csv(t)), "--where", "gender"), ("bad --where 'gender'",)),
    CliCase("csv-not-found", lambda t, w: capture_argv(t, "--images", str(t / "nope.csv")), ("csv file not found", "nope.csv")),
    CliCase("both-inputs", lambda t, w: capture_argv(t, "--images", "a.csv", "--texts", "b.txt"), ("exactly one of",)),
    CliCase("capture-output-exists", lambda t, w: [*capture_argv(existing_capture(t).parent, "--texts", T(t)), "--k", "3"],
            ("different settings", "--overwrite")),
    CliCase("capture-output-is-a-file", lambda t, w: (t / "o").write_text("x") and capture_argv(t, "--texts", T(t)),
            ("o", "--overwrite")),
    CliCase("model-family-unsupported", lambda t, w: capture_argv(t, "--texts", T(t), model=str(bert_dir(t))), ("'bert'", "not supported")),
    CliCase("model-not-found", lambda t, w: capture_argv(t, "--texts", T(t), model=str(t / "no-such-model")),
            ("unknown model spec", "no-such-model", "local directory not found", "hub access is off")),
    CliCase("model-spec-typo", lambda t, w: capture_argv(t, "--texts", T(t), model="tiny-clipp"),
            ("unknown model spec 'tiny-clipp'", "did you mean 'tiny-clip'?")),
    CliCase("non-utf8-prompts", lambda t, w: (t / "p.txt").write_bytes(b"\xff\xfe\x80 bad") and capture_argv(t, "--texts", str(t / "p.txt")),
            ("utf-8",)),
    CliCase("bad-option-type", lambda t, w: capture_argv(t, "--texts", T(t), "--k", "many"), ("'many'", "integer")),
    CliCase("zero-batch-size", lambda t, w: capture_argv(t, "--texts", T(t), "--batch-size", "0"), ("--batch-size", "x>=1")),
    # probe / train-sae
    CliCase("probe-label-column-absent", lambda t, w: probe_argv(w, "--column", "race"), ("no label column 'race'", "gender")),
    CliCase("probe-empty-group", lambda t, w: probe_argv(w, "--column", "gender", "--groups", "Male,Nonbinary"),
            ("'nonbinary' has no samples",)),
    CliCase("probe-sae-width", lambda t, w: probe_argv(w, "--column", "gender", sae="sae48"), ("width 48", "32")),
    CliCase("probe-not-a-capture", lambda t, w: ["probe", "--capture", str(w / "sae"), "--sae", str(w / "sae"), "--column", "gender",
                                                 "--out", "p.json"], ("not a capture directory",)),
    CliCase("train-sae-output-exists", lambda t, w: ["train-sae", "--activations", str(w / "cap"), "--out", str(w / "sae"), "--steps", "1"],
            ("already exists", "--overwrite")),
    CliCase("train-sae-tampered-capture", lambda t, w: ["train-sae", "--activations", str(tampered_capture(t, w)), "--out", "s",
                                                        "--steps", "1"], ("shard-00000.safetensors", "checksum")),
    # patch: SAE vs site, neurons, alpha, SAE files
    CliCase("patch-probe-report-no-groups", lambda t, w: patch_argv(w, "--probe-report", write(t / "r.json", "[1, 2]")), ("groups",)),
    CliCase("patch-probe-report-no-index", lambda t, w: patch_argv(w, "--probe-report", write(t / "r.json", '{"groups": {"Male": '
                                                                   '{"neurons": [{"idx": 3}]}}}')), ("r.json", "index")),
    CliCase("patch-probe-report-bad-neuron", lambda t, w: patch_argv(w, "--probe-report", write(t / "r.json", '{"groups": {"Male": '
                                                                     '{"neurons": ["x"]}}}')), ("r.json", "'x'")),
    CliCase("patch-sae-width", lambda t, w: patch_argv(w, "--neurons", "1", sae="sae48"), ("width 48", "width 32")),
    CliCase("patch-neuron-out-of-range", lambda t, w: patch_argv(w, "--neurons", "1,64"), ("[64] out of range", "64 latents")),
    CliCase("patch-neuron-duplicated", lambda t, w: patch_argv(w, "--neurons", "3,3"), ("duplicated", "[3]")),
    CliCase("patch-neurons-not-ints", lambda t, w: patch_argv(w, "--neurons", "3,x"), ("--neurons", "integers")),
    CliCase("patch-alpha", lambda t, w: patch_argv(w, "--neurons", "1", "--alpha", "1.5"), ("alpha", "[0, 1]")),
    CliCase("patch-sae-nan", lambda t, w: patch_argv(w, "--neurons", "1", sae="nan/sae"), ("W_dec", "NaN or Inf")),
    CliCase("patch-sae-truncated", lambda t, w: patch_argv(w, "--neurons", "1", sae="trunc/sae"), ("corrupt or truncated", "sae.safetensors")),
    CliCase("patch-sae-wrong-format", lambda t, w: patch_argv(w, "--neurons", "1", sae="notsae"), ("not a known SAE layout",)),
    CliCase("patch-sae-missing", lambda t, w: patch_argv(w, "--neurons", "1", sae="nowhere"), ("--sae", "does not exist")),
    CliCase("patch-site-layer", lambda t, w: [*patch_argv(w, "--neurons", "1"), "--site", "image.7"], ("layer 7 out of range",)),
    # export / verify / validate
    CliCase("export-eos-outside-vocab", lambda t, w: ["export", "--model", small_vocab_clip(t, eos=49407), "--edit", str(w / "tedit"),
                                                     "--out", "b", "--tower", "text", "--allow-mismatch"],
            ("eos_token_id 49407", "vocab_size 99")),
    CliCase("export-edit-nan", lambda t, w: ["export", "--model", "tiny-clip", "--edit", str(w / "nanedit" / "edit"), "--out", "b"], ("b_enc", "NaN")),
    CliCase("export-not-an-edit", lambda t, w: ["export", "--model", "tiny-clip", "--edit", str(w / "sae"), "--out", "b"],
            ("not an edit folder",)),
    CliCase("export-output-exists", lambda t, w: ["export", "--model", "tiny-clip", "--edit", str(w / "edit"), "--out", str(w)],
            ("already exists", "--overwrite")),
    CliCase("export-provenance-not-object", lambda t, w: ["export", "--model", "tiny-clip", "--edit", str(w / "edit"), "--out", "b",
                                                          "--provenance", write(t / "p.json", "[1]")], ("--provenance", "json object")),
    CliCase("export-bad-atol", lambda t, w: ["export", "--model", "tiny-clip", "--edit", str(w / "edit"), "--out", "b", "--atol", "-1"],
            ("atol",)),
    CliCase("verify-tampered", lambda t, w: ["verify", str(tamper_file(copy_bundle(t, w) / "hf" / "debias_patches.safetensors").parent)],
            ("debias_patches.safetensors", "sha-256")),
    CliCase("verify-smuggled-code", lambda t, w: ["verify", str(_smuggle(copy_bundle(t, w) / "hf"))], ("evil.py", "not listed")),
    CliCase("verify-no-manifest", lambda t, w: ["verify", str(w / "sae")], ("manifest.json",)),
    CliCase("validate-over-tolerance", lambda t, w: ["validate", str(mismatched_bundle(t, w)), "--seed", "0"],
            ("vision_model.onnx", "> atol 0.0001")),
    CliCase("validate-truncated-onnx", lambda t, w: ["validate", str(_truncate(copy_bundle(t, w) / "onnx" / "vision_model.onnx").parents[1])],
            ("vision_model.onnx", "truncated")),
    # recipes through ``run``
    CliCase("recipe-missing-key", lambda t, w: recipe(t, w, site=None), ("missing key 'site'",)),
    CliCase("recipe-extra-key", lambda t, w: recipe(t, w, edit="{alpha: 0.5, gamma: 2}"), ("unknown key 'edit.gamma'",)),
    CliCase("recipe-alpha", lambda t, w: recipe(t, w, edit="{alpha: 1.5}"), ("edit.alpha", "[0, 1]")),
    CliCase("recipe-output-exists", lambda t, w: (t / "out").mkdir() or recipe(t, w), ("already exists", "overwrite")),
    CliCase("recipe-model-family", lambda t, w: recipe(t, w, model=f"{{spec: {bert_dir(t)}}}"), ("'bert'", "not supported")),
    CliCase("recipe-tower-vs-data", lambda t, w: recipe(t, w, site="text.1"), ("text tower", "data.images")),
    CliCase("recipe-missing-images", lambda t, w: recipe(t, w, data=f"{{dir: {t}, images: nope.csv}}"), ("not found", "nope.csv")),
    CliCase("recipe-label-column", lambda t, w: recipe(t, w, probe="{column: hair}"), ("no label column 'hair'",)),
    CliCase("recipe-not-found", lambda t, w: ["run", str(t / "missing.yaml")], ("recipe not found",)),
    CliCase("recipe-not-utf8", lambda t, w: (t / "r.yaml").write_bytes(b"name: \x80\n") and ["run", str(t / "r.yaml")], ("r.yaml",)),
    CliCase("recipe-huge-number", lambda t, w: recipe(t, w, edit="{alpha: 1%s}" % ("0" * 400)), ("edit.alpha",)),
    CliCase("recipe-edit-kind", lambda t, w: recipe(t, w, edit="{kind: lasso}"), ("edit.kind", "sae or projection")),
    CliCase("recipe-fold-mode", lambda t, w: recipe(t, w, edit="{kind: projection, fold: all}"), ("edit.fold", "every_writer")),
    CliCase("recipe-fold-on-sae", lambda t, w: recipe(t, w, edit="{fold: site}"), ("edit.fold", "kind: projection")),
    CliCase("recipe-projection-amplify", lambda t, w: recipe(t, w, edit="{kind: projection, amplify: 0.5}"),
            ("edit.amplify", "fair_from")),
    CliCase("recipe-projection-keep-erased", lambda t, w: recipe(t, w, edit="{kind: projection, keep: [gender]}"),
            ("edit.keep", "probe.column")),
    CliCase("recipe-projection-keep-mean-diff", lambda t, w: recipe(t, w, edit="{kind: projection, method: mean_diff, keep: [age]}"),
            ("edit.keep", "leace")),
    CliCase("recipe-projection-keep-missing", lambda t, w: recipe(t, w, edit="{kind: projection, keep: [mood]}"),
            ("no label column 'mood'", "edit.keep")),
    CliCase("recipe-sae-keep", lambda t, w: recipe(t, w, edit="{keep: [age]}"), ("edit.keep", "kind: projection")),
    CliCase("recipe-fold-output-centered", lambda t, w: recipe(t, w, edit="{kind: projection, fold: output}"),
            ("visual_projection", "no bias", "center")),
    # project: fitting a projection edit from a capture
    CliCase("project-unknown-fold", lambda t, w: ["project", "--capture", str(w / "cap"), "--column", "gender", "--fold", "all",
                                                  "--out", "e"], ("--fold", "all")),
    CliCase("project-label-column", lambda t, w: ["project", "--capture", str(w / "cap"), "--column", "race", "--out", "e"],
            ("no label column 'race'",)),
    CliCase("project-fold-output-centered", lambda t, w: ["project", "--capture", str(w / "cap"), "--column", "gender", "--fold",
                                                          "output", "--model", "tiny-clip", "--out", "e"], ("no bias", "center")),
    CliCase("project-fold-site-on-block", lambda t, w: ["project", "--capture", str(w / "cap"), "--column", "gender", "--fold",
                                                        "site", "--out", "e"], ("fold=site", "attn_out/mlp_out")),
    CliCase("project-amplify-no-fair", lambda t, w: ["project", "--capture", str(w / "cap"), "--column", "gender", "--amplify",
                                                     "0.5", "--out", "e"], ("--amplify", "--fair-from")),
    CliCase("project-output-exists", lambda t, w: ["project", "--capture", str(w / "cap"), "--column", "gender", "--out", str(w)],
            ("already exists", "--overwrite")),
    # bench / eval / locate / bias-lab option checks
    CliCase("bench-no-model", lambda t, w: ["bench", "--out", "bb"], ("exactly one of --model, --arch or --export",)),
    CliCase("bench-unknown-runtime", lambda t, w: ["bench", "--model", "tiny-clip", "--random-sae", "reconstruct", "--runtimes",
                                                   "tensorflow", "--out", "bb"], ("unknown runtime", "tensorflow")),
    CliCase("bench-unknown-arch", lambda t, w: ["bench", "--arch", "clip-vit-huge", "--out", "bb"], ("'clip-vit-huge'",)),
    CliCase("eval-alphas-not-numbers", lambda t, w: ["eval", "--model", "tiny-clip", "--edit", str(w / "edit"), "--alphas", "a,b",
                                                     "--out", "ev"], ("--alphas", "numbers")),
    CliCase("locate-label-column", lambda t, w: ["locate", "--model", "tiny-clip", "--data", str(w / "imgs"), "--column", "race",
                                                 "--out", "lo"], ("label column 'race'",)),
    CliCase("locate-test-fraction", lambda t, w: ["locate", "--model", "tiny-clip", "--data", str(w / "imgs"), "--column", "gender",
                                                  "--test-fraction", "1.5", "--out", "lo"], ("--test-fraction", "(0, 1)")),
    CliCase("bias-lab-no-data", lambda t, w: ["bias-lab", "--data", str(t / "nope"), "--out", "bl"], ("nope", "does not exist")),
    # ----- issue 14: verification holes ------------------------------------------------------------------
    CliCase("verify-bundle-manifests-deleted", lambda t, w: ["verify", str(unlink_manifests(copy_bundle(t, w), "", "hf"))],
            ("bundle/manifest.json is missing",)),
    CliCase("validate-bundle-manifests-deleted", lambda t, w: ["validate", str(unlink_manifests(copy_bundle(t, w), "", "hf"))],
            ("bundle/manifest.json is missing",)),
    CliCase("verify-hf-manifest-deleted", lambda t, w: ["verify", str(unlink_manifests(copy_bundle(t, w), "hf") / "hf")],
            ("hf/manifest.json is missing",)),
    CliCase("verify-bundle-hf-manifest-deleted", lambda t, w: ["verify", str(unlink_manifests(copy_bundle(t, w), "hf"))],
            ("hf/manifest.json",)),  # still listed in the bundle's manifest
    CliCase("verify-onnx-manifest-deleted", lambda t, w: ["verify", str(unlink_manifests(copy_bundle(t, w), "onnx") / "onnx")],
            ("onnx/manifest.json is missing",)),
    # ----- issue 14: SAEs / edits used on another model, tower or site -----------------------------------
    CliCase("patch-sae-other-tower", lambda t, w: ["patch", "--model", "tiny-clip", "--sae", str(w / "tsae"), "--site", "text.-1",
                                                   "--neurons", "1", "--out", "e"],
            ("site image.2.resid_post vs text.2.resid_post", "--allow-mismatch")),
    CliCase("patch-sae-other-layer", lambda t, w: ["patch", "--model", "tiny-clip", "--sae", str(w / "tsae"), "--site", "image.1",
                                                   "--neurons", "1", "--out", "e"], ("image.2.resid_post vs image.1.resid_post",)),
    CliCase("patch-sae-other-family", lambda t, w: ["patch", "--model", "tiny-open-clip", "--sae", str(w / "tsae"), "--neurons", "1",
                                                    "--out", "e"], ("model family hf_clip vs open_clip", "--allow-mismatch")),
    CliCase("export-edit-other-family", lambda t, w: ["export", "--model", "tiny-open-clip", "--edit", str(w / "tedit"), "--out", "b",
                                                      "--tower", "image"], ("hf_clip vs open_clip",)),
    CliCase("eval-edit-other-family", lambda t, w: ["eval", "--model", "tiny-open-clip", "--edit", str(w / "tedit"), "--out", "ev"],
            ("hf_clip vs open_clip",)),
    CliCase("project-capture-other-family", lambda t, w: ["project", "--capture", str(w / "capblank"), "--column", "gender", "--model",
                                                          "tiny-open-clip", "--out", "e"], ("hf_clip vs open_clip",)),
    CliCase("recipe-sae-path-other-site", lambda t, w: recipe(t, w, site="image.1", sae=f"{{path: {w / 'tsae'}}}", edit="{neurons: [1]}"),
            ("sae.path", "image.2.resid_post vs image.1.resid_post")),
    # ----- issue 14: recipes, CSVs, images -----------------------------------------------------------------
    CliCase("recipe-duplicate-key", lambda t, w: _append(recipe(t, w), t / "r.yaml", "name: y\n"),
            ("r.yaml line 8", "duplicate key 'name'", "first at line 1")),
    CliCase("recipe-duplicate-nested-key", lambda t, w: recipe(t, w, edit="{alpha: 0.5, mode: residual, alpha: 0.9}"),
            ("line 8", "duplicate key 'edit.alpha'")),
    CliCase("csv-row-extra-field", lambda t, w: capture_argv(t, "--images", csv_with(t, "a.png,Male\nb.png,Female,extra\n"),
                                                             site="image.1"), ("labels.csv line 3", "3 field(s)", "header has 2")),
    CliCase("csv-row-missing-field", lambda t, w: capture_argv(t, "--images", csv_with(t, "a.png\nb.png,Female\n"), site="image.1"),
            ("labels.csv line 2", "1 field(s)")),
    CliCase("csv-duplicate-column", lambda t, w: capture_argv(t, "--images", csv_with(t, "a.png,Male,x\n", header="file,gender,gender"),
                                                              site="image.1"), ("'gender'", "repeated")),
    CliCase("probe-labels-ragged", lambda t, w: probe_argv(w, "--column", "gender", "--labels", write(
        t / "l.csv", "file,gender\n0.png,Female\n1.png,Male,Female\n2.png,Female\n3.png,Male\n")), ("l.csv line 3",)),
    CliCase("image-float-pixels", lambda t, w: capture_argv(t, "--images", float_tiff_csv(t), site="image.1"),
            ("cannot read image", "f.tiff", "no known range")),
    # ----- issue 14: options checked when parsed (a model that does not exist is never reached) ---------
    CliCase("train-sae-lr-nan", lambda t, w: ["train-sae", "--activations", "nowhere", "--out", "s", "--lr", "nan"], ("--lr", "finite")),
    CliCase("train-sae-lr-zero", lambda t, w: ["train-sae", "--activations", "nowhere", "--out", "s", "--lr", "0"], ("--lr", "> 0")),
    CliCase("train-sae-groups-nan", lambda t, w: ["train-sae", "--activations", "nowhere", "--out", "s", "--groups", "nan,0.5"],
            ("--groups", "nan")),
    CliCase("eval-limit-0", lambda t, w: ["eval", "--model", "no-such-model", "--limit", "0", "--out", "ev"], ("--limit", "x>=2")),
    CliCase("eval-k-0", lambda t, w: ["eval", "--model", "no-such-model", "--k", "0", "--out", "ev"], ("--k", "x>=1")),
    CliCase("eval-alphas-nan", lambda t, w: ["eval", "--model", "no-such-model", "--edit", "e", "--alphas", "nan,1", "--out", "ev"],
            ("--alphas", "finite", "nan")),
    CliCase("eval-k-above-limit", lambda t, w: ["eval", "--model", "tiny-clip", "--limit", "5", "--k", "50", "--out", "ev"],
            ("--k 50", "--limit 5")),
    CliCase("locate-batch-size-0", lambda t, w: ["locate", "--model", "no-such-model", "--data", "d", "--column", "gender",
                                                 "--batch-size", "0", "--out", "lo"], ("--batch-size", "x>=1")),
    CliCase("probe-tau-nan", lambda t, w: probe_argv(w, "--column", "gender", "--tau", "nan"), ("--tau", "finite")),
    CliCase("validate-atol-nan", lambda t, w: ["validate", str(w / "bundle"), "--atol", "nan"], ("--atol", "finite")),
    # ----- issue 14: a full disk during export: one line, the previous bundle stays (see also test_bad_inputs) --
    CliCase("export-disk-full-oserror", lambda t, w: ["export", "--model", "tiny-clip", "--edit", str(w / "edit"), "--out",
                                                      str(copy_bundle(t, w)), "--tower", "image", "--overwrite"],
            ("no space left on device while writing", "bundle; nothing was changed"), full_disk(OSError(28, "No space left on device"))),
    CliCase("export-disk-full-safetensors", lambda t, w: ["export", "--model", "tiny-clip", "--edit", str(w / "edit"), "--out", "b",
                                                          "--tower", "image"],
            ("no space left on device while writing b; nothing was changed",), full_disk(ENOSPC_SAFETENSORS)),
]


# ----- Python API cases ---------------------------------------------------------------------------------
def _sae_dir(tmp: Path, mutate: Callable[[dict], None] | None = None, cfg: Any = None) -> Path:
    d = random_sae(32, 64).save(tmp / "sae")
    if mutate is not None:
        tensors = load_file(str(d / "sae.safetensors"))
        mutate(tensors)
        save_file(tensors, str(d / "sae.safetensors"))
    if cfg is not None:
        (d / "cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return d


def _edit_dir(tmp: Path, mutate: Callable[[dict], None] | None = None, cfg_patch: dict | None = None) -> Path:
    d = SAEEdit(site="image.1", sae=random_sae(32, 64), neurons=[1, 2]).save(tmp / "edit")
    if mutate is not None:
        tensors = load_file(str(d / "edit.safetensors"))
        mutate(tensors)
        save_file(tensors, str(d / "edit.safetensors"))
    if cfg_patch is not None:
        cfg = json.loads((d / "edit_config.json").read_text())
        cfg.update(cfg_patch)
        (d / "edit_config.json").write_text(json.dumps(cfg))
    return d


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _nan(name: str):
    def mutate(t: dict) -> None:
        t[name] = t[name].clone()
        t[name].view(-1)[0] = float("nan")
    return mutate


def _apply(clip, **kw):
    return apply_edits(clip, SAEEdit(**{"site": "image.1", "sae": random_sae(32, 64), "neurons": [1], **kw}))


def _proj(clip, d: int = 32, scale: float = 1.0, **kw):
    """A projection (RES-FAIR) edit with orthonormal directions unless ``kw`` overrides them."""
    from debias_export.edits.projection import ProjectionEdit

    q = torch.linalg.qr(torch.randn(d, 2, generator=torch.Generator().manual_seed(0)))[0]
    args = {"in_dirs": q * scale, "out_dirs": q * scale, "mu": torch.zeros(d), **kw}
    handle = apply_edits(clip, ProjectionEdit(site="image.-1", **args))
    out = clip.embed("image", {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))})
    handle.remove()
    return out


def _patched(clip):
    _apply(clip, site="image.-1", neurons=[1, 2], alpha=0.8)
    return clip


def _smuggle(d: Path) -> Path:
    (d / "evil.py").write_text("import os\n")
    return d


def _rewrite(path: Path, text: str) -> Path:
    path.write_text(text)
    return path.parent


def _unlink(path: Path) -> Path:
    path.unlink()
    return path.parent


_load_sae = SparseAutoencoder.load
API_CASES: list[tuple[str, Callable[[Path, Any, Path], Any], type, tuple[str, ...]]] = [  # call(tmp, tiny clip, workspace)
    ("sae-width-vs-site", lambda t, c, w: _apply(c, sae=random_sae(48, 64)), ShapeError, ("width 48", "width 32")),
    ("site-layer-out-of-range", lambda t, c, w: _apply(c, site="text.5"), DebiasError, ("layer 5 out of range",)),
    ("site-unknown-tower", lambda t, c, w: _apply(c, site="audio.0"), DebiasError, ("no tower 'audio'",)),
    ("neuron-out-of-range", lambda t, c, w: _apply(c, neurons=[64]), ConfigError, ("neurons [64] out of range", "64 latents")),
    ("neuron-negative", lambda t, c, w: _apply(c, neurons=[-1]), ConfigError, ("out of range",)),
    ("neuron-duplicated", lambda t, c, w: _apply(c, neurons=[3, 3]), ConfigError, ("duplicated", "[3]")),
    ("neurons-empty", lambda t, c, w: _apply(c, neurons=[]), ConfigError, ("at least one neuron",)),
    ("alpha-above-1", lambda t, c, w: _apply(c, alpha=1.5), ConfigError, ("alpha", "[0, 1]", "1.5")),
    ("alpha-negative", lambda t, c, w: _apply(c, alpha=-0.1), ConfigError, ("alpha", "[0, 1]")),
    ("alpha-nan", lambda t, c, w: _apply(c, alpha=float("nan")), ConfigError, ("alpha", "nan")),
    ("value-inf", lambda t, c, w: _apply(c, value=float("inf")), ConfigError, ("value", "finite")),
    ("edit-mode-unknown", lambda t, c, w: _apply(c, mode="subtract"), ConfigError, ("mode 'subtract'",)),
    ("sae-nan-weights", lambda t, c, w: _load_sae(_sae_dir(t, _nan("W_enc"))), DebiasError, ("W_enc", "NaN or Inf")),
    ("sae-inf-bias", lambda t, c, w: _load_sae(_sae_dir(t, lambda x: x.update(b_dec=torch.full_like(x["b_dec"], float("inf"))))),
     DebiasError, ("b_dec", "NaN or Inf")),
    ("edit-nan-tensors", lambda t, c, w: load_edit(_edit_dir(t, _nan("sae.W_dec"))), DebiasError, ("W_dec", "NaN or Inf")),
    ("sae-truncated", lambda t, c, w: _load_sae(_truncate(_sae_dir(t) / "sae.safetensors").parent), IntegrityError,
     ("corrupt or truncated", "sae.safetensors")),
    ("sae-garbage-bytes", lambda t, c, w: (_sae_dir(t) / "sae.safetensors").write_bytes(b"\x00" * 64) and _load_sae(t / "sae"),
     IntegrityError, ("corrupt or truncated",)),
    ("edit-truncated", lambda t, c, w: load_edit(_truncate(_edit_dir(t) / "edit.safetensors", 0.9).parent), IntegrityError,
     ("corrupt or truncated", "edit.safetensors")),
    ("sae-wrong-shape", lambda t, c, w: _load_sae(_sae_dir(t, lambda x: x.update(W_enc=x["W_enc"].t().contiguous()))),
     ShapeError, ("W_enc", "(64, 32)", "expected (32, 64)")),
    ("sae-missing-tensor", lambda t, c, w: _load_sae(_sae_dir(t, lambda x: x.pop("W_dec"))), DebiasError, ("lack", "W_dec")),
    ("sae-cfg-wrong-format", lambda t, c, w: _load_sae(_sae_dir(t, cfg={"hidden": 32})), DebiasError, ("bad sae config", "cfg.json")),
    ("sae-cfg-not-json", lambda t, c, w: _load_sae(_sae_dir(t, cfg="{nope")), DebiasError, ("bad sae config",)),
    ("sae-cfg-width-mismatch", lambda t, c, w: _load_sae(_sae_dir(t, cfg={"d_in": 48, "num_latents": 64})), ShapeError,
     ("W_enc", "expected (48, 64)")),
    ("sae-cfg-bad-activation", lambda t, c, w: _load_sae(_sae_dir(t, cfg={"d_in": 32, "num_latents": 64, "activation": "gelu"})),
     DebiasError, ("activation 'gelu'",)),
    ("sae-not-a-folder", lambda t, c, w: _load_sae(t), DebiasError, ("not a debias-export sae folder",)),
    ("import-width-vs-site", lambda t, c, w: load_any(w / "sae48", d_in=32), ShapeError, ("width 48", "site width is 32")),
    ("edit-unknown-kind", lambda t, c, w: load_edit(_edit_dir(t, cfg_patch={"kind": "bogus"})), DebiasError, ("unknown edit kind 'bogus'",)),
    ("edit-bad-alpha-on-disk", lambda t, c, w: load_edit(_edit_dir(t, cfg_patch={"alpha": 7})), ConfigError, ("alpha", "[0, 1]")),
    ("edit-alpha-string-on-disk", lambda t, c, w: load_edit(_edit_dir(t, cfg_patch={"alpha": "x"})), ConfigError, ("alpha", "'x'")),
    ("edit-neurons-string-on-disk", lambda t, c, w: load_edit(_edit_dir(t, cfg_patch={"neurons": "x"})), ConfigError, ("neurons",)),
    ("edit-kind-not-string", lambda t, c, w: load_edit(_edit_dir(t, cfg_patch={"kind": []})), DebiasError, ("unknown edit kind",)),
    ("edit-config-not-object", lambda t, c, w: load_edit(_rewrite(_edit_dir(t) / "edit_config.json", "[1, 2]")), DebiasError,
     ("edit_config.json",)),
    ("edit-extra-key-on-disk", lambda t, c, w: load_edit(_edit_dir(t, cfg_patch={"gamma": 1})), ConfigError, ("gamma",)),
    ("projection-width-vs-site", lambda t, c, w: _proj(c, d=48), ShapeError, ("width 48", "width 32")),
    ("projection-nan-dirs", lambda t, c, w: _proj(c, in_dirs=torch.full((32, 2), float("nan"))), DebiasError, ("in_dirs", "NaN")),
    ("projection-rank-mismatch", lambda t, c, w: _proj(c, out_dirs=torch.ones(32, 1)), ShapeError, ("in_dirs", "out_dirs")),
    ("projection-fair-not-orthonormal", lambda t, c, w: _proj(c, fair=torch.ones(32, 2)), ConfigError, ("not orthonormal",)),
    ("projection-strength-inf", lambda t, c, w: _proj(c, strength=float("inf")), ConfigError, ("strength", "finite")),
    # directions that are not a projection (|A| ~ 1e60) overflow at run time: must be refused, not exported
    ("projection-overflowing-dirs", lambda t, c, w: _proj(c, scale=1e30), DebiasError, ("projection",)),
    ("model-family-unknown", lambda t, c, w: adapter_for(torch.nn.Linear(2, 2)), DebiasError, ("no model family handles linear",)),
    ("model-family-name-unknown", lambda t, c, w: load_adapter("x", family="mamba"), DebiasError, ("unknown model family 'mamba'",)),
    # exported artifacts
    ("load-tampered-patch-file", lambda t, c, w: load_patched(tamper_file(copy_bundle(t, w) / "hf" / "debias_patches.safetensors").parent),
     IntegrityError, ("debias_patches.safetensors", "sha-256")),
    ("load-truncated-weights", lambda t, c, w: load_patched(_truncate(copy_bundle(t, w) / "hf" / "model.safetensors", 0.7).parent),
     IntegrityError, ("model.safetensors", "truncated")),
    ("load-smuggled-python-file", lambda t, c, w: load_patched(_smuggle(copy_bundle(t, w) / "hf")), IntegrityError,
     ("evil.py", "not listed")),
    ("load-missing-manifest", lambda t, c, w: load_patched(_unlink(copy_bundle(t, w) / "hf" / "manifest.json")), DebiasError,
     ("manifest",)),
    ("export-unpatched", lambda t, c, w: export_onnx(c, t / "o"), DebiasError, ("no debias patch",)),
    ("export-opset-too-old", lambda t, c, w: export_onnx(_patched(c), t / "o", opset=9), ConfigError, ("opset 9",)),
    ("export-output-exists", lambda t, c, w: (t / "o").mkdir() or export_patched(_patched(c), t / "o"), DebiasError,
     ("already exists", "--overwrite")),
    # ----- issue 14 ------------------------------------------------------------------------------------------
    ("find-artifacts-bundle-without-manifest", lambda t, c, w: find_artifacts(unlink_manifests(copy_bundle(t, w), "")),
     IntegrityError, ("bundle/manifest.json is missing",)),
    ("recipe-duplicate-key", lambda t, c, w: load_recipe(write(t / "r.yaml", "name: x\nmodel: {spec: a, spec: b}\n")), ConfigError,
     ("line 2", "duplicate key 'model.spec'")),
    ("csv-ragged-row", lambda t, c, w: read_csv_table(write(t / "x.csv", "a,b\n1,2\n\n3,4,5\n")), DebiasError,
     ("x.csv line 4", "3 field(s)")),
    ("image-float-pixels", lambda t, c, w: to_rgb(Image.new("F", (4, 4)), "x.tiff"), DebiasError, ("x.tiff", "F", "no known range")),
    ("train-config-lr-nan", lambda t, c, w: TrainConfig(d_in=8, steps=1, lr=float("nan")), ConfigError, ("lr=nan",)),
    ("train-config-groups-nan", lambda t, c, w: TrainConfig(d_in=8, steps=1, group_fractions=[float("nan"), 0.5]), ConfigError,
     ("group_fractions",)),
    ("sae-other-tower", lambda t, c, w: _apply(c, site="text.-1", sae=_made_for(site="image.2.resid_post", tower="image")),
     ConfigError, ("the SAE", "site image.2.resid_post vs text.2.resid_post", "--allow-mismatch")),
    ("sae-other-family", lambda t, c, w: _apply(c, sae=_made_for(model_fingerprint={"family": "open_clip"})), ConfigError,
     ("model family open_clip vs hf_clip",)),
    ("sae-legacy-capture-family", lambda t, c, w: _apply(c, sae=_made_for(model={"family": "llava"}, site="image.1")), ConfigError,
     ("model family llava vs hf_clip",)),
    ("edit-other-architecture", lambda t, c, w: _apply(c, provenance={"model_fingerprint": {"family": "hf_clip", "arch": "0" * 16}}),
     ConfigError, ("the edit", "architecture fingerprint 0000000000000000 vs")),
    ("projection-other-family", lambda t, c, w: _proj(c, provenance={"model_fingerprint": {"family": "open_clip"}}), ConfigError,
     ("the projection edit", "open_clip vs hf_clip")),
    ("fold-other-family", lambda t, c, w: _fold(c, provenance={"model_fingerprint": {"family": "open_clip"}}), ConfigError,
     ("the projection edit", "open_clip vs hf_clip")),
]


def _made_for(**metadata: Any) -> SparseAutoencoder:
    sae = random_sae(32, 64)
    sae.cfg.metadata = dict(metadata)
    return sae


def _fold(clip, **kw):
    from debias_export.edits.projection import ProjectionEdit, fold_projection

    q = torch.linalg.qr(torch.randn(32, 2, generator=torch.Generator().manual_seed(0)))[0]
    fold_projection(clip, ProjectionEdit(site="image.-1", in_dirs=q, out_dirs=q, mu=torch.zeros(32), **kw), mode="every_writer").remove()


# ----- bad inputs handled correctly (not refused): each check runs the command and says what "correct" is -----
@dataclass
class HandledCase:
    id: str
    check: Callable[[Path, Path, Callable[[list[str]], tuple[int, str, str]]], None]  # (tmp = cwd, workspace, cli)


def _blank_labels_project(t: Path, w: Path, cli) -> None:
    code, out, err = cli(["project", "--capture", str(w / "capblank"), "--column", "gender", "--out", "e"])
    assert code == 0, err
    assert "2 row(s) with a blank 'gender' label skipped" in out and "on 4 inputs" in out
    cfg = json.loads((t / "e" / "edit_config.json").read_text())
    assert cfg["rank"] == 1 and cfg["provenance"]["unlabelled_skipped"] == 2  # two groups, not three (rank 2)


def _blank_labels_probe(t: Path, w: Path, cli) -> None:
    code, out, err = cli(["probe", "--capture", str(w / "capblank"), "--sae", str(w / "sae"), "--column", "gender", "--out", "p.json"])
    assert code == 0, err
    assert "skipped 2 input(s) with a blank 'gender' label" in out
    report = json.loads((t / "p.json").read_text())
    assert sorted(report["groups"]) == ["Female", "Male"] and report["num_unlabelled"] == 2


def _blank_labels_locate(t: Path, w: Path, cli) -> None:
    code, out, err = cli(["locate", "--model", "tiny-clip", "--data", str(w / "blank" / "labels.csv"), "--column", "gender",
                          "--prompts", str(prompts(t)), "--k", "2", "--no-pairs", "--no-attribution", "--out", "lo"])
    assert code == 0, err
    assert "skipped 2 image(s) with a blank gender label" in err
    report = json.loads((t / "lo" / "locate.json").read_text())
    assert report["unlabelled_skipped"] == 2 and report["num_images"] == 4 and sorted(report["group_sizes"]["gender"]) == ["Female", "Male"]


def _png16_capture(t: Path, w: Path, cli) -> None:
    from debias_export.data.datasets import LabelledImages

    values = np.random.default_rng(0).integers(0, 65536, (32, 32))
    png16(t / "deep.png", values)
    eight = np.rint(values / 257).astype(np.uint8)  # the same picture at 8 bits
    Image.fromarray(eight).convert("RGB").save(t / "flat.png")
    write(t / "labels.csv", "file,gender\ndeep.png,Male\nflat.png,Female\n")
    images = LabelledImages(t / "labels.csv")
    assert np.array_equal(np.asarray(images.load(0)), np.asarray(images.load(1)))  # integer pixels: exact
    assert (np.asarray(images.load(0)) == 255).mean() < 0.01  # convert("RGB") would saturate ~99.6% of them
    code, out, err = cli(capture_argv(t, "--images", str(t / "labels.csv"), site="image.1"))
    assert code == 0, err


def _allow_mismatch_warns(t: Path, w: Path, cli) -> None:
    code, out, err = cli(["patch", "--model", "tiny-clip", "--sae", str(w / "tsae"), "--site", "text.-1", "--neurons", "1",
                          "--out", "e", "--allow-mismatch"])
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "image.2.resid_post vs text.2.resid_post" in lines[0]
    assert (t / "e" / "edit.safetensors").is_file()


def small_vocab_clip(t: Path, eos: int) -> str:
    """A tiny CLIP saved to ``t/m`` whose 99-token text vocabulary keeps CLIP's default BOS 49406 (and ``eos``)."""
    from debias_export.adapters.hf_clip import HFCLIPAdapter
    from debias_export.adapters.transformers_compat import save_pretrained_portable
    from debias_export.workflow.testing import tiny_clip_config

    cfg = tiny_clip_config()
    cfg.text_config.vocab_size, cfg.text_config.eos_token_id = 99, eos
    save_pretrained_portable(HFCLIPAdapter.from_config(cfg, seed=0).model, t / "m")
    return str(t / "m")


def _bos_outside_vocab_exports(t: Path, w: Path, cli) -> None:
    """CLIP's default BOS id 49406 kept in a 99-token config: export and ONNX validation use in-vocabulary rows."""
    code, out, err = cli(["export", "--model", small_vocab_clip(t, eos=98), "--edit", str(w / "tedit"), "--out", "b",
                          "--tower", "text", "--allow-mismatch"])
    assert code == 0, err
    assert (t / "b" / "onnx" / "text_model.onnx").is_file()


def _matching_model_is_accepted(t: Path, w: Path, cli) -> None:
    """The recorded model and site match: nothing to warn about, the edit exports."""
    code, out, err = cli(["export", "--model", "tiny-clip", "--edit", str(w / "tedit"), "--out", "b", "--tower", "image", "--no-onnx"])
    assert code == 0 and not err.strip(), err


HANDLED_CASES = [
    HandledCase("project-blank-labels-skipped", _blank_labels_project),
    HandledCase("probe-blank-labels-skipped", _blank_labels_probe),
    HandledCase("locate-blank-labels-skipped", _blank_labels_locate),
    HandledCase("png-16-bit-scaled-not-clipped", _png16_capture),
    HandledCase("patch-allow-mismatch-warns", _allow_mismatch_warns),
    HandledCase("export-matching-edit-accepted", _matching_model_is_accepted),
    HandledCase("export-bos-outside-vocab", _bos_outside_vocab_exports),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fail_with(exc: BaseException):
    def boom(*a, **k):
        raise exc
    return boom


def _other_alpha():
    other = tiny_clip(seed=0)
    _apply(other, site="image.-1", neurons=[1, 2], alpha=0.1)
    return other
