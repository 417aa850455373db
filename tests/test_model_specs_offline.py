"""Model specs resolve offline first (issue #17): every spec through ``debias_export.load_adapter``, a family's own
tiny spec through its ``load``, and a typo fails at once with a suggestion -- without any network attempt."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import debias_export as dx
from debias_export.adapters import load_adapter as family_load_adapter
from debias_export.adapters.dual_encoder import DualEncoderAdapter
from debias_export.adapters.hf_clip import HFCLIPAdapter
from debias_export.adapters.llava import LlavaAdapter
from debias_export.cli.main import main
from debias_export.core.choices import BUILTIN_MODEL_SPECS, HUB_ENV
from debias_export.core.specs import UnknownModelSpec, check_source, hub_allowed, hub_kwargs
from debias_export.workflow.model_specs import known_specs

ROOT = Path(__file__).resolve().parents[1]
TYPO = ("unknown model spec 'tiny-clipp' (did you mean 'tiny-clip'? local directory not found; hub access is off: "
        f"{HUB_ENV}=1 turns it on)")


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt is recorded and refused; hub access is off and HF's own offline switch is NOT set,
    so it is our gate, not huggingface_hub's offline mode, that keeps the network out."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or kwargs)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv(HUB_ENV, raising=False)
    return attempts


def test_the_public_loader_takes_every_builtin_spec():
    assert sorted(known_specs()) == sorted(BUILTIN_MODEL_SPECS)  # the CLI's parse-time list (no torch) is complete
    clip = dx.load_adapter("tiny-clip:1")
    assert isinstance(clip, HFCLIPAdapter) and clip.source == "tiny-clip:1"
    assert isinstance(dx.load_adapter("tiny-llava"), LlavaAdapter)
    assert isinstance(dx.load_adapter("tiny-dual-encoder"), DualEncoderAdapter)
    assert dx.load_adapter("biaslab").family == "hf_dual_encoder"


def test_biaslab_dir_loads_another_trained_lab(no_network, tmp_path):
    """``biaslab:DIR``: the committed second lab (seed 1) loads offline and differs from the shipped one;
    a folder without a lab is one DebiasError, not a hub lookup."""
    seed1 = ROOT / "benchmarks" / "results" / "biaslab" / "seed1"
    other = dx.load_adapter(f"biaslab:{seed1}")
    shipped = dx.load_adapter("biaslab")
    assert other.family == "hf_dual_encoder" and other.source == f"biaslab:{seed1}"
    w_other = dict(other.model.named_parameters())
    w_shipped = dict(shipped.model.named_parameters())
    assert w_other.keys() == w_shipped.keys()
    assert any(not (w_other[k] == w_shipped[k]).all() for k in w_other)  # a different lab, not the shipped one
    with pytest.raises(dx.DebiasError, match="recipe not found"):
        dx.load_adapter(f"biaslab:{tmp_path}")
    assert not no_network


def test_a_family_loader_builds_its_own_tiny_spec_and_points_elsewhere_for_the_rest(no_network):
    a, b = HFCLIPAdapter.load("tiny-clip:3"), dx.load_adapter("tiny-clip:3")
    assert a.source == "tiny-clip:3"
    assert all(x.equal(y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    for spec in ("biaslab", "tiny-llava", "arch:clip-vit-base-patch16"):
        with pytest.raises(dx.DebiasError, match=rf"not a hf_clip model spec: debias_export.load_adapter\('{spec}'\)"):
            HFCLIPAdapter.load(spec)
    with pytest.raises(dx.DebiasError, match="seed 'x' is not an integer"):
        HFCLIPAdapter.load("tiny-clip:x")
    assert not no_network


@pytest.mark.parametrize("load", [dx.load_adapter, HFCLIPAdapter.load, family_load_adapter], ids=["dx", "family", "registry"])
def test_a_typo_fails_at_once_with_a_suggestion_and_no_network(no_network, load):
    with pytest.raises(UnknownModelSpec) as err:
        load("tiny-clipp")
    assert str(err.value) == TYPO
    with pytest.raises(UnknownModelSpec, match=r"unknown model spec 'some-org/some-model' \(local directory not found; hub access is off"):
        load("some-org/some-model")  # a hub id: no built-in name is suggested for it
    assert no_network == []


def test_a_local_directory_loads_with_the_network_off(no_network, tmp_path):
    clip = dx.load_adapter("tiny-clip")
    clip.model.save_pretrained(tmp_path / "clip")
    again = dx.load_adapter(str(tmp_path / "clip"))
    assert isinstance(again, HFCLIPAdapter) and again.source == str(tmp_path / "clip")
    assert isinstance(HFCLIPAdapter.load(tmp_path / "clip"), HFCLIPAdapter)  # a Path works as well as a str
    assert isinstance(dx.load_adapter(tmp_path / "clip"), HFCLIPAdapter)
    assert no_network == []


def test_hub_access_is_opt_in(monkeypatch):
    monkeypatch.delenv(HUB_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not hub_allowed() and hub_kwargs() == {"local_files_only": True}
    monkeypatch.setenv(HUB_ENV, "1")
    assert hub_allowed() and hub_kwargs() == {}
    check_source("some-org/some-model")  # allowed: left to the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # huggingface_hub's own switch wins
    assert not hub_allowed()
    with pytest.raises(UnknownModelSpec, match="hub access is off: HF_HUB_OFFLINE=1"):
        check_source("some-org/some-model")


def test_the_cli_flag_turns_hub_access_on(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(HUB_ENV, raising=False)
    assert main(["--allow-hub", "verify", str(tmp_path)]) == 2  # any command: the flag sits on the group
    assert os.environ.get(HUB_ENV) == "1"
    monkeypatch.delenv(HUB_ENV)


def test_the_cli_refuses_a_typo_before_loading_torch(tmp_path):
    """Parse time, in a fresh interpreter: one line, exit 2, and torch was never imported (so: well under a second)."""
    code = ("import sys; from debias_export.cli.main import main; "
            f"rc = main(['patch', '--model', 'tiny-clipp', '--sae', {str(tmp_path)!r}, '--neurons', '1', '--out', 'x']); "
            "print('torch' in sys.modules, rc)")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.stdout.split() == ["False", "2"], out.stderr
    assert out.stderr.strip().splitlines() == [f"error: {TYPO}"]
