"""SAE imports against the libraries themselves, without the libraries installed.

Every folder under ``tests/fixtures/sae`` was written by SAELens 4/5/6, dictionary_learning 0.1.0, EleutherAI
sparsify 1.3 (and the VLM layouts) with their own classes and save functions, together with the library's own
latents and reconstruction on a fixed batch (``scripts/make_sae_fixtures.py``). ``load_any`` must reproduce
them to float32 rounding with identical active sets, and the imported SAE must compile into the fused edit
exactly, or refuse the case with one line naming what is and is not supported.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from debias_export.edits.sae.edit import SAEEdit, compile_sae_edit, reference_formula
from debias_export.core.errors import DebiasError
from debias_export.sae import load_any

ROOT = Path(__file__).parent / "fixtures" / "sae"
CASES = sorted(p.name for p in ROOT.iterdir() if (p / "case.json").is_file())
EXACT = [c for c in CASES if json.loads((ROOT / c / "case.json").read_text())["expect"] == "exact"]
REFUSE = [c for c in CASES if c not in EXACT]
TOL = 1e-5  # relative to the largest value: float32 rounding of the same formula computed in another order


def _case(name: str):
    meta = json.loads((ROOT / name / "case.json").read_text())
    load = dict(meta["load"])
    return meta, ROOT / name / load.pop("path"), load, load_file(str(ROOT / name / "expected.safetensors"))


def _close(got: torch.Tensor, want: torch.Tensor, what: str, skip: torch.Tensor | None = None) -> None:
    scale = max(want.abs().max().item(), 1.0)
    diff = (got - want).abs() if skip is None else (got - want).abs()[~skip]
    err = diff.max().item() if diff.numel() else 0.0
    assert err <= TOL * scale, f"{what}: max abs diff {err:.3g} (scale {scale:.3g})"


def _near_boundary(sae, x: torch.Tensor, tol: float) -> torch.Tensor:
    """Latents whose pre-activation lies within ``tol`` of where they start or stop firing: float rounding of
    another CPU or library may put them on either side (the fixtures have none closer than ~95x the rounding)."""
    lin = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.cfg.activation == "relu":
        return lin.abs() < tol
    if sae.cfg.activation == "threshold":
        return (lin - sae.threshold).abs() < tol
    pre = torch.relu(lin)
    v = pre.topk(sae.cfg.k + 1, dim=-1).values
    cut = (v[:, -2:-1] + v[:, -1:]) / 2  # between the k-th and the (k+1)-th value of each row
    return ((pre - cut).abs() < tol) | (pre < tol)


def test_fixture_set_is_complete_and_small():
    """The committed fixtures cover every library, and stay small enough to ship in the repo."""
    prefixes = {c.split("_")[0] for c in CASES}
    assert {"saelens6", "saelens5", "dl", "sparsify"} <= prefixes, prefixes
    size = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    assert size < 3_000_000, f"fixtures take {size} bytes"


@pytest.mark.parametrize("name", EXACT)
def test_library_fixture_imports_exactly(name, caplog):
    meta, path, load, exp = _case(name)
    with caplog.at_level(logging.WARNING, logger="debias_export.sae"):
        sae = load_any(path, **load)
    half = [r for r in caplog.records if "float32" in r.getMessage()]
    if "latents_native" in exp:  # a 16-bit save: imported in float32, said once
        assert len(half) == 1 and "\n" not in half[0].getMessage()
    else:
        assert not half
    x, lat, rec = exp["x"], exp["latents"], exp["recon"]
    with torch.no_grad():
        f, r = sae.encode(x), sae(x)
    active = lat != 0
    assert active.any() and not active.all(), "fixture latents are all zero or all active: the check would be vacuous"
    # The active sets must be identical, except where a latent sits within float rounding of its firing boundary
    # (a discrete decision on rounded numbers: another CPU may round it to the other side). A wrong import flips
    # latents far from any boundary (thousands of them in the bugs this guards against).
    flips = (f != 0) != active
    near = _near_boundary(sae, x, TOL * max(lat.abs().max().item(), 1.0))
    assert not (flips & ~near).any(), f"active sets differ in {int((flips & ~near).sum())} places away from any boundary"
    _close(f, lat, "latents", skip=flips)
    _close(r, rec, "reconstruction")


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("mode", ["reconstruct", "residual"])
def test_library_fixture_compiles_into_the_fused_edit(name, mode):
    """What ``patch`` builds from the import: the fused module equals the edit formula on the same SAE."""
    _, path, load, exp = _case(name)
    sae = load_any(path, **load)
    edit = SAEEdit(site="image.0", sae=sae, neurons=[0, sae.num_latents // 2], alpha=0.7, value=0.5, mode=mode)
    fused = compile_sae_edit(edit, None, None)
    with torch.no_grad():
        _close(fused(exp["x"]), reference_formula(edit, exp["x"]), f"fused {mode} edit")


@pytest.mark.parametrize("name", REFUSE)
def test_library_fixture_is_refused_clearly(name):
    meta, path, load, _ = _case(name)
    with pytest.raises(DebiasError) as info:
        load_any(path, **load)
    msg = str(info.value)
    assert "\n" not in msg and meta["expect"]["refuse"] in msg
    assert "not supported (supported:" in msg or "config.json" in msg, msg


def test_run_folders_need_a_hookpoint():
    """A sparsify run with several hookpoints / seeds names them all and asks for one."""
    for name, first in (("sparsify_run", "h.0"), ("sparsify_run_seeds", "h.0/seed0")):
        with pytest.raises(DebiasError, match=f"several sub-folders \\({first}, .*choose one with hookpoint"):
            load_any(ROOT / name / "files")
    with pytest.raises(DebiasError, match="no SAE 'h.7' under .*found: h.0/seed0, h.0/seed1"):
        load_any(ROOT / "sparsify_run_seeds" / "files", hookpoint="h.7")


def test_patch_takes_a_hookpoint(tmp_path, capsys):
    """``debias-export patch --hookpoint`` picks one SAE of a sparsify run folder (width 32, like tiny-clip)."""
    from debias_export.cli.main import main

    run = str(ROOT / "sparsify_run_seeds" / "files")
    base = ["patch", "--model", "tiny-clip", "--sae", run, "--site", "image.1", "--neurons", "1,5"]
    assert main([*base, "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--hookpoint h.0/seed0" in err
    assert not (tmp_path / "none").exists()
    assert main([*base, "--hookpoint", "h.0/seed1", "--out", str(tmp_path / "edit")]) == 0
    cfg = json.loads((tmp_path / "edit" / "edit_config.json").read_text())
    assert cfg["provenance"]["hookpoint"] == "h.0/seed1"
    assert cfg["sae_config"]["metadata"]["imported_from"]["path"].endswith("h.0/seed1")
