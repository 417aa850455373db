"""Layouts of the public vision SAEs users bring.

- **sae-for-vlm** (ExplainableML; the CLIP ViT-L/14-336 and SigLIP SAEs DeBiasLens uses) ships its own fork of
  dictionary_learning. Its ``trainSAE`` needs wandb (it logs validation to a wandb queue unconditionally), so
  the fork's own trainer classes are stepped here with their ``update`` and the result saved exactly as the
  fork's ``trainSAE`` saves it: ``trainer_0/config.json`` = ``{"trainer": trainer.config}`` and
  ``trainer_0/ae.pt`` = ``torch.save({k: v.cpu() for k, v in ae.state_dict().items()})``. Reference: the
  fork's ``MatroyshkaBatchTopKSAE.from_pretrained`` / ``JumpReluAutoEncoder.from_pretrained`` encode/forward.
- **Prisma** (vit-prisma): the PyPI release (0.1.4) predates its SAE module, so its GitHub source is put on
  ``PYTHONPATH``; SAEs are built with its own ``StandardSparseAutoencoder`` / ``GatedSparseAutoencoder`` and
  written with its own ``VisionModelSAERunnerConfig.save_config`` + ``SparseAutoencoder.save_model``
  (``{"cfg": <config object>, "state_dict": ...}`` pickled by ``torch.save``), plus the
  ``*_log_feature_sparsity.pt`` side file its trainer writes. Reference: its own ``encode`` / ``decode``.

Run with both sources importable, e.g. ``PYTHONPATH=<sae-for-vlm>:<ViT-Prisma>/src python ... vlm``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .common import N_INPUTS, inputs, randomize, thresholds, write_case


def _sae_for_vlm(root: Path, tmp: Path) -> None:
    from dictionary_learning.dictionary import JumpReluAutoEncoder
    from dictionary_learning.trainers import JumpReluTrainer
    from dictionary_learning.trainers.matroyshka_batch_top_k import MatroyshkaBatchTopKSAE, MatroyshkaBatchTopKTrainer

    d, F = 32, 64
    g = torch.Generator().manual_seed(7)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    for name, make, load in (
            ("matryoshka", lambda: MatroyshkaBatchTopKTrainer(steps=40, activation_dim=d, dict_size=F, k=8, layer=22,
                                                               lm_name="clip-vit-large-patch14-336",
                                                               group_fractions=[0.0625, 0.125, 0.25, 0.5625],
                                                               warmup_steps=2, threshold_start_step=5, seed=3,
                                                               device="cpu"),
             MatroyshkaBatchTopKSAE.from_pretrained),
            ("jumprelu", lambda: JumpReluTrainer(steps=40, activation_dim=d, dict_size=F, layer=22,
                                                  lm_name="clip-vit-large-patch14-336", warmup_steps=2,
                                                  sparsity_warmup_steps=2, lr=1e-2, seed=4, device="cpu"),
             JumpReluAutoEncoder.from_pretrained)):
        torch.manual_seed(11)
        trainer = make()
        for step in range(40):
            trainer.update(step, (torch.randn(N_INPUTS, d, generator=g) @ mix * 2 + 0.5).float())
        out = tmp / f"vlm_{name}" / "trainer_0"
        out.mkdir(parents=True)
        cfg = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in trainer.config.items()}
        (out / "config.json").write_text(json.dumps({"trainer": cfg}, indent=4))
        torch.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, out / "ae.pt")
        ae = load(str(out / "ae.pt"))
        x = inputs(d, 500) * 2
        with torch.no_grad():
            lat, rec = ae.encode(x), ae(x)
        write_case(root, f"saeforvlm_{name}", library="sae-for-vlm (dictionary_learning fork)", version="69e211d",
                   built=f"fork's {type(trainer).__name__} stepped 40x, saved as its trainSAE saves",
                   x=x, latents=lat, recon=rec, expect="exact", files_from=out.parent,
                   notes=f"trainSAE save_dir layout: the SAE sits in trainer_0/; reference {type(ae).__name__}"
                         ".from_pretrained")


def _prisma(root: Path, tmp: Path) -> None:
    from vit_prisma.sae.config import VisionModelSAERunnerConfig
    from vit_prisma.sae.sae import GatedSparseAutoencoder, StandardSparseAutoencoder

    d = 32
    rules = {"r_mag": lambda s, g: torch.randn(s, generator=g) * 0.3}
    for name, cls, over, expect in (
            ("standard", StandardSparseAutoencoder, dict(activation_fn_str="relu", normalize_activations="none"), "exact"),
            ("topk", StandardSparseAutoencoder, dict(activation_fn_str="topk", activation_fn_kwargs={"k": 6},
                                                     normalize_activations="none"), "exact"),
            ("gated", GatedSparseAutoencoder, dict(architecture="gated", activation_fn_str="relu",
                                                   normalize_activations="none"), "exact"),
            ("layer_norm", StandardSparseAutoencoder, dict(activation_fn_str="relu"), {"refuse": "layer_norm"})):
        out = tmp / f"prisma_{name}"
        cfg = VisionModelSAERunnerConfig(d_in=d, expansion_factor=2, _device="cpu", log_to_wandb=False,
                                         checkpoint_path=str(out), **over)
        sae = cls(cfg)
        randomize(sae, 600 + len(name), {**rules, "threshold": thresholds})
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_config(str(out / "config.json"))
        sae.save_model(str(out / "n_images_1040.pt"))
        torch.save(torch.zeros(cfg.d_sae), out / "n_images_1040_log_feature_sparsity.pt")
        x = inputs(d, 700)
        with torch.no_grad():
            _, lat = sae.encode(x)
            rec = sae.decode(lat)
        write_case(root, f"prisma_{name}", library="vit-prisma (GitHub source)", version="aa5ff6a",
                   built=f"{cls.__name__}.save_model + VisionModelSAERunnerConfig.save_config", x=x, latents=lat,
                   recon=rec, expect=expect, files_from=out, topk=name == "topk",
                   notes=f"cfg.normalize_activations={cfg.normalize_activations!r}; n_images_1040.pt holds the pickled "
                         "config object and the state_dict")


def build(root: Path) -> None:
    tmp = Path(tempfile.mkdtemp())
    _sae_for_vlm(root, tmp)
    _prisma(root, tmp)
