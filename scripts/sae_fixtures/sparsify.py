"""EleutherAI sparsify cases: ``SparseCoder(...).save_to_disk`` and real ``Trainer.fit`` runs on a tiny random
GPT-2 (built locally from a config, nothing downloaded), one run with two hookpoints and one with two init seeds
(``run/h.0/seed0``, ``run/h.0/seed1``). References: ``SparseCoder.load_from_disk`` of the folder, then its own
``encode`` (top-k values and indices, scattered to dense latents) and ``forward().sae_out``."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .common import inputs, randomize, write_case


def _reference(folder: Path, x: torch.Tensor):
    from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(folder)
    with torch.no_grad():
        xs = x.to(sae.dtype)
        acts, idx, _ = sae.encode(xs)
        dense = torch.zeros(x.shape[0], sae.num_latents, dtype=acts.dtype).scatter(-1, idx, acts)
        return dense.float(), sae(xs).sae_out.float()


def build(root: Path) -> None:
    import sparsify
    from datasets import Dataset
    from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer
    from transformers import GPT2Config, GPT2LMHeadModel

    version = getattr(sparsify, "__version__", "1.3.x")
    tmp = Path(tempfile.mkdtemp())

    def coder(name, d, F, k, *, seed, expect="exact", notes="", dtype=torch.float32, **cfg):
        torch.manual_seed(seed)
        sae = SparseCoder(d, SparseCoderConfig(num_latents=F, k=k, **cfg), dtype=torch.float32)
        randomize(sae, seed, {})
        sae = sae.to(dtype)
        out = tmp / name
        sae.save_to_disk(out)
        x = inputs(d, seed + 1000)
        lat = rec = None
        extra = {}
        if expect == "exact":
            if dtype != torch.float32:  # reference in float32, like the import; the library's own half forward too
                lat32, rec32 = _reference_from(sae.float(), x)
                extra = dict(zip(("latents_native", "recon_native"), _reference(out, x)))
                lat, rec = lat32, rec32
            else:
                lat, rec = _reference(out, x)
        write_case(root, f"sparsify_{name}", library="eai-sparsify", version=version,
                   built="SparseCoder.save_to_disk", x=x, latents=lat, recon=rec, expect=expect, files_from=out,
                   topk=True, notes=notes, extra=extra)

    coder("coder", 16, 32, 4, seed=201)
    coder("coder_square", 24, 24, 5, seed=202)
    coder("coder_bf16", 16, 32, 4, seed=203, dtype=torch.bfloat16,
          notes="saved in bfloat16; reference: the same coder's float32 forward; *_native: the library's bf16 forward")
    coder("transcoder", 16, 32, 4, seed=204, transcode=True, expect={"refuse": "transcoder"})
    coder("skip", 16, 32, 4, seed=205, skip_connection=True, expect={"refuse": "skip_connection"})
    coder("groupmax", 16, 32, 4, seed=206, activation="groupmax", expect={"refuse": "groupmax"})

    # Real training runs on a tiny random GPT-2 (width 32, like debias-export's tiny-clip).
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16))
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 64, (96, 16), generator=g).tolist()}).with_format("torch")
    for name, hookpoints, seeds, load in (("run", ["h.0", "h.1"], [0], "h.1"),
                                          ("run_seeds", ["h.0"], [0, 1], "h.0/seed1")):
        cfg = TrainConfig(SparseCoderConfig(num_latents=64, k=4), batch_size=8, hookpoints=hookpoints, init_seeds=seeds,
                          save_dir=str(tmp), run_name=name, log_to_wandb=False, lr_warmup_steps=1, save_every=10_000)
        Trainer(cfg, data, model).fit()
        run = tmp / name
        (run / "optimizer_0.pt").unlink()  # optimizer state: large and irrelevant to importing
        x = inputs(32, 300 + len(seeds))
        lat, rec = _reference(run / load, x)
        write_case(root, f"sparsify_{name}", library="eai-sparsify", version=version,
                   built=f"Trainer.fit (hookpoints {hookpoints}, init_seeds {seeds}) run folder", x=x, latents=lat,
                   recon=rec, expect="exact", files_from=run, load={"hookpoint": load}, topk=True,
                   notes=f"the run folder as Trainer.fit wrote it (optimizer_0.pt left out for size); loads hookpoint {load}")


def _reference_from(sae, x: torch.Tensor):
    with torch.no_grad():
        acts, idx, _ = sae.encode(x)
        dense = torch.zeros(x.shape[0], sae.num_latents).scatter(-1, idx, acts)
        return dense, sae(x).sae_out
