"""The package's shape: one place per choice list, one export spec per family, a CLI whose help loads no torch,
a lazy top-level package, the typed patch record, files of a readable size."""
import subprocess
import sys
from pathlib import Path

import pytest

from debias_export.adapters.registry import FAMILY_MODULES, registered_families
from debias_export.core import choices
from debias_export.edits import apply_edits, current_patch, registered_edit_kinds
from debias_export.edits.sae import MODES
from debias_export.export.registry import exportable_families
from debias_export.workflow.testing import random_sae, tiny_clip
from debias_export import SAEEdit

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["capture", "train-sae", "probe", "patch", "export", "validate", "verify", "run", "bench", "eval", "locate",
            "bias-lab", "project", "reproduce"]


def test_choice_lists_match_their_registries():
    assert sorted(choices.EDIT_KINDS) == sorted(registered_edit_kinds())
    assert MODES == choices.SAE_MODES
    assert set(choices.EXPORT_FOLDS) == {"none", *choices.FOLD_MODES}


def test_every_family_has_one_export_spec_module_and_registers_itself():
    assert exportable_families() == sorted(FAMILY_MODULES)
    assert sorted(registered_families()) == sorted(FAMILY_MODULES)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_cli_help_loads_neither_torch_nor_a_command_implementation():
    """Lazy commands: `--help` and every `COMMAND --help` print help without importing torch or transformers."""
    code = ("import sys\nfrom debias_export.cli.main import main\n"
            f"for args in [[]] + [[c] for c in {COMMANDS!r}]:\n"
            "    assert main(args + ['--help']) == 0, args\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'onnx', 'open_clip') if m in sys.modules)\n"
            "assert not heavy, heavy\nprint('ok')\n")
    proc = _run(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
    for command in COMMANDS:
        assert command in proc.stdout  # the group's help lists every command


def test_the_package_imports_lazily_and_keeps_its_public_names():
    proc = _run("import sys, debias_export as dx\nassert 'torch' not in sys.modules\n"
                "names = [getattr(dx, n) for n in dx.__all__]\nassert 'torch' in sys.modules\n"
                "assert dx.sae.load_any and dx.SAEEdit.kind == 'sae'\nprint('ok')\n")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_the_patch_record_is_typed_and_not_an_attribute_of_the_model():
    adapter = tiny_clip(seed=0)
    assert current_patch(adapter) is None
    handle = apply_edits(adapter, SAEEdit(site="image.-1", sae=random_sae(32, 64), neurons=[1]))
    assert current_patch(adapter) is handle and current_patch(adapter.model) is handle
    assert not any(name.startswith("_debias") for name in vars(adapter.model))
    handle.remove()
    assert current_patch(adapter) is None


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "debias_export").rglob("*.py") if "templates" not in p.parts),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_files_stay_readable(path):
    assert len(path.read_text().splitlines()) <= 400
