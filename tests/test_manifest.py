"""Manifests catch tampering, truncation, missing and smuggled files; atomic output directories."""
import json

import pytest

from debias_export import SAEEdit, apply_edits
from debias_export.core.errors import DebiasError, IntegrityError
from debias_export.export import export_patched, load_patched
from debias_export.export.manifest import atomic_output_dir, find_artifacts, verify_manifest, write_manifest
from debias_export.workflow.testing import random_sae


@pytest.fixture
def artifact(tmp_path):
    root = tmp_path / "art"
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (root / "sub" / "notes.txt").write_text("hello\n")
    write_manifest(root, kind="test", provenance={"seed": 1})
    return root


def test_clean_artifact_verifies(artifact):
    manifest = verify_manifest(artifact)
    assert set(manifest["files"]) == {"weights.bin", "sub/notes.txt"}
    assert manifest["files"]["weights.bin"]["size"] == 1024 and manifest["provenance"] == {"seed": 1}
    assert "torch" in manifest["versions"] and "python" in manifest["versions"]


def test_tampered_file_is_named(artifact):
    data = bytearray((artifact / "weights.bin").read_bytes())
    data[100] ^= 0x01  # one bit, same size
    (artifact / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"file weights.bin does not match its SHA-256"):
        verify_manifest(artifact)


def test_truncated_file_is_named(artifact):
    (artifact / "weights.bin").write_bytes((artifact / "weights.bin").read_bytes()[:500])
    with pytest.raises(IntegrityError, match=r"file weights.bin is truncated: 500 bytes"):
        verify_manifest(artifact)


def test_missing_and_extra_files(artifact):
    (artifact / "sub" / "notes.txt").unlink()
    with pytest.raises(IntegrityError, match=r"file sub/notes.txt .* is missing"):
        verify_manifest(artifact)
    (artifact / "sub" / "notes.txt").write_text("hello\n")
    verify_manifest(artifact)
    (artifact / "evil.py").write_text("import os\n")
    with pytest.raises(IntegrityError, match=r"file evil.py is not listed"):
        verify_manifest(artifact, allow_extra=True)  # code files are never tolerated
    (artifact / "evil.py").unlink()
    (artifact / "README.md").write_text("x")
    verify_manifest(artifact, allow_extra=True)
    with pytest.raises(IntegrityError, match="README.md is not listed"):
        verify_manifest(artifact)


def test_missing_or_corrupt_manifest(tmp_path, artifact):
    with pytest.raises(IntegrityError, match="has no manifest.json"):
        verify_manifest(tmp_path)
    (artifact / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="corrupt"):
        verify_manifest(artifact)


def test_nested_manifests_are_checked(tmp_path, artifact):
    bundle = tmp_path / "art"
    write_manifest(artifact / "sub", kind="inner")
    write_manifest(bundle, kind="outer")
    assert find_artifacts(bundle) == [bundle]
    verify_manifest(bundle)
    (artifact / "sub" / "notes.txt").write_text("HELLO\n")
    with pytest.raises(IntegrityError, match="notes.txt"):
        verify_manifest(bundle)


@pytest.fixture
def exported(tmp_path, clip):
    apply_edits(clip, SAEEdit(site="image.-1", sae=random_sae(32, 64), neurons=[1, 2]))
    return export_patched(clip, tmp_path / "hf")


@pytest.mark.parametrize("victim", ["model.safetensors", "debias_patches.safetensors", "modeling_debias.py",
                                    "debias_config.json"])
def test_load_patched_refuses_tampered_export(exported, victim):
    path = exported / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=victim.replace(".", r"\.")):
        load_patched(exported)


def test_load_patched_refuses_truncated_weights_even_without_manifest_check(exported):
    path = exported / "debias_patches.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(IntegrityError, match="debias_patches.safetensors is truncated"):
        load_patched(exported)
    with pytest.raises(IntegrityError, match="corrupt or truncated safetensors file .*debias_patches"):
        load_patched(exported, verify=False)


def test_verify_cli(exported, capsys):
    from debias_export.cli.main import main

    assert main(["verify", str(exported)]) == 0
    assert "file(s) match" in capsys.readouterr().out
    (exported / "config.json").write_text(json.dumps({"model_type": "clip"}))
    assert main(["verify", str(exported)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: file config.json") and "\n" not in err


def test_atomic_dir_success_failure_and_overwrite(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(DebiasError, match="already exists"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("boom")
    assert (out / "a").read_text() == "1"
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
