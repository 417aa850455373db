"""Recipe errors name the key path AND its line (issue #17), read from yaml's node marks; CLI: one line, exit 2."""
from __future__ import annotations

from pathlib import Path

import pytest

from debias_export.cli.main import main
from debias_export.core.errors import ConfigError
from debias_export.workflow.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
GOOD = (ROOT / "recipes" / "tiny-clip-fairface.yaml").read_text()


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing ``needle`` (so the tests do not hard-code the recipe's layout)."""
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


# (name, old text, new text, the key the line must point at, expected message after "<file> line N: ")
CASES = [
    ("bad-value", "  alpha: 0.6", "  alpha: 1.6", "  alpha: 1.6", "edit.alpha: must be in [0, 1], got 1.6"),
    ("unknown-key", "  tau: 0.2", "  taux: 0.2", "  taux: 0.2", "unknown key 'probe.taux' (known: column, tau, top_n, activations)"),
    ("wrong-type", "  steps: 200", "  steps: many", "  steps: many", "sae.steps: expected an integer, got 'many'"),
    ("in-a-variant", "strength: 1.0, fold: output", "strength: 2.0, fold: output", "strength: 2.0, fold: output",
     "variants[2] (leace-output): edit.strength: must be in [0, 1], got 2.0"),
    ("list-item", "  neurons: [1, 2]", "  neurons: [1, -2]", "  neurons: [1, -2]", "edit.neurons: must be >= 0, got [1, -2]"),
]


@pytest.mark.parametrize("name,old,new,at,message", CASES, ids=[c[0] for c in CASES])
def test_a_recipe_error_names_the_line_of_its_key(tmp_path, name, old, new, at, message):
    assert GOOD.count(old) == 1
    text = GOOD.replace(old, new)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path} line {line_of(text, at)}: {message}"


def test_a_yaml_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "syntax.yaml"
    path.write_text("name: x\nseed: 0\ncapture:\n  k: [2\n  tokens: all\n")
    with pytest.raises(ConfigError, match=rf"^{path} line [45]: not valid YAML \("):
        load_recipe(path)


def test_a_missing_top_level_key_still_names_the_key(tmp_path):
    path = tmp_path / "missing.yaml"
    path.write_text(GOOD.replace("site: image.-1\n", ""))
    with pytest.raises(ConfigError, match=r"missing key 'site'"):
        load_recipe(path)


def test_the_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("  alpha: 0.6", "  alpha: 1.6"))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path} line {line_of(path.read_text(), 'alpha: 1.6')}: edit.alpha: must be in [0, 1], got 1.6"]
    assert not (tmp_path / "out").exists()
