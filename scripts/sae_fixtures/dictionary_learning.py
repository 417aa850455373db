"""dictionary_learning 0.1.0 cases: every SAE trained briefly with the library's own ``trainSAE`` (which writes
``trainer_0/ae.pt`` + ``config.json``) on random activations, then reloaded with the library's own
``utils.load_dictionary`` and run with its ``encode`` / ``forward``. ``*_noconfig`` cases are the same files
with ``config.json`` removed (as users often download only ``ae.pt``)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .common import N_INPUTS, inputs, write_case

STEPS = 30


def _data(d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    while True:  # correlated activations with an offset, like a residual stream
        yield (torch.randn(N_INPUTS, d, generator=g) @ mix * 2 + 0.5).float()


def build(root: Path) -> None:
    import dictionary_learning
    from dictionary_learning.trainers import BatchTopKTrainer, GatedSAETrainer, JumpReluTrainer, StandardTrainer, TopKTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate
    from dictionary_learning.training import trainSAE
    from dictionary_learning.utils import load_dictionary

    version = getattr(dictionary_learning, "__version__", None) or "0.1.0"
    tmp = Path(tempfile.mkdtemp())
    short = dict(warmup_steps=2, layer=3, lm_name="tiny-clip", device="cpu")

    def train(name, trainer, d, F, *, seed, normalize=False, **kw):
        torch.manual_seed(seed)
        cfg = dict(trainer=trainer, steps=STEPS, activation_dim=d, dict_size=F, seed=seed, **short, **kw)
        out = tmp / name
        trainSAE(data=_data(d, seed), trainer_configs=[cfg], steps=STEPS, save_dir=str(out), device="cpu",
                 normalize_activations=normalize, log_steps=None)
        return out / "trainer_0"

    def case(name, folder, d, *, seed, expect="exact", topk=False, notes="", noconfig=None):
        x = inputs(d, seed + 1000) * 2
        ae, _ = load_dictionary(str(folder), device="cpu")
        with torch.no_grad():
            lat, rec = ae.encode(x), ae(x)
        write_case(root, f"dl_{name}", library="dictionary-learning", version=version,
                   built=f"trainSAE ({STEPS} steps) -> trainer_0/ae.pt + config.json; reference utils.load_dictionary",
                   x=x, latents=lat, recon=rec, expect=expect, files_from=folder, topk=topk, notes=notes)
        if noconfig is not None:
            bare = tmp / f"{name}_bare"
            bare.mkdir()
            shutil.copy(folder / "ae.pt", bare / "ae.pt")
            write_case(root, f"dl_{name}_noconfig", library="dictionary-learning", version=version,
                       built="the same ae.pt without config.json", x=x, latents=lat, recon=rec, expect=noconfig,
                       files_from=bare, topk=topk, notes="reference: load_dictionary with the config")

    for d, F, tag in ((16, 48, ""), (32, 32, "_square")):
        s = 400 + d
        case(f"autoencoder{tag}", train(f"ae{tag}", StandardTrainer, d, F, seed=s, l1_penalty=0.05,
                                        sparsity_warmup_steps=2), d, seed=s, noconfig="exact" if not tag else None)
        case(f"topk{tag}", train(f"topk{tag}", TopKTrainer, d, F, seed=s + 1, k=4), d, seed=s + 1, topk=True,
             noconfig={"refuse": "config.json"} if not tag else None)
        case(f"batchtopk{tag}", train(f"btk{tag}", BatchTopKTrainer, d, F, seed=s + 2, k=4, threshold_start_step=5), d,
             seed=s + 2, noconfig={"refuse": "config.json"} if not tag else None)
    case("autoencoder_april", train("april", StandardTrainerAprilUpdate, 16, 48, seed=450, l1_penalty=0.05,
                                    sparsity_warmup_steps=2, lr=3e-2), 16, seed=450, noconfig="exact",
         notes="StandardTrainerAprilUpdate: decoder columns not unit norm; load_dictionary normalises them")
    case("matryoshka", train("mat", MatryoshkaBatchTopKTrainer, 16, 48, seed=460, k=4, threshold_start_step=5,
                             group_fractions=[0.25, 0.25, 0.5]), 16, seed=460, noconfig="exact")
    case("batchtopk_normalized", train("btkn", BatchTopKTrainer, 16, 48, seed=470, k=4, threshold_start_step=5,
                                       normalize=True), 16, seed=470,
         notes="trainSAE(normalize_activations=True): the norm factor is folded into the saved biases/threshold")
    case("jumprelu", train("jr", JumpReluTrainer, 16, 48, seed=480, sparsity_warmup_steps=2, lr=1e-2), 16, seed=480,
         noconfig="exact")
    case("gated", train("gated", GatedSAETrainer, 16, 48, seed=490, sparsity_warmup_steps=2, lr=1e-2), 16, seed=490,
         noconfig="exact")
