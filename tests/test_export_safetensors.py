"""HF safetensors export: bit-identical reloads (load_patched and remote code), base weights untouched, atomicity."""
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from debias_export import DebiasError, SAEEdit, apply_edits
from debias_export.export import export_patched, load_patched, verify_manifest
from debias_export.export import safetensors_export
from debias_export.workflow.testing import random_sae, tiny_clip

# (sites, mode): pruned last blocks (static CLS / dynamic EOS positions) and all-token mid blocks
CASES = [
    (("image.-1", "text.-1"), "reconstruct"),
    (("image.-1", "text.-1"), "residual"),
    (("image.1", "text.0"), "reconstruct"),
    (("image.1.mlp_out", "text.1"), "residual"),
]


def make_edits(sites, mode):
    edits = []
    for i, site in enumerate(sites):
        sae = random_sae(32, 96, seed=i, activation="topk" if i else "threshold")
        sae.cfg.metadata = {"site": site, "trained_on": "unit-test", "seed": i}
        edits.append(SAEEdit(site=site, sae=sae, neurons=[1, 5, 40], value=-0.2, alpha=0.7, mode=mode,
                             model="tiny-clip", provenance={"recipe": "unit"}))
    return edits


def outputs(adapter, inputs):
    with torch.no_grad():
        return {t: adapter.embed(t, inputs[t]) for t in adapter.towers()}


@pytest.mark.parametrize("sites,mode", CASES)
def test_load_patched_is_bit_identical(tmp_path, clip, clip_inputs, sites, mode):
    base = outputs(clip, clip_inputs)
    apply_edits(clip, make_edits(sites, mode))
    want = outputs(clip, clip_inputs)
    export_patched(clip, tmp_path / "hf", provenance={"seed": 3})
    assert torch.equal(outputs(clip, clip_inputs)["image"], want["image"])  # export left the live patch intact
    loaded = load_patched(tmp_path / "hf")
    got = outputs(loaded, clip_inputs)
    for tower in ("image", "text"):
        assert torch.equal(got[tower], want[tower]), tower
        assert (got[tower] - base[tower]).abs().max() > 1e-3, tower  # the reloaded model really is edited
    assert not loaded.model.training


def test_base_weights_are_byte_identical_to_save_pretrained(tmp_path, clip):
    apply_edits(clip, make_edits(("image.-1", "text.1"), "reconstruct"))
    export_patched(clip, tmp_path / "hf")
    plain = tiny_clip(seed=0)  # same seed as the ``clip`` fixture: the same original weights
    plain.model.save_pretrained(tmp_path / "plain", safe_serialization=True)
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert not any("debias_edit" in k or "edits" in k for k in load_file(tmp_path / "hf" / "model.safetensors"))
    patches = load_file(tmp_path / "hf" / "debias_patches.safetensors")
    assert patches and all(k.startswith("debias_patches.") for k in patches)


def test_config_and_manifest_record_the_edit(tmp_path, clip):
    apply_edits(clip, make_edits(("image.-1",), "residual"))
    export_patched(clip, tmp_path / "hf", provenance={"recipe": "r.yaml", "seed": 11})
    hf = tmp_path / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "modeling_debias.DebiasCLIPModel"}
    assert config["model_type"] == "clip" and config["debias"]["edits"][0]["neurons"] == [1, 5, 40]
    manifest = verify_manifest(hf)
    for name in ("model.safetensors", "debias_patches.safetensors", "debias_config.json", "config.json",
                 "modeling_debias.py", "debias_runtime.py"):
        assert len(manifest["files"][name]["sha256"]) == 64 and manifest["files"][name]["size"] > 0
    assert {"torch", "transformers", "debias-export", "safetensors"} <= set(manifest["versions"])
    prov = manifest["provenance"]
    assert prov["source_model"] == "config" and prov["recipe"] == "r.yaml" and prov["seed"] == 11
    assert prov["edits"][0]["sae_metadata"]["trained_on"] == "unit-test"
    import debias_export.runtime as runtime

    assert (hf / "debias_runtime.py").read_bytes() == open(runtime.__file__, "rb").read()  # verbatim copy


REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["debias_export"] = None  # any import of debias_export now fails
    import torch
    torch.set_num_threads(int(sys.argv[3]))
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    inp = load_file(sys.argv[2])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inp["pixel_values"])
        txt = model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))  # transformers 5 returns output objects
    assert "debias_export" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
    save_file({"image": img.contiguous(), "text": txt.contiguous()}, sys.argv[2] + ".out")
    print(type(model).__name__, type(model).__mro__[2].__name__)
""")


def test_remote_code_loads_without_debias_export(tmp_path, clip, clip_inputs):
    apply_edits(clip, make_edits(("image.-1", "text.-1"), "reconstruct") + make_edits(("image.1",), "residual")[:1])
    want = outputs(clip, clip_inputs)
    export_patched(clip, tmp_path / "hf")
    inp = {"pixel_values": clip_inputs["image"]["pixel_values"], **clip_inputs["text"]}
    save_file({k: v.contiguous() for k, v in inp.items()}, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, str(tmp_path / "remote.py"), str(tmp_path / "hf"),
                           str(tmp_path / "inputs.safetensors"), str(torch.get_num_threads())],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[:2] == ["DebiasCLIPModel", "CLIPModel"]
    got = load_file(str(tmp_path / "inputs.safetensors.out"))
    assert torch.equal(got["image"], want["image"]) and torch.equal(got["text"], want["text"])


def test_unpatched_model_is_an_error(tmp_path, clip):
    with pytest.raises(DebiasError, match="no debias patch"):
        export_patched(clip, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_refuses_existing_output(tmp_path, clip):
    apply_edits(clip, make_edits(("image.-1",), "reconstruct"))
    (tmp_path / "hf").mkdir()
    with pytest.raises(DebiasError, match="already exists"):
        export_patched(clip, tmp_path / "hf")
    export_patched(clip, tmp_path / "hf", overwrite=True)
    verify_manifest(tmp_path / "hf")


def test_disk_full_leaves_previous_artifact_intact(tmp_path, clip, monkeypatch):
    apply_edits(clip, make_edits(("text.-1",), "reconstruct"))
    out = export_patched(clip, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_export, "save_file", full)
    with pytest.raises(DebiasError, match=f"no space left on device while writing {out}; nothing was changed"):
        export_patched(clip, out, overwrite=True)
    with pytest.raises(DebiasError, match="no space left on device while writing .*fresh; nothing was changed"):
        export_patched(clip, tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp or partial directories
    verify_manifest(out)


def test_export_of_a_loaded_export_is_refused_cleanly(tmp_path, clip):
    apply_edits(clip, make_edits(("image.-1",), "reconstruct"))
    loaded = load_patched(export_patched(clip, tmp_path / "hf"))
    # load_patched installs the runtime patch but no PatchHandle (edit configs are not in the export)
    with pytest.raises(DebiasError, match="no debias patch"):
        export_patched(loaded, tmp_path / "again")
