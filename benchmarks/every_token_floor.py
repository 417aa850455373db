"""Every-token reconstruct: FLOPs floor and how far the two SAE edit modes' outputs are apart (issue #18).

ViT-B/16 image tower (random weights), SAE with F = 8d = 6144 latents, 96 zeroed, edit at block 5 on all 197
tokens. Counts FLOPs of the image embedding with torch's FlopCounterMode (unmodified, reconstruct, residual),
the analytic floor of an exact reconstruct (dense encode + decode = 2*d*F MACs per token; encode alone d*F), and
the distance between the two modes' embeddings (and each from the unmodified one) on 8 random images.

Run: ``PYTHONPATH=. nice python benchmarks/every_token_floor.py`` -> benchmarks/results/precision-vit-b16/every_token_floor.json
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from debias_export import SAEEdit, apply_edits
from debias_export.adapters.real_configs import random_clip
from debias_export.bench.flops import torch_flops
from debias_export.workflow.testing import random_sae

OUT = Path("benchmarks/results/precision-vit-b16/every_token_floor.json")


def cos(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()


def main() -> None:
    torch.set_num_threads(1)
    adapter = random_clip("clip-vit-base-patch16")
    cfg = adapter.model.config.vision_config
    d, layers, T = cfg.hidden_size, cfg.num_hidden_layers, (cfg.image_size // cfg.patch_size) ** 2 + 1
    F = 8 * d
    sae = random_sae(d, F, seed=1, threshold=0.2)
    x1 = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    x8 = torch.randn(8, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    embed = lambda x: adapter.embed("image", {"pixel_values": x})  # noqa: E731
    res: dict = {"model": "arch:clip-vit-base-patch16 (random weights)", "d": d, "layers": layers, "tokens": T,
                 "latents": F, "neurons": 96, "site": "image.5"}
    with torch.no_grad():
        res["flops"] = {"unmodified": torch_flops(lambda: embed(x1))}
        base = embed(x8)
        outs = {}
        for mode in ("reconstruct", "residual"):
            handle = apply_edits(adapter, SAEEdit(site="image.5", sae=sae, neurons=list(range(0, F, 64)), alpha=1.0, mode=mode))
            res["flops"][mode] = torch_flops(lambda: embed(x1))
            outs[mode] = embed(x8)
            handle.remove()
        h = {}
        hook = adapter.model.vision_model.encoder.layers[5].register_forward_hook(lambda m, a, o: h.setdefault("h", o[0] if isinstance(o, tuple) else o))
        embed(x8)
        hook.remove()
        # active latents per token at the site: what a sparse decode would have to gather
        active = (sae.encode(h["h"].reshape(-1, d)) > 0).float().sum(-1)
    f = res["flops"]
    res["flops_ratio"] = {m: f[m] / f["unmodified"] for m in ("reconstruct", "residual")}
    # analytic (MACs x 2 = FLOPs): exact reconstruct needs every pre-activation (the whole encode) to know the
    # active set; a dense decode doubles it; a sparse decode costs L0 * d per token instead
    res["floor"] = {"encode_only_ratio": 1 + 2 * T * d * F / f["unmodified"],
                    "dense_encode_decode_ratio": 1 + 4 * T * d * F / f["unmodified"],
                    "active_latents_per_token_mean": float(active.mean()),
                    "sparse_decode_ratio": 1 + (2 * T * d * F + 2 * T * d * float(active.mean())) / f["unmodified"]}
    res["outputs"] = {"cos_reconstruct_vs_residual": cos(outs["reconstruct"], outs["residual"]),
                      "cos_reconstruct_vs_unmodified": cos(outs["reconstruct"], base),
                      "cos_residual_vs_unmodified": cos(outs["residual"], base)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "outputs"}, indent=2))
    print({k: [round(min(v), 4), round(sum(v) / len(v), 4)] for k, v in res["outputs"].items()})


if __name__ == "__main__":
    main()
