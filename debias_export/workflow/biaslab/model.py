"""Build the lab's dual encoder and move its trained parts in and out of a portable safetensors file.

Only the trained parts are stored (the CLIP vision transformer, both projections, the logit scale); the
text tower is always the packaged MiniLM. Vision keys are stored relative to the vision transformer
(``vision.embeddings...``, ``vision.encoder.layers.0...``, ``vision.post_layernorm...``) because
transformers 4.x nests it at ``model.vision_model.vision_model`` while 5.x puts its modules directly on
``model.vision_model``; :func:`vision_transformer` finds whichever module holds them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)

from ...adapters.dual_encoder import minilm_path
from ...core.errors import DebiasError, IntegrityError
from .settings import BiasLabSettings

VISION_PREFIX = "vision."
HEAD_KEYS = ("visual_projection.weight", "text_projection.weight", "logit_scale")


def vision_config(settings: BiasLabSettings):
    cfg = CLIPVisionConfig(hidden_size=settings.width, intermediate_size=settings.mlp, num_hidden_layers=settings.layers,
                           num_attention_heads=settings.heads, image_size=settings.image_size,
                           patch_size=settings.patch_size, projection_dim=settings.projection_dim)
    cfg._attn_implementation = "eager"
    return cfg


def build_model(settings: BiasLabSettings, init: bool = True):
    """Dual encoder: small CLIP ViT (random, seeded; mimetic init if the recipe says so) + the real frozen MiniLM.

    ``init=False`` skips the seeded initialisation (the weights are about to be loaded).
    """
    torch.manual_seed(settings.seed)
    vcfg = vision_config(settings)
    text = BertModel.from_pretrained(minilm_path(), attn_implementation="eager")
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(vcfg, text.config, projection_dim=settings.projection_dim,
                                                             logit_scale_init_value=settings.logit_scale_init)
    model = VisionTextDualEncoderModel(config=cfg, vision_model=CLIPVisionModel(vcfg), text_model=text)
    if init and settings.init == "mimetic":
        mimetic_init(vision_transformer(model), settings.heads, torch.Generator().manual_seed(settings.seed))
    return model


def vision_transformer(model: nn.Module) -> nn.Module:
    """The module that holds ``embeddings`` / ``encoder`` / ``post_layernorm`` (transformers 4.x or 5.x)."""
    vm = model.vision_model
    inner = getattr(vm, "vision_model", None)
    vt = inner if inner is not None else vm
    if not all(hasattr(vt, n) for n in ("embeddings", "encoder", "post_layernorm")):
        raise DebiasError(f"{type(vm).__name__} does not hold a CLIP vision transformer (embeddings / encoder / post_layernorm)")
    return vt


@torch.no_grad()
def mimetic_init(vt: nn.Module, heads: int, g: torch.Generator, a1: float = 0.7, b1: float = 0.7,
                 a2: float = 0.4, b2: float = 0.4) -> None:
    """Mimetic initialisation (Trockman & Kolter, ICML 2023): per head ``W_q^T W_k ~ a1 Z + b1 I`` and
    ``W_v^T W_o^T ~ a2 Z - b2 I`` with ``Z ~ N(0, 1/d)``.

    Why: attention that starts near "attend to similar tokens" (with position embeddings: nearby patches)
    and a value path near a scaled identity is what trained ViTs look like; starting there makes ViTs
    trained from scratch on small data markedly better, at no cost. The factors come from an SVD.
    """
    for layer in vt.encoder.layers:
        attn = layer.self_attn
        d = attn.q_proj.weight.shape[0]
        k = d // heads
        for h in range(heads):
            m = a1 * torch.randn(d, d, generator=g) / d ** 0.5 + b1 * torch.eye(d)
            u, s, vh = torch.linalg.svd(m)
            root = s[:k].sqrt()
            attn.q_proj.weight[h * k:(h + 1) * k] = (u[:, :k] * root).T
            attn.k_proj.weight[h * k:(h + 1) * k] = (vh[:k].T * root).T
        m = a2 * torch.randn(d, d, generator=g) / d ** 0.5 - b2 * torch.eye(d)
        u, s, vh = torch.linalg.svd(m)
        attn.v_proj.weight.copy_((u * s.sqrt()).T)  # W_v^T = U sqrt(S)
        attn.out_proj.weight.copy_(vh.T * s.sqrt())  # W_o^T = sqrt(S) V^T
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            lin.bias.zero_()


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Portable keys -> tensors of every trained part (no text tower)."""
    out = {VISION_PREFIX + k: v.detach().clone() for k, v in vision_transformer(model).state_dict().items()}
    out["visual_projection.weight"] = model.visual_projection.weight.detach().clone()
    out["text_projection.weight"] = model.text_projection.weight.detach().clone()
    out["logit_scale"] = model.logit_scale.detach().clone().reshape(())
    return out


@torch.no_grad()
def load_trained_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load :func:`trained_state_dict` tensors (any float dtype: upcast to the model's) strictly."""
    vt = vision_transformer(model)
    expected = {VISION_PREFIX + k for k in vt.state_dict()} | set(HEAD_KEYS)
    if set(tensors) != expected:
        raise IntegrityError(f"{source}: keys do not match the lab architecture (missing {sorted(expected - set(tensors))[:3]}, "
                             f"unexpected {sorted(set(tensors) - expected)[:3]})")
    vision = {k[len(VISION_PREFIX):]: v for k, v in tensors.items() if k.startswith(VISION_PREFIX)}
    own = vt.state_dict()
    for k, v in vision.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise IntegrityError(f"{source}: {VISION_PREFIX}{k} has shape {tuple(v.shape)}, the architecture needs {tuple(own[k].shape)}")
    vt.load_state_dict({k: v.to(own[k].dtype) for k, v in vision.items()}, strict=True)
    for name in ("visual_projection", "text_projection"):
        w = getattr(model, name).weight
        v = tensors[f"{name}.weight"]
        if tuple(v.shape) != tuple(w.shape):
            raise IntegrityError(f"{source}: {name}.weight has shape {tuple(v.shape)}, the architecture needs {tuple(w.shape)}")
        w.copy_(v.to(w.dtype))
    model.logit_scale.copy_(tensors["logit_scale"].to(model.logit_scale.dtype).reshape(model.logit_scale.shape))


def save_trained(model: nn.Module, path: str | Path, dtype: torch.dtype = torch.float16, metadata: dict | None = None) -> None:
    """Write the trained parts as safetensors (fp16 by default: half the size; loading upcasts)."""
    tensors = {k: v.to(dtype).contiguous() for k, v in trained_state_dict(model).items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def read_trained(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise IntegrityError(f"cannot read bias-lab weights {path}: {exc}") from None


def round_trained(model: nn.Module, dtype: torch.dtype = torch.float16) -> None:
    """Round the trained parts through ``dtype`` in place: the model then equals what the shipped file loads."""
    load_trained_state(model, {k: v.to(dtype) for k, v in trained_state_dict(model).items()})
