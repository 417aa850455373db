"""SAELens 4.x / 5.x cases: one ``SAE`` class whose ``cfg.architecture`` picks the encoder, written with
``SAE.save_model`` (``TrainingSAE.save_model`` for the training saves), reloaded with ``SAE.load_from_disk(...,
dtype="float32")`` and run with its own ``encode`` / ``forward``. Options a version lacks are skipped with a note.
"""
from __future__ import annotations

import dataclasses
import tempfile
import typing
from pathlib import Path

import torch

from .common import inputs, randomize, thresholds, write_case


def build(root: Path) -> None:
    import sae_lens
    from sae_lens import SAE, SAEConfig
    from sae_lens.training.training_sae import TrainingSAE, TrainingSAEConfig

    version = sae_lens.__version__
    load = getattr(SAE, "load_from_disk", None) or SAE.load_from_pretrained  # 4.x: load_from_pretrained(path)
    major = version.split(".")[0]
    tmp = Path(tempfile.mkdtemp())
    arch_field = {f.name: f for f in dataclasses.fields(SAEConfig)}["architecture"]
    architectures = typing.get_args(typing.get_type_hints(SAEConfig)["architecture"]) or ("standard",)
    print(f"sae-lens {version}: architectures {architectures}; default {arch_field.default!r}")

    base = dict(architecture="standard", d_in=16, d_sae=32, activation_fn_str="relu", apply_b_dec_to_input=True,
                finetuning_scaling_factor=False, context_size=8, model_name="tiny-clip",
                hook_name="blocks.1.hook_resid_post", hook_layer=1, hook_head_index=None, prepend_bos=True,
                dataset_path="none", dataset_trust_remote_code=False, normalize_activations="none", dtype="float32",
                device="cpu", sae_lens_training_version=version, activation_fn_kwargs={}, neuronpedia_id=None,
                model_from_pretrained_kwargs={}, seqpos_slice=(None,))

    def config(cls, **over):
        names = {f.name for f in dataclasses.fields(cls)}
        extra = {}
        if cls is TrainingSAEConfig:  # training-only fields, with neutral values
            extra = dict(l1_coefficient=1.0, lp_norm=1.0, use_ghost_grads=False, normalize_sae_decoder=False,
                         noise_scale=0.0, decoder_orthogonal_init=False, mse_loss_normalization=None,
                         jumprelu_init_threshold=0.01, jumprelu_bandwidth=0.05, decoder_heuristic_init=False,
                         init_encoder_as_decoder_transpose=False, scale_sparsity_penalty_by_decoder_norm=False,
                         decoder_heuristic_init_norm=0.1)
        d = {k: v for k, v in {**base, **extra, **over}.items() if k in names}
        return cls(**d)

    rules = {"threshold": thresholds, "log_threshold": lambda s, g: torch.log(torch.rand(s, generator=g) * 0.3 + 0.02),
             "r_mag": lambda s, g: torch.randn(s, generator=g) * 0.3,
             "finetuning_scaling_factor": lambda s, g: torch.rand(s, generator=g) + 0.5}

    def case(name, *, seed, expect="exact", topk=False, notes="", training=False, reference=True, native=False, **over):
        try:
            cfg = config(TrainingSAEConfig if training else SAEConfig, **over)
            sae = (TrainingSAE if training else SAE)(cfg)
        except Exception as exc:  # noqa: BLE001 - a version without this option: say so and go on
            print(f"  skipped {name}: {type(exc).__name__}: {str(exc)[:120]}")
            return
        randomize(sae, seed, rules)
        out = tmp / name
        sae.save_model(str(out))
        x = inputs(cfg.d_in, seed + 1000)
        lat = rec = None
        extra = {}
        if reference:
            try:
                ref = load(str(out), dtype="float32")
            except Exception as exc:  # noqa: BLE001 - the library cannot reload this save of its own
                notes = (f"{notes}; the library's loader fails on this save ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[-1][:90]}): reference is the saved object's own forward")
                ref = sae.to(torch.float32)
            with torch.no_grad():
                lat, rec = ref.encode(x), ref(x)
            if native:
                nat = load(str(out))
                with torch.no_grad():
                    xn = x.to(nat.dtype)
                    extra = {"latents_native": nat.encode(xn), "recon_native": nat(xn)}
        write_case(root, f"saelens{major}_{name}", library="sae-lens", version=version,
                   built=f"{'TrainingSAE' if training else 'SAE'}.save_model, architecture {cfg.architecture}",
                   x=x, latents=lat, recon=rec, expect=expect, files_from=out, topk=topk, notes=notes, extra=extra)

    case("standard", seed=101)
    case("standard_square", seed=102, d_in=32, d_sae=32)
    case("standard_no_bdec_in", seed=103, apply_b_dec_to_input=False, d_sae=48)
    case("standard_topk_fn", seed=104, d_sae=48, activation_fn_str="topk", activation_fn_kwargs={"k": 5}, topk=True,
         notes="architecture standard with activation_fn_str topk and k in activation_fn_kwargs")
    if "topk" in architectures:
        case("topk", seed=105, architecture="topk", d_sae=48, activation_fn_str="topk", activation_fn_kwargs={"k": 5},
             topk=True, notes="architecture topk with k only in activation_fn_kwargs")
        case("topk_square", seed=106, architecture="topk", d_in=24, d_sae=24, activation_fn_str="topk",
             activation_fn_kwargs={"k": 4}, topk=True)
    if "jumprelu" in architectures:
        case("jumprelu", seed=107, architecture="jumprelu", d_sae=40)
        case("jumprelu_training", seed=108, architecture="jumprelu", d_sae=40, training=True,
             notes="TrainingSAE (log_threshold) .save_model")
    if "gated" in architectures:
        case("gated", seed=109, architecture="gated", d_sae=40)
        case("gated_training", seed=110, architecture="gated", d_sae=40, training=True)
    case("finetuning_scaling_factor", seed=111, finetuning_scaling_factor=True,
         notes="tensor key finetuning_scaling_factor, random values in [0.5, 1.5)")
    case("norm_expected_average_only_in", seed=112, normalize_activations="expected_average_only_in",
         notes="SAELens inference applies no input scaling for this setting")
    case("norm_layer_norm", seed=113, normalize_activations="layer_norm", expect={"refuse": "layer_norm"})
    case("norm_constant_norm_rescale", seed=114, normalize_activations="constant_norm_rescale",
         expect={"refuse": "constant_norm_rescale"})
    case("topk_bf16", seed=115, d_sae=48, activation_fn_str="topk", activation_fn_kwargs={"k": 5}, dtype="bfloat16",
         topk=True, native=True, notes="saved in bfloat16; reference: the library's float32 load; *_native: its bf16 forward")
    case("standard_fp16", seed=116, dtype="float16", native=True, notes="saved in float16; reference: float32 load")
    case("hook_z", seed=117, hook_name="blocks.1.attn.hook_z", reference=False, expect={"refuse": "hook_z"},
         notes="the library reshapes [..., n_heads, d_head] inputs; no flat-vector reference")
