"""scripts/share_dists.py: the second venv gets hard links to the first one's lock-identical torch stack."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "share_dists.py"
spec = importlib.util.spec_from_file_location("share_dists", SCRIPT)
share_dists = importlib.util.module_from_spec(spec)
spec.loader.exec_module(share_dists)

SITE = "lib/python3.11/site-packages"


def fake_dist(venv: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """A pip-installed distribution: its files, METADATA and a RECORD listing them (paths relative to site)."""
    site = venv / SITE
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nbody\n".encode()}
    for rel, data in files.items():
        p = Path(os.path.normpath(site / rel))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    record = "".join(f"{rel},,\n" for rel in [*files, f"{info}/RECORD"])
    (site / info / "RECORD").write_text(record)


@pytest.fixture
def venvs(tmp_path):
    src, dst = tmp_path / ".venv", tmp_path / ".venv-compat"
    (dst / SITE).mkdir(parents=True)
    fake_dist(src, "torch", "2.14.1", {
        "torch/__init__.py": b"x = 1\n",
        "torch/__pycache__/__init__.cpython-311.pyc": b"compiled with the other venv's paths",
        "torch/lib/libtorch.so": b"\0" * 64,
        "../../../bin/torchrun": f"#!{src}/bin/python\nimport torch\n".encode(),
    })
    fake_dist(src, "nvidia-cublas", "13.1.1.3", {"nvidia/cublas/lib/libcublas.so": b"\1" * 32})
    fake_dist(src, "triton", "3.7.0", {"triton/__init__.py": b""})           # lock pins another version
    fake_dist(src, "transformers", "5.24.0", {"transformers/__init__.py": b""})  # not in the torch stack
    (src / "bin/torchrun").chmod(0o755)
    lock = tmp_path / "constraints-compat.txt"
    lock.write_text("nvidia-cublas==13.1.1.3\ntorch==2.14.1  # same build\ntransformers==5.24.0\ntriton==3.8.0\n")
    return src, dst, lock


def test_links_the_pinned_torch_stack_and_nothing_else(venvs):
    src, dst, lock = venvs
    assert share_dists.main([str(src), str(dst), str(lock)]) == 0
    s, d = src / SITE, dst / SITE
    for rel in ["torch/__init__.py", "torch/lib/libtorch.so", "nvidia/cublas/lib/libcublas.so",
                "torch-2.14.1.dist-info/METADATA", "torch-2.14.1.dist-info/RECORD"]:
        assert os.path.samefile(s / rel, d / rel), rel
    assert not (d / "torch/__pycache__").exists()      # Python compiles TO's own
    assert not (d / "triton").exists() and not list(d.glob("triton-*"))  # version differs from the lock
    assert not (d / "transformers").exists()           # not part of the shared stack
    script = dst / "bin/torchrun"
    assert script.read_text().splitlines()[0] == f"#!{dst}/bin/python"
    assert not os.path.samefile(script, src / "bin/torchrun") and os.access(script, os.X_OK)


def test_a_dist_already_in_the_target_is_left_alone(venvs):
    src, dst, lock = venvs
    fake_dist(dst, "torch", "2.14.1", {"torch/__init__.py": b"mine\n"})
    share_dists.main([str(src), str(dst), str(lock)])
    assert (dst / SITE / "torch/__init__.py").read_bytes() == b"mine\n"
    assert os.path.samefile(src / SITE / "nvidia/cublas/lib/libcublas.so", dst / SITE / "nvidia/cublas/lib/libcublas.so")


def test_a_failed_link_leaves_no_half_distribution(venvs, monkeypatch):
    src, dst, lock = venvs
    calls, real_link = [], os.link

    def link(a, b):
        calls.append(b)
        if len(calls) == 5:  # nvidia-cublas's 3 files, then torch's __init__.py, then its library
            raise OSError(18, "Invalid cross-device link")
        real_link(a, b)

    monkeypatch.setattr(share_dists.os, "link", link)
    assert share_dists.main([str(src), str(dst), str(lock)]) == 0
    d = dst / SITE
    # nvidia-cublas (sorted first) is whole; torch failed part-way and left nothing behind, so pip installs it
    assert (d / "nvidia/cublas/lib/libcublas.so").exists() and list(d.glob("nvidia_cublas-*.dist-info"))
    assert not list(d.glob("torch-*.dist-info")) and not (d / "torch/__init__.py").exists()


def test_no_other_venv_is_a_no_op(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("torch==2.14.1\n")
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none"), str(tmp_path / "new"), str(lock)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
