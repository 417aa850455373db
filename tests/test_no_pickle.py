"""No code execution on load: a static (ast) scan of the source plus runtime checks with a booby-trapped pickle.

The scan fails on anything that can run code while reading a file or string: pickle-family modules,
``torch.load`` without ``weights_only=True``, ``numpy.load(allow_pickle=True)``, ``pandas.read_pickle``,
unsafe YAML loaders, ``eval``/``exec``, and ``trust_remote_code`` set to anything but ``False``.
"""
from __future__ import annotations

import ast
import os
import pickle  # only to *write* a hostile file below; never loaded with pickle
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "debias_export"
TESTS = ROOT / "tests"

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
# Where ``trust_remote_code=True`` is allowed in the package and why (path relative to the repo root). Exported
# HF directories carry their own modeling code by design; only tests that load such exports may opt in.
TRUST_REMOTE_CODE_ALLOWED_PACKAGE: dict[str, str] = {}
# Test helpers (not test functions) that load remote code, and the test that exported what they load.
TRUST_REMOTE_CODE_ALLOWED_TESTS: dict[str, str] = {
    "tests/crosslock_check.py": "run by tests/test_cross_lock.py on the export that test made moments before",
}


def export_loading_lines(text: str) -> set[int]:
    """Lines of test functions that export a model themselves (so remote code there is the export's own)."""
    lines: set[int] = set()
    for fn in ast.walk(ast.parse(text)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name.startswith("test"):
            calls = {_dotted(c.func).split(".")[-1] for c in ast.walk(fn) if isinstance(c, ast.Call)}
            if any(name.startswith("export") for name in calls):
                lines.update(range(fn.lineno, (fn.end_lineno or fn.lineno) + 1))
    return lines


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for Name/Attribute chains, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan_source(text: str, rel: str) -> list[str]:
    """Findings ``rel:line: what`` for one Python source text."""
    tree = ast.parse(text, filename=rel)
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name -> dotted origin, e.g. {"tload": "torch.load", "np": "numpy"}

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{rel}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in PICKLE_MODULES:
                    flag(node, f"imports {a.name} (pickle-family deserialiser)")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            if node.module.split(".")[0] in PICKLE_MODULES:
                flag(node, f"imports from {node.module} (pickle-family deserialiser)")

    def resolve(name: str) -> str:
        head, _, rest = name.partition(".")
        origin = aliases.get(head, head)
        return f"{origin}.{rest}" if rest else origin

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = resolve(_dotted(node.func))
            if name in ("eval", "exec"):
                flag(node, f"calls {name}()")
            if name in ("torch.load", "torch.serialization.load") and not _is_const(_kw(node, "weights_only"), True):
                flag(node, "torch.load without weights_only=True")
            if name in ("numpy.load", "np.load") and not (_kw(node, "allow_pickle") is None or _is_const(_kw(node, "allow_pickle"), False)):
                flag(node, "numpy.load with allow_pickle")
            if name in ("pandas.read_pickle", "pd.read_pickle") or name.endswith(".read_pickle"):
                flag(node, "read_pickle")
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
                flag(node, f"{name} (unsafe YAML loader)")
            if name in ("yaml.load", "yaml.load_all"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                    flag(node, f"{name} without a safe Loader")
            trc = _kw(node, "trust_remote_code")
            if trc is not None and not _is_const(trc, False):
                flag(node, "trust_remote_code not literally False")
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and not _is_const(v, False):
                    flag(node, "trust_remote_code not literally False (dict)")
    return found


def _sources(base: Path):
    for path in sorted(base.rglob("*.py")):
        if ".venv" in path.parts or "__pycache__" in path.parts:
            continue
        yield path, path.relative_to(ROOT).as_posix()


# ----- the scanner itself must catch each pattern (so the real scan cannot pass vacuously) -------------
BAD_SNIPPETS = {
    "pickle": "import pickle\npickle.loads(b'')",
    "from-pickle": "from pickle import load",
    "dill": "import dill",
    "torch-load": "import torch\ntorch.load('x.pt')",
    "torch-load-false": "import torch\ntorch.load('x.pt', weights_only=False)",
    "torch-load-alias": "from torch import load as tl\ntl('x.pt')",
    "torch-load-var": "import torch\ntorch.load('x.pt', weights_only=flag)",
    "np-pickle": "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "read-pickle": "import pandas as pd\npd.read_pickle('x')",
    "yaml-load": "import yaml\nyaml.load(s)",
    "yaml-unsafe-loader": "import yaml\nyaml.load(s, Loader=yaml.UnsafeLoader)",
    "yaml-full": "import yaml\nyaml.full_load(s)",
    "eval": "eval('1+1')",
    "exec": "exec('x=1')",
    "trc-true": "AutoModel.from_pretrained('m', trust_remote_code=True)",
    "trc-forward": "AutoModel.from_pretrained('m', trust_remote_code=user_flag)",
    "trc-dict": "kw = {'trust_remote_code': True}",
}
GOOD_SNIPPETS = {
    "torch-load-safe": "import torch\ntorch.load('x.pt', weights_only=True, map_location='cpu')",
    "yaml-safe": "import yaml\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)",
    "model-eval": "model.eval()\nre.compile('x')",
    "np-load": "import numpy as np\nnp.load('x.npy')",
    "trc-false": "AutoModel.from_pretrained('m', trust_remote_code=False)",
}


@pytest.mark.parametrize("name", sorted(BAD_SNIPPETS))
def test_scanner_catches(name):
    assert scan_source(BAD_SNIPPETS[name], f"snippet/{name}.py"), name


@pytest.mark.parametrize("name", sorted(GOOD_SNIPPETS))
def test_scanner_allows(name):
    assert scan_source(GOOD_SNIPPETS[name], f"snippet/{name}.py") == []


def test_remote_code_allowed_only_in_tests_that_export():
    text = ("def test_a(tmp_path):\n    export_bundle(m, tmp_path)\n    AutoModel.from_pretrained(tmp_path, trust_remote_code=True)\n"
            "def test_b():\n    AutoModel.from_pretrained('org/model', trust_remote_code=True)\n")
    lines = [int(f.split(":")[1]) for f in scan_source(text, "t.py")]
    assert lines == [3, 5]
    allowed = export_loading_lines(text)
    assert 3 in allowed and 5 not in allowed


# ----- the real scan -----------------------------------------------------------------------------------
def test_package_source_has_no_code_executing_loads():
    files = list(_sources(PACKAGE))
    assert len(files) >= 10, "package source not found"
    findings = []
    for path, rel in files:
        for f in scan_source(path.read_text(), rel):
            if "trust_remote_code" in f and rel in TRUST_REMOTE_CODE_ALLOWED_PACKAGE:
                continue
            findings.append(f)
    assert not findings, "\n".join(findings)


def test_tests_use_no_unsafe_loads():
    """Tests may write a hostile pickle (this file) and export-loading tests may opt into remote code."""
    findings = []
    for path, rel in _sources(TESTS):
        text = path.read_text()
        allowed_lines = export_loading_lines(text)
        for f in scan_source(text, rel):
            if rel == "tests/test_no_pickle.py" and "imports pickle" in f:
                continue  # used only to *dump* the booby-trapped file below
            if "trust_remote_code" in f and (int(f.split(":")[1]) in allowed_lines or rel in TRUST_REMOTE_CODE_ALLOWED_TESTS):
                continue
            findings.append(f)
    assert not findings, "\n".join(findings)


# ----- runtime: a hostile pickle handed to every loader is refused and never executed ---------------
class _Trap:
    """Unpickling this creates a marker directory: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _write_trap(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump({"W_enc": _Trap(str(marker))}, fh, protocol=2)


def test_torch_load_weights_only_refuses_trap(tmp_path):
    # The guarantee the package relies on wherever it must read a .pt file.
    marker = tmp_path / "pwned"
    _write_trap(tmp_path / "x.pt", marker)
    with pytest.raises(Exception):
        torch.load(tmp_path / "x.pt", weights_only=True)
    assert not marker.exists()


def test_sae_and_edit_loaders_refuse_pickle_disguised_as_safetensors(tmp_path):
    from debias_export import DebiasError, SAEEdit
    from debias_export.edits.base import EDIT_WEIGHTS, load_edit
    from debias_export.sae.model import SAE_WEIGHTS, SparseAutoencoder, read_safetensors
    from debias_export.workflow.testing import random_sae

    marker = tmp_path / "pwned"
    sae_dir = random_sae(8, 16).save(tmp_path / "sae")
    _write_trap(sae_dir / SAE_WEIGHTS, marker)
    edit_dir = SAEEdit(site="image.1", sae=random_sae(8, 16), neurons=[1]).save(tmp_path / "edit")
    _write_trap(edit_dir / EDIT_WEIGHTS, marker)
    for load in (lambda: read_safetensors(sae_dir / SAE_WEIGHTS), lambda: SparseAutoencoder.load(sae_dir),
                 lambda: load_edit(edit_dir)):
        with pytest.raises(DebiasError, match="corrupt or truncated safetensors"):
            load()
    assert not marker.exists()


def test_sae_importers_refuse_pickle(tmp_path):
    """Every importer layout fed a hostile pickle errors with a DebiasError and never runs it."""
    from debias_export import DebiasError
    from debias_export.core.errors import IntegrityError
    from debias_export.sae.importers import load_any, load_dictionary_learning

    marker = tmp_path / "pwned"
    for name in ("ae.pt", "sae_weights.safetensors", "sae.safetensors"):
        d = tmp_path / name.replace(".", "_")
        _write_trap(d / name, marker)
        (d / ("config.json" if name == "ae.pt" else "cfg.json")).write_text("{}")
        with pytest.raises(DebiasError):
            load_any(d)
    with pytest.raises(IntegrityError, match="weights-only"):
        load_dictionary_learning(tmp_path / "ae_pt")
    assert not marker.exists()
