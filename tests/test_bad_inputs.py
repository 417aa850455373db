"""Table-driven bad inputs: every user mistake is ONE line ``error: ...`` naming the problem, exit code 2.

The tables live in ``tests/bad_input_cases.py``. CLI cases run in-process through
``debias_export.cli.main.main(argv)`` (stderr via capsys); two run as a real subprocess (exit status, ``--debug``
traceback, SIGKILL). API cases check the exception type and its one-line message. Handled cases are bad inputs
that are processed correctly instead (blank labels skipped and counted, 16-bit images scaled, ...). Below the
tables: exports interrupted or out of disk, stale temp dirs, file modes.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError

from bad_input_cases import (API_CASES, CLI_CASES, ENOSPC_SAFETENSORS, HANDLED_CASES, ROOT, CliCase, HandledCase, _fail_with,
                             _patched, _snapshot, build_workspace, capture_argv, copy_bundle, existing_capture, image_csv,
                             prompts)
from debias_export import DebiasError
from debias_export.export import export_onnx, export_patched


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("ws"))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from debias_export.cli.main import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, words: tuple[str, ...]) -> None:
    lines = err.strip("\n").splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input(case: CliCase, ws, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = case.argv(tmp_path, ws)
    if case.setup is not None:
        case.setup(monkeypatch)
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, case.words)


@pytest.mark.parametrize("case", HANDLED_CASES, ids=[c.id for c in HANDLED_CASES])
def test_bad_input_handled(case: HandledCase, ws, tmp_path, capsys, monkeypatch):
    from debias_export.cli.main import main

    monkeypatch.chdir(tmp_path)

    def cli(argv: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    case.check(tmp_path, ws, cli)


def test_cli_output_exists_leaves_previous_capture_intact(tmp_path, capsys):
    out = existing_capture(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = run_cli([*capture_argv(tmp_path, "--texts", str(prompts(tmp_path))), "--k", "3"], capsys)
    assert_one_line_error(code, err, ("--overwrite",))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "debias_export.cli.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=_env())


def test_subprocess_exit_code_and_debug_traceback(tmp_path):
    csv = image_csv(tmp_path, [("a.png", "Male"), ("missing.png", "Female")])
    plain = _subprocess(capture_argv(tmp_path, "--images", str(csv)), tmp_path)
    assert_one_line_error(plain.returncode, plain.stderr, ("image file not found",))
    debug = _subprocess(["--debug", *capture_argv(tmp_path, "--images", str(csv))], tmp_path)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "image file not found" in debug.stderr


@pytest.mark.parametrize("case_id,call,exc_type,words", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case_id, call, exc_type, words, tmp_path, clip, ws):
    with pytest.raises(exc_type) as info:
        call(tmp_path, clip, ws)
    msg = str(info.value)
    assert msg and "\n" not in msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)


# ----- disk full / interrupted exports: one-line error, previous artifact intact, no partial directory ----
@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "interrupt"])
def test_failed_export_keeps_previous_artifact_and_leaves_no_partial_dir(clip, tmp_path, monkeypatch, exc):
    from debias_export.export import safetensors_export

    out = export_patched(_patched(clip), tmp_path / "hf")
    before = _snapshot(out)
    monkeypatch.setattr(safetensors_export, "save_file", _fail_with(exc))
    with pytest.raises((type(exc), DebiasError)):
        export_patched(clip, out, overwrite=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no .hf.tmp-* / .hf.old-* left behind


def test_failed_onnx_export_leaves_nothing(clip, tmp_path, monkeypatch):
    from debias_export.export import onnx_export

    monkeypatch.setattr(onnx_export, "write_manifest", _fail_with(OSError(28, "No space left on device")))
    with pytest.raises((OSError, DebiasError)):
        export_onnx(_patched(clip), tmp_path / "onnx", towers=["image"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), ENOSPC_SAFETENSORS], ids=["oserror", "safetensors"])
def test_cli_disk_full_is_one_line_exit_2_and_keeps_previous_bundle(ws, tmp_path, capsys, monkeypatch, exc):
    from debias_export.export import safetensors_export

    bundle = copy_bundle(tmp_path, ws)
    before = _snapshot(bundle)
    monkeypatch.setattr(safetensors_export, "save_file", _fail_with(exc))
    code, err = run_cli(["export", "--model", "tiny-clip", "--edit", str(ws / "edit"), "--out", str(bundle), "--tower", "image",
                         "--overwrite"], capsys)
    assert _snapshot(bundle) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert_one_line_error(code, err, (f"no space left on device while writing {bundle}; nothing was changed",))


def test_api_disk_full_from_safetensors_is_a_debias_error(clip, tmp_path, monkeypatch):
    from debias_export.export import safetensors_export

    monkeypatch.setattr(safetensors_export, "save_file", _fail_with(SafetensorError("IoError: No space left on device (os error 28)")))
    with pytest.raises(DebiasError, match="no space left on device while writing .*hf; nothing was changed"):
        export_patched(_patched(clip), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


# ----- temp dirs left by a killed export are removed by the next run (only ours, only stale) -------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp_dir(parent: Path, name: str, pid: int, tag: str, host: str | None = None) -> Path:
    d = parent / f".{name}.tmp-{pid}-{tag}"
    (d / "hf").mkdir(parents=True)
    (d / "hf" / "model.safetensors").write_bytes(b"x" * 1000)
    (parent / f".{name}.owner-{pid}-{tag}").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    return d


def test_stale_temp_dirs_are_removed_and_live_or_foreign_ones_kept(ws, tmp_path, capsys):
    dead = _temp_dir(tmp_path, "b", _dead_pid(), "0123abcd")
    live = _temp_dir(tmp_path, "b", os.getppid(), "4567cdef")  # a running process (pytest's parent) is writing it
    remote = _temp_dir(tmp_path, "b", _dead_pid(), "89abcdef", host="another-machine")  # cannot be checked from here
    legacy = tmp_path / ".b.tmp-deadbeef"  # older format, no owner: only removed after a day untouched
    legacy.mkdir()
    other = _temp_dir(tmp_path, "c", _dead_pid(), "0123abcd")  # another output's temp dir: not ours to touch
    code, err = run_cli(["export", "--model", "tiny-clip", "--edit", str(ws / "edit"), "--out", str(tmp_path / "b"),
                         "--no-onnx"], capsys)
    assert code == 0, err
    assert not dead.exists() and not (tmp_path / f".b.owner-{dead.name.split('-', 1)[1]}").exists()
    assert live.exists() and remote.exists() and legacy.exists() and other.exists()
    old = time.time() - 2 * 24 * 3600
    os.utime(legacy, (old, old))
    code, err = run_cli(["export", "--model", "tiny-clip", "--edit", str(ws / "edit"), "--out", str(tmp_path / "b"),
                         "--no-onnx", "--overwrite"], capsys)
    assert code == 0, err
    assert not legacy.exists() and live.exists()


def test_sigkilled_export_leaves_a_temp_dir_that_the_next_run_removes(ws, tmp_path):
    """A real ``kill -9`` in the middle of an export, then the same command again."""
    argv = ["export", "--model", "tiny-clip", "--edit", str(ws / "edit"), "--out", "b", "--tower", "image"]
    proc = subprocess.Popen([sys.executable, "-m", "debias_export.cli.main", *argv], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 240
    while not list(tmp_path.glob(".b.tmp-*/hf")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = list(tmp_path.glob(".b.tmp-*"))
    assert left and not (tmp_path / "b").exists(), "the export finished before it could be killed"
    again = _subprocess(argv, tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# ----- exported files get the umask's mode (safetensors writes 0600 on its own) ----------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_every_written_file_gets_the_umask_default_mode(ws, tmp_path, capsys, umask, mode):
    from debias_export.cli.main import main

    old = os.umask(umask)
    try:
        assert main(["export", "--model", "tiny-clip", "--edit", str(ws / "edit"), "--out", str(tmp_path / "b"),
                     "--tower", "image"]) == 0
        assert main(["patch", "--model", "tiny-clip", "--sae", str(ws / "tsae"), "--neurons", "1", "--out", str(tmp_path / "e")]) == 0
        assert main(["train-sae", "--activations", str(ws / "cap"), "--out", str(tmp_path / "s"), "--steps", "1", "--batch-size", "4",
                     "--expansion", "2", "--k", "2", "--no-progress"]) == 0
        assert main(["project", "--capture", str(ws / "capblank"), "--column", "gender", "--out", str(tmp_path / "p")]) == 0
    finally:
        os.umask(old)
    files = [p for d in ("b", "e", "s", "p") for p in (tmp_path / d).rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "debias_patches.safetensors", "edit.safetensors", "sae.safetensors", "manifest.json"} <= names
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != mode}
    assert not wrong, wrong


