"""Run by tests/test_distributed.py under `python -m torch.distributed.run --nproc_per_node 2` (gloo, CPU).

Each process runs the CLI exactly as a user's torchrun job would (one launch, several commands, so the
imports are paid once): a capture, an interrupted capture resumed, an SAE training run, and one stopped by
--max-steps-this-run then resumed by the same command. Usage: distributed_driver.py WORKDIR (which holds
labels.csv + images/ and, from the single-process reference, cap1/).
"""
import json
import os
import shutil
import sys
from pathlib import Path

from debias_export.cli.main import main

# Command templates ("LABELS", "CAP1": paths under WORKDIR), shared with the single-process references.
CAPTURE = ["capture", "--model", "tiny-clip", "--site", "image.1", "--images", "LABELS", "--tokens", "random-k",
           "--k", "3", "--shard-size", "2", "--batch-size", "2", "--no-progress", "--device", "cpu"]
TRAIN = ["train-sae", "--activations", "CAP1", "--k", "4", "--expansion", "2", "--batch-size", "8", "--steps", "12",
         "--lr", "1e-2", "--warmup-steps", "2", "--dead-tokens", "24", "--checkpoint-every", "4", "--no-progress",
         "--device", "cpu"]


def command(template: list[str], work: Path, *extra: str) -> list[str]:
    paths = {"LABELS": str(work / "labels.csv"), "CAP1": str(work / "cap1")}
    return [paths.get(a, a) for a in template] + list(extra)


def run(argv: list[str], rank: int) -> None:
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"rank {rank}: {argv[0]} exited {rc}")


def drive(work: Path, rank: int) -> None:
    run(command(CAPTURE, work, "--out", str(work / "cap2")), rank)
    if rank == 0:
        # What a crash in the second round leaves: the manifest lists the first round (shards 0, 1) and says
        # "running"; the later shards' files are on disk but not recorded. Only rank 0 reads the manifest.
        shutil.copytree(work / "cap2", work / "cap3")
        manifest = json.loads((work / "cap3" / "capture.json").read_text())
        manifest.update(status="running", shards=manifest["shards"][:2])
        for key in ("counts", "timing"):
            manifest.pop(key)
        (work / "cap3" / "capture.json").write_text(json.dumps(manifest))
    run(command(CAPTURE, work, "--out", str(work / "cap3")), rank)
    run(command(TRAIN, work, "--out", str(work / "sae2")), rank)
    for _ in range(2):  # stops at step 7, then the same command finishes the 12 steps
        run(command(TRAIN, work, "--out", str(work / "sae2r"), "--max-steps-this-run", "7"), rank)


if __name__ == "__main__":
    drive(Path(sys.argv[1]), int(os.environ["RANK"]))
