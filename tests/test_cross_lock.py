"""An export made under this lock loads under the other lock (transformers 4.57 <-> 5.x) with identical outputs.

Needs the other lock's python in ``DEBIAS_EXPORT_OTHER_PYTHON`` (``.ci/run`` sets it; both venvs install
this checkout). Every family, through ``load_patched`` and (HF families) ``trust_remote_code``; LLaVA also
generates, with its ``lm_head`` loaded, and differently from the unedited model.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from debias_export import ProjectionEdit, SAEEdit, apply_edits
from debias_export.workflow.model_specs import load_model_spec
from debias_export.edits.install import install_edits
from debias_export.export import export_bundle
from debias_export.workflow.testing import random_sae

OTHER = os.environ.get("DEBIAS_EXPORT_OTHER_PYTHON")
pytestmark = pytest.mark.skipif(not OTHER, reason="set DEBIAS_EXPORT_OTHER_PYTHON to the other lock's python "
                                                   "(.ci/run does) to test cross-lock loading")
CHECK = Path(__file__).with_name("crosslock_check.py")
IMAGE_TOKEN, N_IMAGE_TOKENS = 159, 16


def _inputs(adapter):
    g = torch.Generator().manual_seed(7)
    size = 32
    out = {"image": {"pixel_values": torch.randn(3, 3, size, size, generator=g)}}
    if "text" in adapter.towers():
        out["text"] = dict(adapter.prepare_texts(["a photo of a nurse", "an engineer at work", "a person"]))
    return out


def _folded_leace(adapter):
    """A LEACE-style projection folded into every writer: the export is a stock checkpoint."""
    g = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(32, 1, generator=g), dim=0)
    edit = ProjectionEdit(site="image.-1", in_dirs=u, out_dirs=u, mu=torch.zeros(32), fold="every_writer")
    return install_edits(adapter, edit)


CASES = {
    "hf_clip-sae": ("tiny-clip", ["image.-1", "text.-1"]),
    "hf_clip-folded": ("tiny-clip", None),
    "dual_encoder-sae": ("tiny-dual-encoder", ["image.1", "text.-1"]),
    "open_clip-sae": ("tiny-open-clip", ["image.-1", "text.1"]),
    "llava-sae": ("tiny-llava", ["image.-2"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_on_the_other_lock(tmp_path, case):
    spec, sites = CASES[case]
    adapter = load_model_spec(spec)
    inputs = _inputs(adapter)
    if adapter.family == "llava":
        inputs = {"image": inputs["image"]}
    folds = None
    with torch.no_grad():
        base = {t: adapter.embed(t, x) for t, x in inputs.items()}
    if sites is None:
        installed = _folded_leace(adapter)
        folds = installed.fold_records()
    else:
        apply_edits(adapter, [SAEEdit(site=s, sae=random_sae(adapter.width(s.split(".")[0]), 96, seed=i), neurons=[1, 5, 9],
                                      alpha=0.7, value=-0.2) for i, s in enumerate(sites)])
    with torch.no_grad():
        want = {t: adapter.embed(t, x) for t, x in inputs.items()}
    assert max(float((want[t] - base[t]).abs().max()) for t in want) > 1e-3  # the edit changes the outputs
    export_bundle(adapter, tmp_path / "exp", onnx=False, folds=folds)
    tensors = {f"in.{t}.{k}": v.contiguous() for t, x in inputs.items() for k, v in x.items()}
    tensors.update({f"out.{t}": v.contiguous() for t, v in want.items()})
    meta = {"family": adapter.family}
    gen = None
    if adapter.family == "llava":
        ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * N_IMAGE_TOKENS + [7, 8]])
        tensors["gen.input_ids"] = ids
        with torch.no_grad():
            gen = adapter.model.generate(input_ids=ids, pixel_values=inputs["image"]["pixel_values"][:1], max_new_tokens=6,
                                         do_sample=False)[0].tolist()
        lm_head = float(adapter.model.lm_head.weight.sum())
    save_file(tensors, str(tmp_path / "case.safetensors"), metadata=meta)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([OTHER, str(CHECK), str(tmp_path / "exp"), str(tmp_path / "case.safetensors"),
                           str(tmp_path / "report.json")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["transformers"].split(".")[0] != transformers.__version__.split(".")[0]  # really the other major
    row = {"artifact": case, "produced_on": transformers.__version__, "loaded_on": report["transformers"], **report["paths"]}
    _record(row)
    # same weights, same graph: equal up to float rounding of two transformers versions' CLIP/BERT code
    for path, max_diff in report["paths"].items():
        assert max_diff <= 1e-5, (path, max_diff)
    if adapter.family == "llava":
        for path in ("load_patched", "trust_remote_code"):
            assert report["lm_head_sum"][path] == pytest.approx(lm_head, abs=1e-4)  # lm_head loaded, not random
            assert report["generation"][path] == gen
        assert report["generation"]["unedited"] != gen  # the edit reaches generation


def _record(row):
    """Append the row to $DEBIAS_EXPORT_CROSSLOCK_REPORT (JSON lines) when set: the README's cross-lock table."""
    path = os.environ.get("DEBIAS_EXPORT_CROSSLOCK_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), file=sys.stderr)
