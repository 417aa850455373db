"""Matryoshka BatchTopK training: learns planted features, folds the input scale, deterministic, resumable."""
import json

import pytest
import torch
from safetensors.torch import save_file

from debias_export.core.errors import ConfigError, DebiasError, ShapeError
from debias_export.sae import SparseAutoencoder, load_any
from debias_export.sae.train import fvu, train_sae
from debias_export.sae.trainer import MatryoshkaTrainer, TrainConfig, batch_topk, geometric_median, lr_factor


def planted(n, d=32, nf=48, k=3, seed=0, noise=0.01):
    """Sparse non-negative combinations of ``nf`` planted unit features, an offset and a little noise."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(nf, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    idx = torch.rand(n, nf, generator=g).argsort(1)[:, :k]
    coef = torch.zeros(n, nf).scatter(1, idx, torch.rand(n, k, generator=g) * 2 + 0.5)
    return coef @ feats + noise * torch.randn(n, d, generator=g) + 0.3, feats


def tiny_cfg(**kw):
    base = dict(d_in=16, expansion=4, k=2, batch_size=64, steps=40, lr=5e-3, warmup_steps=5, checkpoint_every=10)
    return TrainConfig(**{**base, **kw})


X16 = planted(1000, d=16, nf=24, k=2, seed=1)[0]


def test_learns_planted_features():
    x, feats = planted(12000)
    cfg = TrainConfig(d_in=32, expansion=4, k=3, batch_size=256, steps=300, lr=1e-2, warmup_steps=20,
                      dead_tokens=2560, seed=0)
    early = train_sae(x, cfg, max_steps_this_call=2, progress=False)
    sae = train_sae(x, cfg, progress=False)
    held_out = x[-3000:]
    assert fvu(sae, held_out) < 0.3 < fvu(early, held_out)
    W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (feats @ W.T).max(dim=1).values
    assert (best > 0.9).float().mean() >= 0.6, best
    meta = sae.cfg.metadata["training"]
    assert meta["finished"] and meta["steps_done"] == 300 and meta["group_sizes"] == [8, 16, 32, 72]
    assert meta["final_fvu"] < 0.3 and sae.cfg.activation == "threshold" and float(sae.threshold) > 0
    assert meta["threshold"] == pytest.approx(float(sae.threshold))
    # BatchTopK trained, threshold inference: about k latents per row on average
    l0 = (sae.encode(x[:2000]) > 0).float().sum(1).mean()
    assert 1.5 < l0 < 6


def test_saved_sae_takes_raw_activations():
    cfg = tiny_cfg()
    tr = MatryoshkaTrainer(cfg)
    tr.scale_from(iter([X16[:500], X16[500:]]), 2)
    assert (X16 / tr.scale).pow(2).sum(1).mean() == pytest.approx(1.0, rel=1e-4)  # unit mean squared norm
    for i in range(30):
        tr.train_step(X16[(i * 64) % 900:(i * 64) % 900 + 64])
    saved = tr.export()
    s = tr.scale
    with torch.no_grad():
        assert torch.allclose(saved.encode(X16), s * tr.sae.encode(X16 / s), atol=1e-5)
        assert torch.allclose(saved(X16), s * tr.sae(X16 / s), atol=1e-5)
    assert float(saved.threshold) == pytest.approx(s * float(tr.sae.threshold))


def test_save_load_round_trip_is_bit_identical(tmp_path):
    sae = train_sae(X16, tiny_cfg(steps=15), progress=False)
    sae.save(tmp_path / "a")
    back = SparseAutoencoder.load(tmp_path / "a")
    for name, t in sae.state_tensors().items():
        assert torch.equal(back.state_tensors()[name], t), name
    assert back.cfg == sae.cfg
    back.save(tmp_path / "b")
    assert (tmp_path / "a/sae.safetensors").read_bytes() == (tmp_path / "b/sae.safetensors").read_bytes()
    assert torch.equal(load_any(tmp_path / "a", d_in=16).W_enc, sae.W_enc)


def test_deterministic(tmp_path):
    rng_before = torch.get_rng_state()
    a = train_sae(X16, tiny_cfg(), progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    b = train_sae(X16, tiny_cfg(), progress=False)
    c = train_sae(X16, tiny_cfg(seed=1), progress=False)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    assert (tmp_path / "a/sae.safetensors").read_bytes() == (tmp_path / "b/sae.safetensors").read_bytes()
    assert not torch.equal(a.W_dec, c.W_dec)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = tiny_cfg(steps=40, dead_tokens=256)  # dead latents: the aux-k loss and counters must resume too
    full = train_sae(X16, cfg, progress=False)
    ck = tmp_path / "ck"
    part = train_sae(X16, cfg, ck, max_steps_this_call=25, progress=False)
    assert part.cfg.metadata["training"]["steps_done"] == 25 and not part.cfg.metadata["training"]["finished"]
    assert [p.name for p in ck.glob("step-*")] == ["step-000000025"]
    info = json.loads((ck / "step-000000025/state.json").read_text())
    assert info["step"] == 25 and info["settings_hash"] == cfg.settings_hash()
    resumed = train_sae(X16, cfg, ck, progress=False)
    assert resumed.cfg.metadata["training"]["finished"]
    for name, t in full.state_tensors().items():
        assert torch.equal(resumed.state_tensors()[name], t), name
    again = train_sae(X16, cfg, ck, progress=False)  # finished checkpoint: returns the same SAE
    assert torch.equal(again.W_enc, full.W_enc)


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    train_sae(X16, tiny_cfg(steps=20), tmp_path, max_steps_this_call=10, progress=False)
    with pytest.raises(ConfigError, match="different training settings"):
        train_sae(X16, tiny_cfg(steps=20, k=3), tmp_path, progress=False)
    # settings that do not change the weights may differ
    train_sae(X16, tiny_cfg(steps=20, checkpoint_every=7, metadata={"site": "image.1"}), tmp_path, progress=False)


def test_shard_iterables_and_bad_shapes():
    shards = [X16[:300], X16[300:650], X16[650:]]
    sae = train_sae(shards, tiny_cfg(steps=20), progress=False)
    assert sae.num_latents == 64
    once = train_sae(iter(shards), tiny_cfg(steps=20), progress=False)  # one-shot iterator: kept in memory
    assert torch.equal(once.W_enc, sae.W_enc)
    with pytest.raises(ShapeError, match=r"shard 1 has shape \(10, 8\)"):
        train_sae([X16[:100], torch.zeros(10, 8)], tiny_cfg(steps=5, warmup_steps=1), progress=False)
    with pytest.raises(DebiasError, match="empty"):
        train_sae(iter([]), tiny_cfg(steps=5, warmup_steps=1), progress=False)


@pytest.mark.parametrize("kw,match", [
    (dict(steps=None), "exactly one of steps or tokens"),
    (dict(k=1000), "k=1000"),
    (dict(group_fractions=[0.5, 0.6]), "sum to at most 1"),
    (dict(group_fractions=[0.001, 0.999]), "empty group"),
    (dict(warmup_steps=39), "warmup_steps"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(**kw)


def test_building_blocks():
    pre = torch.rand(5, 20)
    f = batch_topk(pre, 3)
    assert int((f > 0).sum()) == 15 and torch.equal(f[f > 0].sort().values, pre.flatten().topk(15).values.sort().values)
    cfg = TrainConfig(d_in=4, k=2, steps=100, warmup_steps=10, decay_fraction=0.2)
    assert [lr_factor(s, cfg) for s in (0, 9, 10, 79, 80, 99)] == [0.1, 1.0, 1.0, 1.0, 1.0, pytest.approx(0.05)]
    assert TrainConfig(d_in=16, k=2, tokens=1000, batch_size=300).total_steps == 4
    assert TrainConfig(d_in=512, steps=10).learning_rate == pytest.approx(2e-4 / (4096 / 16384) ** 0.5)
    pts = torch.cat([torch.zeros(50, 3), torch.full((5, 3), 100.0)])  # outliers barely move the median
    assert geometric_median(pts).norm() < 1.0 < pts.mean(0).norm()


def test_aux_loss_only_with_dead_latents():
    tr = MatryoshkaTrainer(tiny_cfg(dead_tokens=100))
    resid, pre = torch.randn(8, 16), torch.rand(8, 64)
    assert float(tr._aux_loss(resid, pre)) == 0.0
    tr.since_fired[:10] = 100
    assert float(tr._aux_loss(resid, pre).detach()) > 0.0


def test_cli_train_sae(tmp_path):
    from debias_export.cli.main import main

    shards = tmp_path / "acts"
    shards.mkdir()
    save_file({"activations": X16[:600].contiguous()}, str(shards / "a.safetensors"))
    save_file({"activations": X16[600:].contiguous()}, str(shards / "b.safetensors"))
    out = tmp_path / "sae"
    args = ["train-sae", "--activations", str(shards), "--out", str(out), "--k", "2", "--expansion", "4",
            "--batch-size", "64", "--steps", "20", "--lr", "5e-3", "--no-progress"]
    assert main(args) == 0
    sae = load_any(out, d_in=16)
    assert sae.num_latents == 64 and sae.cfg.metadata["training"]["steps_done"] == 20
    assert main(args) == 2  # exists
    assert main(args + ["--overwrite", "--seed", "3"]) == 0
    assert not list(tmp_path.glob(".sae.*"))  # no temp folders left behind
    (shards / "c.safetensors").write_bytes(b"not a safetensors file")
    assert main(args + ["--overwrite"]) == 2


def test_cli_train_sae_on_capture_dir(tmp_path, clip):
    from debias_export.capture import capture_activations
    from debias_export.cli.main import main
    from debias_export.data.datasets import TextPrompts

    (tmp_path / "p.txt").write_text("\n".join(f"a photo of a {w}" for w in ["doctor", "nurse", "cat", "dog", "car"] * 4))
    capture_activations(clip, "text.1", TextPrompts(tmp_path / "p.txt"), tmp_path / "cap", tokens="all", progress=False)
    assert main(["train-sae", "--activations", str(tmp_path / "cap"), "--out", str(tmp_path / "sae"), "--k", "4",
                 "--batch-size", "32", "--steps", "10", "--no-progress"]) == 0
    meta = SparseAutoencoder.load(tmp_path / "sae").cfg.metadata
    assert meta["site"].startswith("text.1") and meta["tower"] == "text" and meta["layer"] == 1
    from debias_export.capture.store import ActivationStore

    store = ActivationStore(tmp_path / "cap")  # the library takes a store directly, too
    sae = train_sae(store, TrainConfig(d_in=32, k=4, batch_size=32, steps=10), progress=False)
    assert torch.equal(sae.W_dec, SparseAutoencoder.load(tmp_path / "sae").W_dec)
