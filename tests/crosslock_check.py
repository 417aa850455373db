"""Load an export made under one lock from the OTHER lock's python and report its outputs.

Run by tests/test_cross_lock.py as ``OTHER_PYTHON tests/crosslock_check.py EXPORT_DIR CASE.safetensors OUT.json``.
``CASE.safetensors`` holds the inputs (``in.<tower>.<name>``) and the producing lock's outputs
(``out.<tower>``); metadata ``family`` and, for LLaVA, ``gen`` (the producing lock's greedy tokens).
Writes, per loading path, the max |diff| against the producer's outputs; for LLaVA also whether
``lm_head`` loaded (checksum), and the greedy generation of the patched and of the unedited model.
"""
import json
import sys
import warnings
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

warnings.simplefilter("ignore")
transformers.logging.set_verbosity_error()


def read_case(path):
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    inputs, outputs = {}, {}
    for key, value in tensors.items():
        kind, tower, *rest = key.split(".")
        if kind == "in":
            inputs.setdefault(tower, {})[rest[0]] = value
        elif kind == "out":
            outputs[tower] = value
    return meta, inputs, outputs, tensors


def diff(a, b):
    a, b = a.float(), b.float()
    return float("inf") if a.shape != b.shape else float((a - b).abs().max())


def remote_outputs(hf_dir, family, inputs):
    """``trust_remote_code`` load (no debias_export involved) -> one output per tower."""
    from transformers import AutoModel, AutoModelForImageTextToText

    from debias_export.adapters.transformers_compat import pooled

    klass = AutoModelForImageTextToText if family == "llava" else AutoModel
    model = klass.from_pretrained(hf_dir, trust_remote_code=True).eval()
    out = {}
    with torch.no_grad():
        for tower, x in inputs.items():
            if family == "llava":
                feats = model.get_image_features(pixel_values=x["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
                                                 vision_feature_select_strategy=model.config.vision_feature_select_strategy)
                feats = getattr(feats, "pooler_output", feats)
                out[tower] = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
            elif tower == "image":
                out[tower] = pooled(model.get_image_features(pixel_values=x["pixel_values"]))
            else:
                out[tower] = pooled(model.get_text_features(**x))
    return model, out


def main(export_dir, case_file, out_file):
    from debias_export.export import load_patched

    meta, inputs, want, tensors = read_case(case_file)
    family = meta["family"]
    report = {"transformers": transformers.__version__, "family": family, "paths": {}}
    adapter = load_patched(export_dir)
    with torch.no_grad():
        got = {t: adapter.embed(t, x) for t, x in inputs.items()}
    report["paths"]["load_patched"] = max(diff(got[t], want[t]) for t in want)
    hf_dir = Path(export_dir) / "hf" if (Path(export_dir) / "hf").is_dir() else Path(export_dir)
    remote = None
    if family != "open_clip":  # open_clip exports are open_clip's own layout: no transformers remote code
        remote, rout = remote_outputs(hf_dir, family, inputs)
        report["paths"]["trust_remote_code"] = max(diff(rout[t], want[t]) for t in want)
    if family == "llava":
        from transformers import LlavaForConditionalGeneration

        ids = tensors["gen.input_ids"]
        px = inputs["image"]["pixel_values"][:1]
        base = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()  # stock class: the unedited model
        with torch.no_grad():
            gens = {name: m.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False)[0].tolist()
                    for name, m in (("load_patched", adapter.model), ("trust_remote_code", remote), ("unedited", base))}
        report["generation"] = gens
        report["lm_head_sum"] = {"load_patched": float(adapter.model.lm_head.weight.sum()),
                                 "trust_remote_code": float(remote.lm_head.weight.sum())}
    Path(out_file).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
