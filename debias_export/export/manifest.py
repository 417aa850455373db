"""Artifact manifests (SHA-256 + size of every file) and atomic output directories.

Every exported directory carries ``manifest.json``. :func:`verify_manifest` re-hashes the files so a
tampered, truncated, missing or smuggled-in file (remote code runs on load!) is caught before a
model is built from it. The manifest does not protect itself: anyone who can rewrite it can
rewrite the files; it guards against corruption and accidental edits, not against an attacker.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from ..core.errors import DebiasError, IntegrityError
from ..core.fileio import (
    DiskFullError,
    apply_default_modes,
    claim,
    disk_full,
    refuse_existing,
    remove_stale_temp_dirs,
    temp_names,
)
from ..core.version import __version__

MANIFEST = "manifest.json"
FORMAT = "debias-export-manifest/1"
# Packages whose versions decide whether an artifact reproduces; recorded in every manifest.
VERSIONED_PACKAGES = ("debias-export", "torch", "transformers", "safetensors", "onnx", "onnxruntime", "optimum",
                      "optimum-onnx", "open_clip_torch", "numpy")
_IGNORED = {"__pycache__", ".DS_Store"}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that matter for reproducing an artifact."""
    out = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if "debias-export" not in out:  # running from a source tree that is not pip-installed
        out["debias-export"] = __version__
    return out


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _listed_files(root: Path) -> list[Path]:
    files = []
    for p in sorted(root.rglob("*")):
        if any(part in _IGNORED for part in p.relative_to(root).parts):
            continue
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST:
            files.append(p)
    return files


def write_manifest(root: str | Path, kind: str, provenance: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file under ``root`` (recursively, nested manifests included) into ``root/manifest.json``."""
    root = Path(root)
    files = {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
             for p in _listed_files(root)}
    manifest = {"format": FORMAT, "kind": kind, "files": files, "versions": package_versions(),
                "provenance": provenance or {}, **(extra or {})}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{root} has no {MANIFEST}; it is not a debias-export artifact")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise IntegrityError(f"corrupt {path}: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"corrupt {path}: no 'files' table")
    return manifest


def verify_manifest(root: str | Path, allow_extra: bool = False) -> dict[str, Any]:
    """Check every file against ``root/manifest.json`` (and nested manifests); raise naming the first bad file.

    Returns the manifest. ``allow_extra``: tolerate files the manifest does not list (never ``.py``
    files, which transformers would execute as remote code).
    """
    root = Path(root)
    manifest = read_manifest(root)
    for rel, entry in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            raise IntegrityError(f"file {rel} listed in {root / MANIFEST} is missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            what = "truncated" if size < int(entry.get("size", 0)) else "changed size"
            raise IntegrityError(f"file {rel} is {what}: {size} bytes, manifest says {entry.get('size')}")
        if sha256_file(path) != entry.get("sha256"):
            raise IntegrityError(f"file {rel} does not match its SHA-256 in {root / MANIFEST} (tampered or corrupt)")
    for path in _listed_files(root):
        rel = path.relative_to(root).as_posix()
        if rel not in manifest["files"] and (not allow_extra or path.suffix == ".py"):
            raise IntegrityError(f"file {rel} is not listed in {root / MANIFEST}")
    for nested in sorted(root.rglob(f"*/{MANIFEST}")):
        verify_manifest(nested.parent, allow_extra=allow_extra)
    return manifest


# Files only an exported artifact holds: a directory with one of them and no manifest has lost its manifest.
ARTIFACT_MARKERS = ("debias_config.json", "onnx_report.json", "export_report.json")
BUNDLE_PARTS = ("hf", "onnx")


def _looks_exported(path: Path) -> bool:
    """An export (hf/, onnx/ or a bundle of them): it must carry a manifest, whatever else it holds."""
    return any((path / m).is_file() for m in ARTIFACT_MARKERS) or any(
        (path / part).is_dir() and any((path / part / m).is_file() for m in ARTIFACT_MARKERS) for part in BUNDLE_PARTS)


def _missing_manifests(root: Path) -> list[Path]:
    """Export directories at or under ``root`` (itself, its bundle parts) that lack ``manifest.json``."""
    out = [root] if _looks_exported(root) and not (root / MANIFEST).is_file() else []
    for part in BUNDLE_PARTS:
        sub = root / part
        if sub.is_dir() and _looks_exported(sub) and not (sub / MANIFEST).is_file():
            out.append(sub)
    return out


def find_artifacts(root: str | Path) -> list[Path]:
    """The artifacts to verify under ``root``: ``root`` itself when it is an export (or has a manifest),
    else its immediate sub-directories that are.

    An export directory (``debias_config.json``, ``onnx_report.json``, a bundle's ``export_report.json``
    or ``hf/`` / ``onnx/`` parts) without its ``manifest.json`` is an error naming it: verifying only the
    parts that still have one would pass files nobody hashed.
    """
    root = Path(root)
    if not root.is_dir():
        raise DebiasError(f"{root} is not a directory")
    candidates = [root] if (root / MANIFEST).is_file() or _looks_exported(root) else \
        [p for p in sorted(root.iterdir()) if p.is_dir() and ((p / MANIFEST).is_file() or _looks_exported(p))]
    for artifact in candidates:
        missing = _missing_manifests(artifact)
        if missing:
            raise IntegrityError(f"{missing[0] / MANIFEST} is missing: {missing[0]} is an export whose files "
                                 "can no longer be verified (re-export it, or restore the manifest)")
    if not candidates:
        raise IntegrityError(f"{root} has no {MANIFEST} (nor sub-directories with one)")
    return candidates


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp dir next to ``out_dir``; on success it replaces ``out_dir`` in one rename.

    On any exception the temp dir is deleted and an existing ``out_dir`` is left untouched. With
    ``overwrite`` the old directory is moved aside only after the new one is complete, then removed.
    Temp dirs that an earlier, killed run left next to ``out_dir`` are removed first
    (:func:`~debias_export.core.fileio.remove_stale_temp_dirs`); files are published with the umask's mode
    (:func:`~debias_export.core.fileio.apply_default_modes`); a full disk is one :class:`DiskFullError` line.
    """
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp, old, owner = temp_names(out_dir)
    claim(owner)  # before the dir exists: a kill at any point leaves something a later run can attribute
    try:
        tmp.mkdir()
        yield tmp
        apply_default_modes(tmp)
        refuse_existing(out_dir, overwrite)  # something else may have created it meanwhile
        moved = False
        if out_dir.exists():
            out_dir.rename(old)
            moved = True
        try:
            tmp.rename(out_dir)
        except OSError:
            if moved:
                old.rename(out_dir)
            raise
        if moved:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):  # nested atomic dirs: name the outermost, the one the user asked for
            raise DiskFullError(out_dir) from None
        raise
    finally:
        owner.unlink(missing_ok=True)


def stable_report(report: Any) -> Any:
    """``report`` without what changes from run to run of the same inputs (wall-clock ``*seconds`` and the
    output path ``out``), for the report files an artifact hashes: re-running a recipe must give the same bytes.
    The returned (in-memory) reports keep them."""
    if isinstance(report, dict):
        return {k: stable_report(v) for k, v in report.items() if not (k.endswith("seconds") or k == "out")}
    if isinstance(report, list):
        return [stable_report(v) for v in report]
    return report


RECIPE_KEYS = ("recipe_text", "recipe_sha256")


def recipe_record(provenance: dict[str, Any] | None) -> dict[str, Any]:
    """``recipe_text`` / ``recipe_sha256`` of the recipe file a provenance names (``"recipe"``), for ``reproduce``:
    the manifest then holds everything needed to re-run it, even after the file moved or changed. Empty when
    there is no readable recipe file."""
    path = Path(str((provenance or {}).get("recipe") or ""))
    if not (provenance or {}).get("recipe") or not path.is_file():
        return {}
    return {"recipe_text": path.read_text(encoding="utf-8"), "recipe_sha256": sha256_file(path)}


def compare_artifacts(expected: str | Path, got: str | Path) -> dict[str, list[str]]:
    """Compare two artifacts file by file through their manifests (nested manifests included as files).

    Returns ``same`` / ``differs`` / ``missing`` (in ``expected`` only) / ``extra`` (in ``got`` only) lists of
    relative paths; ``manifest.json`` itself is compared too (package versions, provenance; not the recipe's
    own record, :data:`RECIPE_KEYS`).
    """
    a, b = read_manifest(expected), read_manifest(got)
    out: dict[str, list[str]] = {"same": [], "differs": [], "missing": [], "extra": []}
    for rel in sorted(set(a["files"]) | set(b["files"])):
        if rel not in b["files"]:
            out["missing"].append(rel)
        elif rel not in a["files"]:
            out["extra"].append(rel)
        else:
            out["same" if a["files"][rel].get("sha256") == b["files"][rel].get("sha256") else "differs"].append(rel)
    # the recipe's own record is left out: a re-run reads the recorded text, not the (maybe gone) file
    for m in (a, b):
        for key in RECIPE_KEYS:
            (m.get("provenance") or {}).pop(key, None)
    out["same" if a == b else "differs"].append(MANIFEST)
    return out
