"""Property tests of the SAE importers: malformed configs, tensors of random shapes/dtypes/values and garbage
bytes give a DebiasError; an import that succeeds is consistent (shapes fit d_in, finite, decoder as given).
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from debias_export.core.errors import DebiasError
from debias_export.sae.importers import load_any

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

json_junk = st.recursive(st.none() | st.booleans() | st.integers() | st.integers(10**20, 10**30)
                         | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
                         lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                         max_leaves=8)

# (weights file, config file, {tensor name: role}) per layout; role says which shape is correct.
LAYOUTS = {
    "debias-export": ("sae.safetensors", "cfg.json", {"W_enc": "dF", "b_enc": "F", "W_dec": "Fd", "b_dec": "d", "threshold": "1"}),
    "saelens": ("sae_weights.safetensors", "cfg.json", {"W_enc": "dF", "b_enc": "F", "W_dec": "Fd", "b_dec": "d",
                                                        "threshold": "F", "log_threshold": "F", "scaling_factor": "F"}),
    "sparsify": ("sae.safetensors", "cfg.json", {"encoder.weight": "Fd", "encoder.bias": "F", "W_dec": "Fd", "b_dec": "d"}),
    "dictionary_learning": ("ae.pt", "config.json", {"encoder.weight": "Fd", "encoder.bias": "F", "decoder.weight": "dF",
                                                     "b_dec": "d", "threshold": "1", "k": "k", "W_enc": "dF", "b_enc": "F",
                                                     "W_dec": "Fd", "bias": "d"}),
}
DECODER = {"debias-export": ("W_dec", "Fd"), "saelens": ("W_dec", "Fd"), "sparsify": ("W_dec", "Fd"),
           "dictionary_learning": ("decoder.weight", "dF")}


def _base_cfg(fmt: str, d: int, F: int, k: int) -> dict:
    return {
        "debias-export": {"d_in": d, "num_latents": F, "activation": "threshold", "k": k},
        "saelens": {"architecture": "jumprelu", "d_in": d, "d_sae": F, "normalize_activations": "none"},
        "sparsify": {"k": k, "d_in": d, "activation": "topk"},
        "dictionary_learning": {"trainer": {"dict_class": "BatchTopKSAE", "k": k}},
    }[fmt]


CFG_KEYS = ["d_in", "num_latents", "activation", "k", "architecture", "d_sae", "normalize_activations", "activation_fn_str",
            "activation_fn_kwargs", "apply_b_dec_to_input", "rescale_acts_by_decoder_norm", "finetuning_scaling_factor",
            "transcode", "skip_connection", "reshape_activations", "trainer", "metadata", "group_fractions"]
CFG_VALUES = {"architecture": ["standard", "topk", "jumprelu", "batchtopk", "gated", "matryoshka_batchtopk"],
              "activation": ["threshold", "relu", "topk", "groupmax"], "activation_fn_str": ["relu", "topk", "tanh"],
              "dict_class": ["BatchTopKSAE", "MatryoshkaBatchTopKSAE", "AutoEncoderTopK", "AutoEncoder", "JumpReluSAE",
                             "JumpReluAutoEncoder", "GatedAutoEncoder", "AutoEncoderNew", "MatroyshkaBatchTopKSAE"]}


@st.composite
def sae_folders(draw):
    """(format, cfg, tensors, d, F, d_in) where any part may be broken."""
    fmt = draw(st.sampled_from(sorted(LAYOUTS)))
    d, F = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    k = draw(st.integers(1, F))
    cfg = _base_cfg(fmt, d, F, k)
    # Half the folders are well-formed, so the accepted path is exercised as much as the refusals.
    n_cfg_mutations = draw(st.integers(0, 3)) if draw(st.booleans()) else 0
    for _ in range(n_cfg_mutations):
        key = draw(st.sampled_from(CFG_KEYS))
        if key == "trainer" and draw(st.booleans()):
            cfg["trainer"] = {"dict_class": draw(st.sampled_from(CFG_VALUES["dict_class"])), "k": draw(st.integers(-2, F + 2))}
        elif key in CFG_VALUES and draw(st.booleans()):
            cfg[key] = draw(st.sampled_from(CFG_VALUES[key]))
        elif draw(st.booleans()):
            cfg.pop(key, None)
        else:
            cfg[key] = draw(json_junk)
    _, _, roles = LAYOUTS[fmt]
    broken = set(draw(st.lists(st.sampled_from(sorted(roles)), max_size=2))) if draw(st.booleans()) else set()
    sizes = {"d": (d,), "F": (F,), "dF": (d, F), "Fd": (F, d), "1": (), "k": ()}
    tensors = {}
    for name, role in roles.items():
        how = draw(st.sampled_from(["missing", "transposed", "random", "int", "half", "nonfinite"])) if name in broken else "ok"
        if how == "missing":
            continue
        shape = sizes[role][::-1] if how == "transposed" else sizes[role]
        if how == "random":
            shape = tuple(draw(st.lists(st.integers(0, 8), max_size=3)))
        if role == "k" and how != "random":
            tensors[name] = torch.tensor(k)
            continue
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        t = torch.randn(shape, generator=g) if shape else torch.randn((), generator=g).abs() * 0.1
        if how == "int":
            t = t.round().long()
        elif how == "half":
            t = t.half()
        elif how == "nonfinite" and t.numel():
            t.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        tensors[name] = t.contiguous()
    d_in = draw(st.sampled_from([None, d, d + 1]))
    return fmt, cfg, tensors, d, F, d_in


def _write(root: Path, fmt: str, cfg, tensors: dict) -> Path:
    w_name, c_name, _ = LAYOUTS[fmt]
    (root / c_name).write_text(json.dumps(cfg))
    if w_name.endswith(".pt"):
        torch.save(tensors, root / w_name)
    else:
        save_file(tensors, str(root / w_name))
    return root


def _check_consistent(sae, fmt: str, cfg, tensors: dict, d_in) -> None:
    """What an accepted import must satisfy: sizes agree with each other and with d_in, values finite,
    the decoder and b_dec are the file's own (unless the config asks to fold a scale into them)."""
    d, F = sae.d_in, sae.num_latents
    assert tuple(sae.W_enc.shape) == (d, F) and tuple(sae.W_dec.shape) == (F, d)
    assert tuple(sae.b_enc.shape) == (F,) and tuple(sae.b_dec.shape) == (d,)
    assert sae.threshold.numel() in (1, F)
    if d_in is not None:
        assert d == d_in
    for t in sae.state_tensors().values():
        assert torch.isfinite(t).all()
    x = torch.randn(3, d)
    assert sae(x).shape == (3, d) and torch.isfinite(sae(x)).all()
    if sae.cfg.activation == "topk":
        assert 0 < sae.cfg.k <= F
    dec_name, role = DECODER[fmt]
    if sae.cfg.metadata.get("imported_from", {}).get("dict_class") in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        dec_name, role = "W_dec", "Fd"
    folded = isinstance(cfg, dict) and (cfg.get("rescale_acts_by_decoder_norm") or cfg.get("finetuning_scaling_factor"))
    if not folded and dec_name in tensors and tensors[dec_name].dim() == 2:
        # The layout fixes the orientation (an nn.Linear decoder weight is [d, F]), square or not.
        want = tensors[dec_name].float() if role == "Fd" else tensors[dec_name].float().t()
        normalised = False
        if sae.cfg.metadata.get("imported_from", {}).get("dict_class") == "AutoEncoder":
            norms = want.norm(dim=1, keepdim=True)  # normalised like dictionary_learning's load_dictionary
            normalised = not torch.allclose(norms, torch.ones_like(norms))
            want = want / norms if normalised else want
        if normalised:  # recomputed here on another memory layout than the importer's: equal up to rounding
            torch.testing.assert_close(sae.W_dec, want, rtol=1e-6, atol=0.0)
        else:  # a copy, no arithmetic: exact
            assert torch.equal(sae.W_dec, want)
    bias = "bias" if fmt == "dictionary_learning" and sae.cfg.activation == "relu" else "b_dec"
    if bias in tensors:
        assert torch.equal(sae.b_dec, tensors[bias].float())


@FUZZ
@given(sae_folders())
def test_malformed_sae_folders_give_debias_error_or_a_consistent_sae(case):
    fmt, cfg, tensors, d, F, d_in = case
    root = Path(tempfile.mkdtemp(prefix="saefuzz"))
    try:
        _write(root, fmt, cfg, tensors)
        try:
            sae = load_any(root, d_in=d_in)
        except DebiasError as exc:
            assert str(exc) and "\n" not in str(exc)
            event(f"{fmt}: refused")
            return
        event(f"{fmt}: imported")
        _check_consistent(sae, fmt, cfg, tensors, d_in)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@FUZZ
@given(st.sampled_from(sorted(LAYOUTS)), st.sampled_from(["weights", "config", "both"]), st.binary(max_size=300))
def test_garbage_bytes_give_debias_error(fmt, which, blob):
    w_name, c_name, _ = LAYOUTS[fmt]
    root = Path(tempfile.mkdtemp(prefix="saegarbage"))
    try:
        d, F = 4, 6
        _write(root, fmt, _base_cfg(fmt, d, F, 2), {})
        if which in ("weights", "both"):
            (root / w_name).write_bytes(blob)
        if which in ("config", "both"):
            (root / c_name).write_bytes(blob)
        try:
            load_any(root, d_in=d)
        except DebiasError as exc:
            assert "\n" not in str(exc)
        else:
            raise AssertionError("garbage imported as an SAE")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@FUZZ
@given(json_junk)
def test_any_json_config_over_valid_weights_is_safe(cfg):
    """Valid SAELens weights, arbitrary cfg.json: DebiasError or a consistent SAE."""
    root = Path(tempfile.mkdtemp(prefix="saecfg"))
    try:
        d, F = 4, 6
        g = torch.Generator().manual_seed(0)
        tensors = {"W_enc": torch.randn(d, F, generator=g), "b_enc": torch.randn(F, generator=g),
                   "W_dec": torch.randn(F, d, generator=g), "b_dec": torch.randn(d, generator=g),
                   "threshold": torch.rand(F, generator=g)}
        _write(root, "saelens", cfg, tensors)
        try:
            sae = load_any(root, d_in=d)
        except DebiasError:
            return
        _check_consistent(sae, "saelens", cfg, tensors, d)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_truncated_weight_files_give_integrity_error(tmp_path):
    from debias_export.core.errors import IntegrityError

    for fmt in sorted(LAYOUTS):
        d, F = 4, 6
        _, _, roles = LAYOUTS[fmt]
        sizes = {"d": (d,), "F": (F,), "dF": (d, F), "Fd": (F, d), "1": ()}
        tensors = {n: (torch.tensor(2) if r == "k" else torch.rand(sizes[r])) for n, r in roles.items()}
        (tmp_path / fmt).mkdir()
        root = _write(tmp_path / fmt, fmt, _base_cfg(fmt, d, F, 2), tensors)
        w = root / LAYOUTS[fmt][0]
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        try:
            load_any(root, d_in=d)
        except IntegrityError as exc:
            assert "\n" not in str(exc) and str(w.name) in str(exc)
        else:
            raise AssertionError(f"{fmt}: truncated file imported")
