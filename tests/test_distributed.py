"""Multi-process capture and SAE training (torchrun, gloo, 2 CPU processes) against single-process runs; devices,
precisions and resuming on one process.

One torchrun launch (tests/distributed_driver.py) runs the CLI commands a user's job would; the references are
the same commands in this process.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from debias_export.capture import ActivationStore
from debias_export.cli.main import main
from debias_export.sae.distributed import Dist, resolve_device
from debias_export.sae.model import SparseAutoencoder
from test_data import write_images

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "distributed_driver.py"
sys.path.insert(0, str(ROOT / "tests"))
from distributed_driver import CAPTURE, TRAIN, command  # noqa: E402  (the commands the launched processes run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references in this process, then the 2-process runs under torchrun."""
    work = tmp_path_factory.mktemp("dist")
    write_images(work, 7)
    assert main(command(CAPTURE, work, "--out", str(work / "cap1"))) == 0
    assert main(command(TRAIN, work, "--out", str(work / "sae1"))) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(DRIVER), str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc.stdout


def _same_capture(a: Path, b: Path) -> None:
    sa, sb = ActivationStore(a), ActivationStore(b)
    assert sa.manifest["cache_key"] == sb.manifest["cache_key"]  # same settings hash as one process
    assert sa.rows == sb.rows and sa.num_tokens == sb.num_tokens
    # canonical order: by (input row, token position)
    for s in (sa, sb):
        s.order = torch.argsort(s.row_index() * 10_000 + s.token_index())
    for name in ("activations", "row_index", "token_index"):
        ta, tb = getattr(sa, name)()[sa.order], getattr(sb, name)()[sb.order]
        assert torch.allclose(ta.float(), tb.float(), rtol=1e-6, atol=1e-6), name
    assert torch.allclose(sa.mean_activations(), sb.mean_activations(), rtol=1e-6, atol=1e-6)


def test_distributed_capture_equals_single_process(runs):
    work, out = runs
    _same_capture(work / "cap1", work / "cap2")
    manifest = json.loads((work / "cap2" / "capture.json").read_text())
    assert [e["rank"] for e in manifest["shards"]] == [0, 1, 0, 1]  # the work was split
    assert manifest["runtime"] == {"device": "cpu", "precision": "fp32", "processes": 2}
    assert "4 shards (0 resumed)" in out and "by 2 processes" in out
    assert out.count("captured 7 inputs") == 2  # rank 0 alone prints


def test_interrupted_distributed_capture_resumes(runs, tmp_path):
    work, out = runs
    assert "4 shards (2 resumed)" in out
    _same_capture(work / "cap1", work / "cap3")
    manifest = json.loads((work / "cap3" / "capture.json").read_text())
    assert [e["rank"] for e in manifest["shards"]] == [0, 1, 0, 1] and manifest["status"] == "complete"
    # a capture two processes began resumes with one as well (the shard is the unit, not the rank)
    shutil.copytree(work / "cap2", tmp_path / "cap")
    m = json.loads((tmp_path / "cap" / "capture.json").read_text())
    m.update(status="running", shards=m["shards"][:3])
    (tmp_path / "cap" / "capture.json").write_text(json.dumps(m))
    cap = command(CAPTURE, work)
    assert main(cap + ["--out", str(tmp_path / "cap")]) == 0
    _same_capture(work / "cap1", tmp_path / "cap")


def test_distributed_sae_equals_single_process(runs):
    work, out = runs
    one, two = SparseAutoencoder.load(work / "sae1"), SparseAutoencoder.load(work / "sae2")
    for name, t in one.state_tensors().items():
        assert torch.allclose(t, two.state_tensors()[name], rtol=1e-5, atol=1e-6), name
    t1, t2 = one.cfg.metadata["training"], two.cfg.metadata["training"]
    assert t2["runtime"]["processes"] == 2 and t1["runtime"]["processes"] == 1
    assert t1["steps_done"] == t2["steps_done"] == 12 and abs(t1["final_fvu"] - t2["final_fvu"]) < 1e-5
    assert "on 2 processes" in out


def test_interrupted_distributed_sae_resumes(runs):
    work, out = runs
    assert "stopped at step 7 of 12 (run the same command again" in out
    full, resumed = SparseAutoencoder.load(work / "sae2"), SparseAutoencoder.load(work / "sae2r")
    for name, t in full.state_tensors().items():  # the same computation, interrupted: the same bits
        assert torch.equal(t, resumed.state_tensors()[name]), name
    assert not (work / "sae2r.checkpoints").exists()  # the default checkpoint folder goes once training finishes


def test_train_sae_stop_then_rerun_resumes(runs, tmp_path):
    work, _ = runs
    train = command(TRAIN, work)
    args = train + ["--out", str(tmp_path / "s"), "--max-steps-this-run", "5"]
    for step in (5, 10, 12):
        assert main(args) == 0
        assert SparseAutoencoder.load(tmp_path / "s").cfg.metadata["training"]["steps_done"] == step
    ref = SparseAutoencoder.load(work / "sae1")
    assert torch.equal(ref.W_dec, SparseAutoencoder.load(tmp_path / "s").W_dec)
    assert main(args) == 2  # finished: an existing output is refused again


def test_devices_and_precisions(runs, tmp_path, capsys):
    work, _ = runs
    assert resolve_device("cpu") == resolve_device("auto" if not torch.cuda.is_available() else "cpu")
    assert Dist.current() == Dist() and not Dist().enabled  # no group: one process, collectives are no-ops
    cap = command(CAPTURE, work)
    if not torch.cuda.is_available():
        assert main(cap + ["--out", str(tmp_path / "c"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: device 'cuda' asked for, but CUDA is not available") and "\n" not in err
        assert main(cap + ["--out", str(tmp_path / "c"), "--device", "cuda:1"]) == 2
    assert main(cap + ["--out", str(tmp_path / "c"), "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing half-written
    assert main(cap + ["--out", str(tmp_path / "bf"), "--precision", "bf16"]) == 0
    bf, ref = ActivationStore(tmp_path / "bf"), ActivationStore(work / "cap1")
    assert bf.settings["precision"] == "bf16" and "precision" not in ref.settings  # part of the key when not fp32
    assert bf.manifest["cache_key"] != ref.manifest["cache_key"]
    assert torch.allclose(bf.activations(), ref.activations(), atol=0.1, rtol=0.05)
    train = command(TRAIN, work)
    assert main(train + ["--out", str(tmp_path / "sbf"), "--precision", "bf16"]) == 0
    meta = SparseAutoencoder.load(tmp_path / "sbf").cfg.metadata["training"]
    assert meta["runtime"]["precision"] == "bf16" and meta["runtime"]["device"] == "cpu"
    assert SparseAutoencoder.load(tmp_path / "sbf").W_dec.dtype == torch.float32
    assert main(train + ["--out", str(tmp_path / "s16"), "--precision", "fp16"]) == 2  # needs loss scaling
