"""The README's examples are tested documentation (issue #17): the ```bash walkthrough block and the ```python api
block run as written, in a fresh temporary directory, so a newcomer copying them cannot hit a drifted flag.

The walkthrough's ``debias-export ...`` lines run in-process through ``cli.main.main`` (what the console script
calls; one interpreter instead of a dozen torch start-ups), and its ``cat > FILE <<'EOF'`` here-documents write
their file; any other shell line fails the test, so the block stays plain copy-and-paste.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from debias_export.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEREDOC = re.compile(r"^cat > (\S+) <<'?(\w+)'?$")


def fenced_block(info: str, text: str | None = None) -> str:
    """The one fenced block whose info string is exactly ``info`` (e.g. ``bash walkthrough``)."""
    blocks = re.findall(rf"^```{re.escape(info)}\n(.*?)^```$", text if text is not None else README.read_text(),
                        flags=re.S | re.M)
    assert len(blocks) == 1, f"README.md must hold exactly one ```{info} block, found {len(blocks)}"
    return blocks[0]


def shell_steps(block: str) -> list[tuple[str, object]]:
    """``("cli", argv)`` per ``debias-export`` command and ``("file", (name, text))`` per here-document."""
    steps: list[tuple[str, object]] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        while line.endswith("\\"):  # continuation lines
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if m := HEREDOC.match(line.strip()):
            end = lines.index(m.group(2), i)
            steps.append(("file", (m.group(1), "\n".join(lines[i:end]) + "\n")))
            i = end + 1
            continue
        argv = shlex.split(line, comments=True)
        assert argv[0] == "debias-export", f"unsupported line in the README walkthrough: {line!r}"
        steps.append(("cli", argv[1:]))
    return steps


def test_the_block_parser_reads_commands_continuations_and_heredocs():
    block = "# c\ndebias-export verify a  # why\ndebias-export validate \\\n  b --seed 0\ncat > f.csv <<'EOF'\nx,y\n1,2\nEOF\n"
    assert shell_steps(block) == [("cli", ["verify", "a"]), ("cli", ["validate", "b", "--seed", "0"]),
                                  ("file", ("f.csv", "x,y\n1,2\n"))]
    with pytest.raises(AssertionError, match="unsupported line"):
        shell_steps("rm -rf cap\n")


def test_the_walkthrough_covers_the_main_chain():
    commands = [argv[0] for kind, argv in shell_steps(fenced_block("bash walkthrough")) if kind == "cli"]
    for command in ("capture", "train-sae", "probe", "patch", "export", "validate", "verify", "bench", "eval", "project"):
        assert command in commands, command
    chain = ["capture", "train-sae", "probe", "patch", "export", "validate", "verify", "bench", "eval"]
    assert [c for c in commands if c in chain][:len(chain)] == chain  # in the order of the data flow


@pytest.fixture(scope="module")
def walked(tmp_path_factory, shared_data_dir):
    """Run the walkthrough once, in a fresh directory; the Python block runs after it in the same place."""
    work = tmp_path_factory.mktemp("readme")
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    mp.setenv("DEBIAS_EXPORT_DATA", shared_data_dir)
    try:
        for kind, step in shell_steps(fenced_block("bash walkthrough")):
            if kind == "file":
                name, text = step
                Path(name).write_text(text)
                continue
            rc = main(list(step))
            assert rc == 0, f"README walkthrough step failed: debias-export {shlex.join(step)}"
        yield work
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def shared_data_dir():
    path = os.path.abspath(os.environ.get("DEBIAS_EXPORT_DATA", ROOT.parent / "shared" / "data"))
    if not os.path.isdir(os.path.join(path, "fairface540")):
        pytest.skip(f"shared data not found at {path}")
    return path


def test_the_walkthrough_runs_as_written(walked):
    for path in ("cap", "sae/cfg.json", "probe.json", "edit/edit_config.json", "artifact/hf/manifest.json",
                 "artifact/onnx", "bench/bench.md", "eval/report.md", "cap-text", "erase-text/edit_config.json"):
        assert (walked / path).exists(), path
    report = (walked / "eval" / "report.md").read_text()
    assert "MaxSkew" in report


def test_the_python_api_block_runs_as_written(walked):
    """In a fresh interpreter (as a user would paste it), in the walkthrough's directory."""
    code = fenced_block("python api")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], cwd=walked, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "torch.Size([1, 16])"
    assert (walked / "clip-debiased" / "hf" / "manifest.json").is_file()
