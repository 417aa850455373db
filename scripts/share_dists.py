"""Seed a new venv with hard links to another venv's copy of the big, lock-identical distributions.

Both locks pin the same torch build, and torch with its CUDA wheels (nvidia-*, cuda-*, triton) is about 5 GB of
the 6 GB a venv takes; CI sets up two venvs on a machine whose free disk is not fixed, and ran out of it once.
A hard link costs no space, and pip, finding the pinned version already installed, leaves it alone.

    python scripts/share_dists.py FROM_VENV TO_VENV LOCK

Shares a distribution only if its name matches SHARED, FROM has exactly the version LOCK pins, and TO does not
have it yet. Runs with the standard library alone (before TO has anything in it). Leaves out compiled
`__pycache__` files (they record FROM's paths; Python writes TO's own on first import) and rewrites the
interpreter line of console scripts to TO's python. Never leaves half a distribution: its dist-info (what
pip reads to decide it is installed) is linked last, and a failure removes what was linked for it. When
linking is impossible (another file system), it says so and does nothing; pip then installs as usual.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from pathlib import Path

SHARED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def normalize(name: str) -> str:
    """PEP 503 name normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lock: Path) -> dict[str, str]:
    """`name==version` lines of a pip constraints file, by normalized name."""
    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def site_packages(venv: Path) -> Path | None:
    """The venv's only lib/pythonX.Y/site-packages, or None."""
    found = sorted(venv.glob("lib/python*/site-packages"))
    return found[0] if len(found) == 1 else None


def dist_name_version(dist_info: Path) -> tuple[str, str] | None:
    """Name and version from a dist-info's METADATA."""
    name = version = None
    try:
        with open(dist_info / "METADATA", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                if line.startswith("Name:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("Version:"):
                    version = line.split(":", 1)[1].strip()
    except OSError:
        return None
    return (normalize(name), version) if name and version else None


def _record_paths(dist_info: Path) -> list[str]:
    with open(dist_info / "RECORD", newline="", encoding="utf-8") as f:
        return [row[0] for row in csv.reader(f) if row]


def _link_one(src: Path, dst: Path, src_python: str, dst_python: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.parent.name == "bin":
        # a console script names its venv's interpreter on its first line: TO gets its own copy naming TO's
        data = src.read_bytes()
        first, nl, rest = data.partition(b"\n")
        if first.startswith(b"#!") and src_python.encode() in first:
            first = first.replace(src_python.encode(), dst_python.encode())
        dst.write_bytes(first + nl + rest)
        dst.chmod(src.stat().st_mode & 0o777)
    else:
        os.link(src, dst)


def share_dist(dist_info: Path, src_site: Path, dst_site: Path, src_venv: Path, dst_venv: Path) -> int:
    """Link one distribution's files from src_site into dst_site; returns the number of files."""
    src_python, dst_python = str(src_venv / "bin" / "python"), str(dst_venv / "bin" / "python")
    paths = [p for p in _record_paths(dist_info) if "__pycache__" not in Path(p).parts]
    meta_dir = dist_info.name
    # the dist-info last: until it exists pip does not consider the distribution installed
    paths.sort(key=lambda p: Path(p).parts[0] == meta_dir)
    done: list[Path] = []
    try:
        for rel in paths:
            src = (src_site / rel).resolve()
            dst = Path(os.path.normpath(dst_site / rel))
            if not src.is_file():
                continue
            # only inside TO's venv: a RECORD path that leaves it is not ours to write
            if not dst.is_relative_to(dst_venv):
                continue
            _link_one(src, dst, src_python, dst_python)
            done.append(dst)
    except OSError:
        for p in reversed(done):
            p.unlink(missing_ok=True)
        raise
    return len(done)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: share_dists.py FROM_VENV TO_VENV LOCK", file=sys.stderr)
        return 2
    src_venv, dst_venv, lock = Path(argv[0]).absolute(), Path(argv[1]).absolute(), Path(argv[2])
    src_site, dst_site = site_packages(src_venv), site_packages(dst_venv)
    if src_site is None or dst_site is None or src_site.relative_to(src_venv) != dst_site.relative_to(dst_venv):
        return 0  # no other venv, or another Python: nothing to share
    pins = read_pins(lock)
    have = {nv[0] for d in dst_site.glob("*.dist-info") if (nv := dist_name_version(d))}
    count = 0
    for dist_info in sorted(src_site.glob("*.dist-info")):
        nv = dist_name_version(dist_info)
        if not nv or not SHARED.match(nv[0]) or pins.get(nv[0]) != nv[1] or nv[0] in have:
            continue
        try:
            count += share_dist(dist_info, src_site, dst_site, src_venv, dst_venv)
        except OSError as e:
            print(f"share_dists: not sharing {nv[0]} ({e.strerror or e}); pip installs it", file=sys.stderr)
            return 0
    if count:
        print(f"share_dists: {count} files of {src_venv.name}'s torch stack hard-linked into {dst_venv.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
