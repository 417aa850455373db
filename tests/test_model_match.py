"""What an SAE / edit was made for (model family, architecture fingerprint, site) and the check on use."""
import json
import logging

import pytest

from debias_export import SAEEdit, apply_edits
from debias_export.core.errors import ConfigError
from debias_export.export import export_patched, load_patched
from debias_export.core.model_match import (allow_mismatch, arch_fingerprint, check_made_for, model_fingerprint,
                                            record_of)
from debias_export.workflow.testing import random_sae, tiny_clip


def test_fingerprint_is_the_architecture_not_the_weights(clip, tmp_path):
    from debias_export.adapters.open_clip_family import tiny_open_clip

    fp = model_fingerprint(clip)
    assert fp["family"] == "hf_clip" and len(fp["arch"]) == 16
    assert model_fingerprint(tiny_clip(seed=5)) == fp  # other weights, same architecture
    apply_edits(clip, SAEEdit(site="image.-1", sae=random_sae(32, 64), neurons=[1]))
    assert model_fingerprint(load_patched(export_patched(clip, tmp_path / "hf"))) == fp  # an export of it, reloaded
    other = tiny_open_clip()
    assert other.width("image") == clip.width("image")  # same width: the case the fingerprint is for
    assert model_fingerprint(other)["family"] == "open_clip" and arch_fingerprint(other) != fp["arch"]


def test_record_of_reads_sae_metadata_edit_provenance_and_old_captures():
    assert record_of({"site": "image.2.resid_post", "tower": "image", "model_fingerprint": {"family": "hf_clip", "arch": "ab"},
                      "training": {}}) == {"site": "image.2.resid_post", "tower": "image", "family": "hf_clip", "arch": "ab"}
    assert record_of({"model": {"family": "open_clip", "source": "x"}}) == {"family": "open_clip"}  # capture before fingerprints
    assert record_of({"model": "tiny-clip", "model_fingerprint": None}) == {}  # a spec string says nothing checkable
    assert record_of(None) == {} and record_of({"imported_from": {"library": "saelens"}}) == {}


def test_check_refuses_or_warns_once_when_allowed(clip, caplog):
    site = clip.resolve_site("text.-1")
    rec = {"site": "image.-1", "family": "hf_clip", "arch": arch_fingerprint(clip)}
    with pytest.raises(ConfigError, match=r"site image\.2\.resid_post vs text\.2\.resid_post.*--allow-mismatch"):
        check_made_for("the SAE", rec, clip, site)
    assert check_made_for("the SAE", rec, clip, clip.resolve_site("image.2")) == []  # -1 and 2 are the same block
    with caplog.at_level(logging.WARNING, logger="debias_export"), allow_mismatch():
        for _ in range(3):  # an alpha sweep applies the edit again and again
            assert check_made_for("the SAE", rec, clip, site)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "used anyway (--allow-mismatch)" in warnings[0]
    with pytest.raises(ConfigError):  # the override ends with its block
        check_made_for("the SAE", rec, clip, site)


def test_check_names_each_difference(clip):
    with pytest.raises(ConfigError, match="site image.9 \\(not a site of this model\\)"):
        check_made_for("the SAE", {"site": "image.9"}, clip, clip.resolve_site("image.1"))
    with pytest.raises(ConfigError, match="tower text vs image"):
        check_made_for("the SAE", {"tower": "text"}, clip, clip.resolve_site("image.1"))
    with pytest.raises(ConfigError, match="architecture fingerprint 0{16} vs"):
        check_made_for("the edit", {"family": "hf_clip", "arch": "0" * 16}, clip)
    assert check_made_for("the edit", {}, clip) == []  # nothing recorded (imported SAE, older file): nothing to check


def test_patch_records_the_fingerprint_and_export_accepts_the_same_model(tmp_path, capsys):
    from debias_export.cli.main import main
    from debias_export.edits import load_edit

    sae = random_sae(32, 64)
    sae.cfg.metadata = {"site": "image.2.resid_post", "tower": "image", "model_fingerprint": model_fingerprint(tiny_clip())}
    sae.save(tmp_path / "sae")
    assert main(["patch", "--model", "tiny-clip", "--sae", str(tmp_path / "sae"), "--neurons", "1", "--out", str(tmp_path / "e")]) == 0
    edit = load_edit(tmp_path / "e")
    assert edit.site == "image.2.resid_post"  # taken from the SAE's metadata
    assert edit.provenance["model_fingerprint"] == model_fingerprint(tiny_clip())
    cfg = json.loads((tmp_path / "e" / "edit_config.json").read_text())
    assert cfg["sae_config"]["metadata"]["tower"] == "image"
    apply_edits(tiny_clip(seed=3), edit).remove()  # same architecture, other weights: accepted
    assert "warning" not in capsys.readouterr().err
