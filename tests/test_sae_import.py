"""SAE importers: each layout's own encode/decode equations, written out here independently, must match."""
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from debias_export.core.errors import DebiasError, ShapeError
from debias_export.sae.importers import detect_format, load_any
from debias_export.workflow.testing import random_sae

D, F, K = 12, 40, 4


def _r(*shape, seed=0, scale=0.3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


X = _r(9, D, seed=99, scale=1.0)


def _topk_dense(h, k):
    vals, idx = h.topk(k, dim=-1)
    return torch.zeros_like(h).scatter(-1, idx, vals.relu())


def _check(sae, f_ref, recon_ref):
    with torch.no_grad():
        f = sae.encode(X)
        assert torch.allclose(f, f_ref, atol=1e-5), (f - f_ref).abs().max()
        assert torch.allclose(sae.decode(f), recon_ref, atol=1e-5)
        assert (f > 0).any()  # the comparison is not vacuous


# ----- SAELens -------------------------------------------------------------------------------------
def _saelens(path, cfg, extra=None, seed=0):
    t = {"W_enc": _r(D, F, seed=seed), "b_enc": _r(F, seed=seed + 1, scale=0.1), "W_dec": _r(F, D, seed=seed + 2),
         "b_dec": _r(D, seed=seed + 3, scale=0.1), **(extra or {})}
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": F, "normalize_activations": "none", **cfg}))
    return t


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard(tmp_path, apply_b_dec):
    t = _saelens(tmp_path, {"architecture": "standard", "apply_b_dec_to_input": apply_b_dec})
    h = (X - t["b_dec"] * apply_b_dec) @ t["W_enc"] + t["b_enc"]
    f = h.relu()
    sae = load_any(tmp_path, d_in=D)
    assert detect_format(tmp_path) == "saelens" and sae.cfg.activation == "relu"
    _check(sae, f, f @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_topk(tmp_path, rescale):
    t = _saelens(tmp_path, {"architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": rescale})
    h = (X - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    norms = t["W_dec"].norm(dim=-1)
    f = _topk_dense(h * norms if rescale else h, K)
    recon = (f / norms if rescale else f) @ t["W_dec"] + t["b_dec"]
    _check(load_any(tmp_path), f, recon)


def test_saelens_old_style_topk_config(tmp_path):
    t = _saelens(tmp_path, {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}})
    f = _topk_dense((X - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 3)
    _check(load_any(tmp_path), f, f @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize("log", [False, True])
def test_saelens_jumprelu(tmp_path, log):
    thr = _r(F, seed=7, scale=0.2)  # some negative: SAELens gates on relu(threshold)
    extra = {"log_threshold": thr} if log else {"threshold": thr}
    t = _saelens(tmp_path, {"architecture": "jumprelu"}, extra)
    real_thr = thr.exp() if log else thr
    h = (X - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    f = h.relu() * (h > real_thr.relu())
    _check(load_any(tmp_path, d_in=D), f, f @ t["W_dec"] + t["b_dec"])


def test_saelens_finetuning_scaling_factor(tmp_path):
    s = _r(F, seed=11).abs() + 0.5
    t = _saelens(tmp_path, {"architecture": "standard", "finetuning_scaling_factor": True}, {"scaling_factor": s})
    f = ((X - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu()
    _check(load_any(tmp_path), f, (f * s) @ t["W_dec"] + t["b_dec"])


def test_saelens_finetuning_scaling_factor_tensor_key(tmp_path):
    """SAELens 4.x/5.x write the scale under its config name, not ``scaling_factor``."""
    s = _r(F, seed=12).abs() + 0.5
    t = _saelens(tmp_path, {"architecture": "standard", "finetuning_scaling_factor": True},
                 {"finetuning_scaling_factor": s})
    f = ((X - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu()
    _check(load_any(tmp_path), f, (f * s) @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_gated(tmp_path, apply_b_dec):
    """Gated SAE (Rajamanoharan et al. 2024): gate on ``u @ W + b_gate > 0``, magnitude relu(u @ (W e^r) + b_mag)."""
    extra = {"b_gate": _r(F, seed=21, scale=0.2), "b_mag": _r(F, seed=22, scale=0.2), "r_mag": _r(F, seed=23)}
    t = _saelens(tmp_path, {"architecture": "gated", "apply_b_dec_to_input": apply_b_dec}, extra)
    u = X - t["b_dec"] * apply_b_dec
    gate = (u @ t["W_enc"] + t["b_gate"]) > 0
    f = gate * (u @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]).relu()
    assert 0 < gate.float().mean() < 1
    _check(load_any(tmp_path), f, f @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize("cfg,match", [
    ({"architecture": "matching_pursuit"}, "architecture 'matching_pursuit' is not supported \\(supported: standard"),
    ({"architecture": "standard", "normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm' is not supported"),
    ({"architecture": "standard", "normalize_activations": "constant_norm_rescale"}, "constant_norm_rescale"),
    ({"architecture": "topk"}, "k must be a positive integer"),
])
def test_saelens_unsupported_options_are_refused(tmp_path, cfg, match):
    _saelens(tmp_path, cfg)
    with pytest.raises(DebiasError, match=match):
        load_any(tmp_path)


@pytest.mark.parametrize("norm", ["expected_average_only_in", "covariance_whitening", True])
def test_saelens_normalizations_that_inference_ignores(tmp_path, norm):
    """SAELens' own inference applies no input scaling for these (it only folds a scale it is given)."""
    t = _saelens(tmp_path, {"architecture": "standard", "normalize_activations": norm})
    f = ((X - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu()
    _check(load_any(tmp_path), f, f @ t["W_dec"] + t["b_dec"])


# ----- sparsify ------------------------------------------------------------------------------------
def _sparsify(path, k=K, seed=0):
    t = {"encoder.weight": _r(F, D, seed=seed), "encoder.bias": _r(F, seed=seed + 1, scale=0.1),
         "W_dec": _r(F, D, seed=seed + 2), "b_dec": _r(D, seed=seed + 3, scale=0.1)}
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"expansion_factor": 0, "normalize_decoder": True, "num_latents": F,
                                               "k": k, "multi_topk": False, "skip_connection": False, "d_in": D}))
    return t


def _sparsify_ref(t, k):
    pre = ((X - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]).relu()
    acts, idx = pre.topk(k, sorted=False)
    recon = (acts[..., None] * t["W_dec"][idx]).sum(-2) + t["b_dec"]  # sparse decode, as sparsify does
    return torch.zeros_like(pre).scatter(-1, idx, acts), recon


def test_sparsify(tmp_path):
    t = _sparsify(tmp_path)
    assert detect_format(tmp_path) == "sparsify"
    _check(load_any(tmp_path, d_in=D), *_sparsify_ref(t, K))


def test_sparsify_hookpoint_folders(tmp_path):
    t3 = _sparsify(tmp_path / "layers.3", k=3, seed=1)
    _sparsify(tmp_path / "layers.5", seed=2)
    with pytest.raises(DebiasError, match="several sub-folders .*layers.3, layers.5.*choose one with hookpoint"):
        load_any(tmp_path)
    sae = load_any(tmp_path, hookpoint="layers.3")
    assert sae.cfg.metadata["imported_from"]["hookpoint"] == "layers.3"
    _check(sae, *_sparsify_ref(t3, 3))
    solo = tmp_path / "solo"
    t = _sparsify(solo / "encoder.layer.7", seed=4)
    _check(load_any(solo), *_sparsify_ref(t, K))


# ----- dictionary_learning -------------------------------------------------------------------------
def _dl(path, cls, seed=0):
    path.mkdir(parents=True, exist_ok=True)
    thr = torch.tensor(0.15)
    if cls == "MatryoshkaBatchTopKSAE":
        sd = {"W_enc": _r(D, F, seed=seed), "b_enc": _r(F, seed=seed + 1, scale=0.1), "W_dec": _r(F, D, seed=seed + 2),
              "b_dec": _r(D, seed=seed + 3, scale=0.1), "threshold": thr, "k": torch.tensor(K, dtype=torch.int),
              "group_sizes": torch.tensor([8, 32])}
        enc_w, enc_b, dec_w = sd["W_enc"].T, sd["b_enc"], sd["W_dec"].T
    else:
        sd = {"encoder.weight": _r(F, D, seed=seed), "encoder.bias": _r(F, seed=seed + 1, scale=0.1),
              "decoder.weight": _r(D, F, seed=seed + 2), "b_dec": _r(D, seed=seed + 3, scale=0.1),
              "threshold": thr, "k": torch.tensor(K, dtype=torch.int)}
        enc_w, enc_b, dec_w = sd["encoder.weight"], sd["encoder.bias"], sd["decoder.weight"]
    torch.save(sd, path / "ae.pt")
    (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls, "k": K, "layer": 11, "lm_name": "clip"}}))
    post = ((X - sd["b_dec"]) @ enc_w.T + enc_b).relu()
    f = post * (post > thr)  # inference: scalar threshold, no top-k
    return f, f @ dec_w.T + sd["b_dec"]


@pytest.mark.parametrize("cls", ["BatchTopKSAE", "MatryoshkaBatchTopKSAE"])
def test_dictionary_learning(tmp_path, cls):
    f, recon = _dl(tmp_path, cls)
    sae = load_any(tmp_path, d_in=D)
    assert detect_format(tmp_path) == "dictionary_learning" and sae.threshold.ndim == 0
    _check(sae, f, recon)


def test_dictionary_learning_never_unpickles(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    torch.save({"W_enc": object()}, tmp_path / "ae.pt")  # arbitrary objects need full unpickling
    with pytest.raises(DebiasError, match="weights-only"):
        load_any(tmp_path)


# ----- native and common errors ------------------------------------------------------------------
def test_native_round_trip(tmp_path):
    sae = random_sae(D, F)
    sae.save(tmp_path)
    got = load_any(tmp_path, d_in=D)
    assert detect_format(tmp_path) == "debias-export"
    for name, t in sae.state_tensors().items():
        assert torch.equal(got.state_tensors()[name], t)


@pytest.mark.parametrize("make", ["saelens", "sparsify", "dl", "native"])
def test_width_mismatch_names_both_widths(tmp_path, make):
    {"saelens": lambda: _saelens(tmp_path, {"architecture": "standard"}), "sparsify": lambda: _sparsify(tmp_path),
     "dl": lambda: _dl(tmp_path, "BatchTopKSAE"), "native": lambda: random_sae(D, F).save(tmp_path)}[make]()
    with pytest.raises(ShapeError, match=f"width {D}.*site width is 16"):
        load_any(tmp_path, d_in=16)


def test_nan_weights_are_refused(tmp_path):
    _saelens(tmp_path, {"architecture": "standard"}, {"W_dec": torch.full((F, D), float("nan"))})
    with pytest.raises(DebiasError, match="NaN"):
        load_any(tmp_path)


def test_unknown_folder(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(DebiasError, match="not a known SAE layout"):
        load_any(tmp_path)
    with pytest.raises(DebiasError, match="not found"):
        load_any(tmp_path / "missing")


# ----- property tests: malformed input always gives DebiasError -----------------------------------
LAYOUTS = {
    "saelens": (lambda p: _saelens(p, {"architecture": "jumprelu"}, {"threshold": _r(F, seed=5)}), "sae_weights.safetensors", "cfg.json"),
    "sparsify": (_sparsify, "sae.safetensors", "cfg.json"),
    "dl": (lambda p: _dl(p, "MatryoshkaBatchTopKSAE"), "ae.pt", "config.json"),
    "native": (lambda p: random_sae(D, F).save(p), "sae.safetensors", "cfg.json"),
}
FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 100) | st.floats(allow_nan=True) | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=5)


def _fresh(layout):
    tmp = tempfile.TemporaryDirectory()
    LAYOUTS[layout][0](Path(tmp.name))
    return tmp, Path(tmp.name)


def _read_weights(path: Path):
    from debias_export.sae.model import read_safetensors

    return torch.load(path, weights_only=True) if path.suffix == ".pt" else read_safetensors(path)


def _write_weights(path: Path, tensors):
    if path.suffix == ".pt":
        torch.save(tensors, path)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


@FAST
@given(layout=st.sampled_from(sorted(LAYOUTS)), junk=st.binary(max_size=300), which=st.sampled_from(["weights", "cfg"]),
       truncate=st.booleans())
def test_garbage_bytes_give_debias_error(layout, junk, which, truncate):
    tmp, p = _fresh(layout)
    with tmp:
        target = p / LAYOUTS[layout][1 if which == "weights" else 2]
        data = target.read_bytes()
        target.write_bytes(data[: len(junk) % max(1, len(data))] if truncate else junk)
        with pytest.raises(DebiasError):
            load_any(p)


@FAST
@given(layout=st.sampled_from(sorted(LAYOUTS)), data=st.data())
def test_missing_or_misshapen_tensors_give_debias_error(layout, data):
    tmp, p = _fresh(layout)
    with tmp:
        wfile = p / LAYOUTS[layout][1]
        tensors = _read_weights(wfile)
        names = sorted(n for n, t in tensors.items() if t.is_floating_point() and t.ndim > 0)
        name = data.draw(st.sampled_from(names))
        old = tuple(tensors[name].shape)
        if data.draw(st.booleans()):
            del tensors[name]
        else:
            shape = data.draw(st.lists(st.integers(1, 45), min_size=1, max_size=3).map(tuple)
                              .filter(lambda s: s not in (old, old[::-1]) and not (name == "threshold" and s == (1,))))
            tensors[name] = torch.randn(shape)
        _write_weights(wfile, tensors)
        with pytest.raises(DebiasError):
            load_any(p)


@FAST
@given(layout=st.sampled_from(sorted(LAYOUTS)), data=st.data(), value=json_values)
def test_odd_config_values_never_crash(layout, data, value):
    tmp, p = _fresh(layout)
    with tmp:
        cfile = p / LAYOUTS[layout][2]
        cfg = json.loads(cfile.read_text())
        key = data.draw(st.sampled_from(sorted(cfg) + ["k", "architecture", "activation"]))
        cfg[key] = value
        cfile.write_text(json.dumps(cfg))
        try:
            sae = load_any(p)
        except DebiasError:
            return
        with torch.no_grad():  # whatever was accepted must be a working SAE
            assert torch.isfinite(sae(X)).all()


def test_json_not_an_object(tmp_path):
    _sparsify(tmp_path)
    (tmp_path / "cfg.json").write_text("[1, 2]")
    with pytest.raises(DebiasError, match="JSON object"):
        load_any(tmp_path)
    os.remove(tmp_path / "cfg.json")
    with pytest.raises(DebiasError):
        load_any(tmp_path)
