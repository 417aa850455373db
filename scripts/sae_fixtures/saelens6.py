"""SAELens 6.x cases: each SAE built with SAELens' own classes, written with its own ``save_model`` /
``save_inference_model``, reloaded with its own ``SAE.load_from_disk(..., dtype="float32")``, and run on the
fixed batch with its own ``encode`` / ``forward``."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .common import inputs, randomize, thresholds, write_case

REFUSE_NORM = "normalize_activations"


def build(root: Path) -> None:
    import sae_lens
    from sae_lens import (SAE, AbsTopKSAE, AbsTopKSAEConfig, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, GatedSAE,
                          GatedSAEConfig, GatedTrainingSAE, GatedTrainingSAEConfig, JumpReLUSAE, JumpReLUSAEConfig,
                          JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, MatchingPursuitSAE, MatchingPursuitSAEConfig,
                          MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig, StandardSAE,
                          StandardSAEConfig, TopKSAE, TopKSAEConfig)
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    version = sae_lens.__version__
    major = version.split(".")[0]
    tmp = Path(tempfile.mkdtemp())
    meta = dict(model_name="tiny-clip", hook_name="blocks.1.hook_resid_post")
    rules = {"threshold": thresholds, "r_mag": lambda s, g: torch.randn(s, generator=g) * 0.3}

    def reference(path: Path, x: torch.Tensor, cls=SAE):
        ref = cls.load_from_disk(str(path), dtype="float32")
        with torch.no_grad():
            return ref.encode(x), ref(x)

    def case(name: str, sae, *, seed: int, expect="exact", topk=False, notes="", save="save_model",
             ref_from: Path | None = None, extra_native=False):
        randomize(sae, seed, rules)
        out = tmp / name
        getattr(sae, save)(str(out))
        x = inputs(sae.cfg.d_in, seed + 1000)
        lat, rec = reference(ref_from or out, x)
        extra = {}
        if extra_native:  # the library's own half-precision forward, for the record
            native = SAE.load_from_disk(str(out))
            with torch.no_grad():
                xn = x.to(native.dtype)
                extra = {"latents_native": native.encode(xn), "recon_native": native(xn)}
        write_case(root, f"saelens{major}_{name}", library="sae-lens", version=version,
                   built=f"{type(sae).__name__}.{save}", x=x, latents=lat, recon=rec, expect=expect, files_from=out,
                   topk=topk, notes=notes, extra=extra)
        return out

    md = lambda: SAEMetadata(**meta)  # noqa: E731
    case("standard", StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, metadata=md())), seed=1)
    case("standard_square", StandardSAE(StandardSAEConfig(d_in=32, d_sae=32, metadata=md())), seed=2)
    case("standard_no_bdec_in", StandardSAE(StandardSAEConfig(d_in=16, d_sae=48, apply_b_dec_to_input=False,
                                                               metadata=md())), seed=3)
    case("topk", TopKSAE(TopKSAEConfig(d_in=16, d_sae=48, k=5, metadata=md())), seed=4, topk=True)
    case("topk_square", TopKSAE(TopKSAEConfig(d_in=24, d_sae=24, k=4, metadata=md())), seed=5, topk=True)
    case("topk_rescale", TopKSAE(TopKSAEConfig(d_in=16, d_sae=40, k=6, rescale_acts_by_decoder_norm=True,
                                               metadata=md())), seed=6, topk=True)
    case("jumprelu", JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=40, metadata=md())), seed=7)
    case("jumprelu_training", JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=16, d_sae=40, metadata=md())), seed=8,
         notes="JumpReLUTrainingSAE.save_model; reference: SAE.load_from_disk of that folder")
    case("gated", GatedSAE(GatedSAEConfig(d_in=16, d_sae=40, metadata=md())), seed=9)
    case("gated_square", GatedSAE(GatedSAEConfig(d_in=32, d_sae=32, apply_b_dec_to_input=False, metadata=md())), seed=10)
    case("gated_training", GatedTrainingSAE(GatedTrainingSAEConfig(d_in=16, d_sae=40, metadata=md())), seed=11)

    # BatchTopK / Matryoshka are training-only in SAELens 6: save_inference_model writes them as JumpReLU.
    # The training save (architecture batchtopk, buffer topk_threshold) is compared with the library's own
    # inference conversion of the same SAE.
    for name, cls, cfg_cls, extra_cfg, seed in (
            ("batchtopk", BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {"rescale_acts_by_decoder_norm": False}, 12),
            ("batchtopk_rescale", BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {"rescale_acts_by_decoder_norm": True}, 13),
            ("matryoshka", MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig,
             {"matryoshka_widths": [8, 24, 40], "rescale_acts_by_decoder_norm": False}, 14)):
        sae = cls(cfg_cls(d_in=16, d_sae=40, k=5, metadata=md(), **extra_cfg))
        randomize(sae, seed, rules)
        sae.topk_threshold = torch.tensor(0.35, dtype=torch.double)
        inf = tmp / f"{name}_inference"
        sae.save_inference_model(str(inf))
        x = inputs(16, seed + 1000)
        lat, rec = reference(inf, x)
        write_case(root, f"saelens{major}_{name}_inference", library="sae-lens", version=version,
                   built=f"{cls.__name__}.save_inference_model (written as jumprelu)", x=x, latents=lat, recon=rec,
                   expect="exact", files_from=inf)
        train = tmp / f"{name}_training"
        sae.save_model(str(train))
        write_case(root, f"saelens{major}_{name}_training", library="sae-lens", version=version,
                   built=f"{cls.__name__}.save_model (architecture {sae.cfg.architecture()}, topk_threshold)", x=x,
                   latents=lat, recon=rec, expect="exact", files_from=train,
                   notes="reference: the library's own save_inference_model of the same SAE, loaded with SAE.load_from_disk "
                         "(the training class itself encodes with a batch-level top-k, which depends on the batch)")

    for norm, seed in (("expected_average_only_in", 20), ("covariance_whitening", 21)):
        case(f"norm_{norm}", StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, normalize_activations=norm, metadata=md())),
             seed=seed, notes="SAELens inference applies no input scaling for this setting")
    for norm, seed in (("layer_norm", 22), ("constant_norm_rescale", 23)):
        case(f"norm_{norm}", StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, normalize_activations=norm, metadata=md())),
             seed=seed, expect={"refuse": norm})

    case("topk_bf16", TopKSAE(TopKSAEConfig(d_in=16, d_sae=48, k=5, dtype="bfloat16", metadata=md())), seed=30,
         topk=True, extra_native=True,
         notes="saved in bfloat16; reference: the library's float32 load; *_native: its bfloat16 forward")
    case("standard_fp16", StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, dtype="float16", metadata=md())), seed=31,
         extra_native=True, notes="saved in float16; reference: the library's float32 load")

    case("matching_pursuit", MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=16, d_sae=32, metadata=md())), seed=40,
         expect={"refuse": "matching_pursuit"})
    case("abstopk", AbsTopKSAE(AbsTopKSAEConfig(d_in=16, d_sae=32, k=4, metadata=md())), seed=41,
         expect={"refuse": "abstopk"})
    tc = Transcoder(TranscoderConfig(d_in=16, d_sae=32, d_out=16, apply_b_dec_to_input=False, metadata=md()))
    case("transcoder", tc, seed=42, expect={"refuse": "transcoder"})
