"""Property tests of the recipe parser: malformed input -> ConfigError naming the key, valid recipes round-trip."""
from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from debias_export.core.errors import ConfigError, DebiasError
from debias_export.workflow.recipe import Recipe, load_recipe, parse_recipe
from debias_export.workflow.recipe_select import UTILITY_METRICS

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**400)
           | st.integers(max_value=-10**300, min_value=-10**400) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.binary(max_size=8))
junk = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=8) | st.integers(), kids, max_size=4), max_leaves=12)

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
pos = st.integers(min_value=1, max_value=10**6)
name = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)


@st.composite
def valid_recipes(draw) -> dict:
    """A recipe mapping that passes every check (optional sections present or not)."""
    raw = {"name": draw(name), "model": {"spec": draw(st.sampled_from(["tiny-clip", "tiny-clip:3", "openai/clip-vit-base-patch16"]))},
           "site": draw(st.sampled_from(["image.-1", "text.2", "image.11.resid_post"])),
           "output": {"dir": draw(name)}}
    data = draw(st.sampled_from([{"images": "fairface540/labels.csv"}, {"texts": "prompts/occupations.csv"},
                                 {"images": "x.csv", "limit": 4, "dir": "d", "image_dir": "i"}]))
    raw["data"] = data
    opt = {
        "seed": st.integers(min_value=0, max_value=2**31),
        "capture": st.fixed_dictionaries({}, optional={"tokens": st.sampled_from(["random-k", "output", "all"]), "k": pos,
                                                       "batch_size": pos}),
        "sae": st.fixed_dictionaries({}, optional={"path": st.none() | name, "k": pos, "expansion": pos, "batch_size": pos,
                                                   "steps": pos, "lr": st.none() | st.floats(1e-6, 1.0)}),
        "probe": st.fixed_dictionaries({}, optional={"column": name, "tau": st.floats(min_value=1e-6, max_value=1.0),
                                                     "top_n": pos}),
        "edit": st.fixed_dictionaries({}, optional={"alpha": st.floats(min_value=0.0, max_value=1.0), "value": finite,
                                                    "mode": st.sampled_from(["reconstruct", "residual"]),
                                                    "neurons": st.none() | st.lists(st.integers(0, 10**5), max_size=5, unique=True)}),
        "export": st.fixed_dictionaries({}, optional={"onnx": st.booleans(), "opset": st.integers(18, 21), "atol": st.floats(0.0, 1.0),
                                                       "rtol": st.floats(0.0, 1.0)}),
        "bench": st.none() | st.fixed_dictionaries({}, optional={"batch_sizes": st.lists(pos, min_size=1, max_size=3), "reps": pos,
                                                                 "runtimes": st.lists(st.sampled_from(["torch", "ort"]), max_size=2)}),
        "eval": st.none() | st.fixed_dictionaries({}, optional={"alphas": st.lists(st.floats(0.0, 1.0), max_size=4), "k": pos}),
        "seeds": st.none() | st.lists(st.integers(0, 2**31), min_size=1, max_size=4, unique=True),
        "select": st.none() | st.fixed_dictionaries({}, optional={
            "images": name, "k": pos, "limit": st.none() | st.integers(2, 10**6),
            "max_utility_loss": st.floats(0.0, 1.0), "utility": st.lists(st.sampled_from(UTILITY_METRICS), max_size=3),
            "grid": st.fixed_dictionaries({}, optional={"edit.alpha": st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3),
                                                        "probe.tau": st.lists(st.floats(1e-3, 1.0), min_size=1, max_size=2),
                                                        "probe.top_n": st.lists(pos, min_size=1, max_size=2)})}),
    }
    for key, strat in opt.items():
        if draw(st.booleans()):
            raw[key] = draw(strat)
    return raw


def _as_mapping(recipe: Recipe) -> dict:
    out = dataclasses.asdict(recipe)
    out.pop("source")
    return out


def _parse_or_config_error(raw):
    """The property under test: a Recipe or a ConfigError with a one-line message, nothing else."""
    try:
        return parse_recipe(raw)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc)
        return exc


@FUZZ
@given(junk)
def test_any_top_level_value_gives_recipe_or_config_error(raw):
    result = _parse_or_config_error(raw)
    if not isinstance(raw, dict):
        assert isinstance(result, ConfigError) and "top level must be a mapping" in str(result)


@FUZZ
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(Recipe)]) | st.text(max_size=6), junk, max_size=8))
def test_random_mappings_give_recipe_or_config_error(raw):
    _parse_or_config_error(raw)


@st.composite
def mutated_recipes(draw):
    """A valid recipe with one key replaced by junk, deleted, or a junk key added; returns (raw, top-level key touched)."""
    raw = draw(valid_recipes())
    path = [draw(st.sampled_from(sorted(raw)))]
    node = raw
    while isinstance(node[path[-1]], dict) and node[path[-1]] and draw(st.booleans()):
        node = node[path[-1]]
        path.append(draw(st.sampled_from(sorted(node))))
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        node[path[-1]] = draw(junk)
    elif action == "delete":
        del node[path[-1]]
    else:
        target = node[path[-1]] if isinstance(node[path[-1]], dict) else node
        new_key = draw(st.text(min_size=1, max_size=8))
        assume(new_key not in target)
        target[new_key] = draw(junk)
        if target is node and len(path) == 1:
            path = [new_key]
    return raw, path[0]


@FUZZ
@given(mutated_recipes())
def test_mutated_recipes_fail_naming_the_key(case):
    raw, top = case
    result = _parse_or_config_error(raw)
    if isinstance(result, ConfigError):
        msg = str(result)
        assert str(top) in msg or repr(top)[1:-1] in msg, (top, msg)


@FUZZ
@given(valid_recipes())
def test_valid_recipes_round_trip(raw):
    recipe = parse_recipe(raw)
    again = parse_recipe(_as_mapping(recipe))
    assert again == recipe
    assert 0.0 <= recipe.edit.alpha <= 1.0 and math.isfinite(recipe.edit.value)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(valid_recipes())
def test_valid_recipes_round_trip_through_yaml_files(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("r") / "recipe.yaml"
    recipe = parse_recipe(raw)
    path.write_text(yaml.safe_dump(_as_mapping(recipe)))
    again = load_recipe(path)
    assert again.source == str(path)
    again.source = None
    assert again == recipe


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_garbage_recipe_files_give_config_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("g") / "recipe.yaml"
    path.write_bytes(blob)
    try:
        load_recipe(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize("text,words", [
    ("a: [1, 2", "not valid YAML"),
    ("!!python/object/apply:os.system ['true']", "not valid YAML"),  # safe_load refuses python tags
    ("- 1\n- 2\n", "top level must be a mapping"),
    ("", "top level must be a mapping"),
    ("a: &x [1]\nb: *x\n", "unknown key 'a'"),
    ("name: " + "1" * 5000 + "\n", "r.yaml"),  # past Python's int-string digit limit
])
def test_yaml_edge_cases(tmp_path, text, words):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(DebiasError, match=words):
        load_recipe(path)


def _leaf_paths(cls=Recipe, prefix=""):
    """Every scalar/list leaf of the schema as ``(dotted path, annotation)``."""
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
        if dataclasses.is_dataclass(inner[0]):
            yield from _leaf_paths(inner[0], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", inner[0]


BASE = {"name": "x", "model": {"spec": "tiny-clip"}, "site": "image.-1", "output": {"dir": "o"},
        "data": {"images": "a.csv"}, "bench": {}, "eval": {}}
NASTY = [float("nan"), float("inf"), -float("inf"), 10**400, -10**400, [1, [2]], {"a": 1}, b"\x00", True]


def _set(raw: dict, path: str, value) -> dict:
    import copy

    raw = copy.deepcopy(raw)
    node = raw
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return raw


@pytest.mark.parametrize("path", [p for p, _ in _leaf_paths()])
def test_every_leaf_rejects_nasty_values_naming_its_path(path):
    """Each typed field, given NaN/Inf/huge ints/containers/bytes/bools: a ConfigError naming the field."""
    for value in NASTY:
        try:
            parse_recipe(_set(BASE, path, value))
        except ConfigError as exc:
            assert path in str(exc), (value, str(exc))
        # acceptance is fine only where the type allows it (e.g. a bool for a bool field)


@pytest.mark.parametrize("path", ["name", "capture.tokens", "edit.alpha", "output.overwrite", "edit.neurons"])
def test_ints_past_the_digit_limit_give_config_error(path):
    """A 5000-digit int cannot even be printed (Python's int-string limit): still a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        parse_recipe(_set(BASE, path, 10**5000))


@pytest.mark.parametrize("path,value", [
    ("edit.neurons", [-1]), ("edit.neurons", [3, 3]), ("data.limit", -5),
    ("export.atol", -1.0), ("export.rtol", -1.0), ("export.opset", 0), ("sae.lr", -0.1),
    ("bench.reps", 0), ("bench.batch_sizes", [0]), ("bench.batch_sizes", [-8]), ("bench.runtimes", ["tensorflow"]),
    ("eval.alphas", [1.5]), ("eval.alphas", [-0.1]), ("eval.k", 0),
    ("seeds", []), ("seeds", [1, 1]), ("seeds", [-1]), ("select.k", 0), ("select.limit", 1),
    ("select.max_utility_loss", 1.5), ("select.utility", ["accuracy"]), ("select.grid", {"edit.gamma": [1]}),
    ("select.grid", {"edit.alpha": []}), ("select.grid", {"edit.alpha": [0.5, 2.0]}), ("select.grid", {"site": [3]}),
    ("select.grid", {"probe.tau": 0.1}), ("select.grid", {"edit.alpha": [0.1] * 20, "probe.tau": [0.1] * 20}),
])
def test_out_of_range_values_are_rejected_up_front(path, value):
    """Values no later step can use must fail at parse time (not after capture/training), naming the key."""
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        parse_recipe(_set(BASE, path, value))


# ----- table of bad recipe files (the same mistakes through ``debias-export run``: tests/test_bad_inputs.py) -----
GOOD_RECIPE = """\
name: smoke
model: {spec: tiny-clip}
site: image.-1
data: {texts: prompts.txt}
output: {dir: out}
"""
RECIPE_CASES = [
    ("missing-key", GOOD_RECIPE.replace("site: image.-1\n", ""), ("missing key 'site'",)),
    ("missing-nested-key", GOOD_RECIPE.replace("{spec: tiny-clip}", "{family: hf_clip}"), ("missing key 'model.spec'",)),
    ("extra-key", GOOD_RECIPE + "edit: {alpha: 0.5, gamma: 2}\n", ("unknown key 'edit.gamma'",)),
    ("extra-top-key", GOOD_RECIPE + "lr: 3\n", ("unknown key 'lr'",)),
    ("alpha-out-of-range", GOOD_RECIPE + "edit: {alpha: 1.2}\n", ("edit.alpha", "[0, 1]")),
    ("alpha-nan", GOOD_RECIPE + "edit: {alpha: .nan}\n", ("edit.alpha", "finite")),
    ("wrong-type", GOOD_RECIPE + "capture: {k: two}\n", ("capture.k", "integer")),
    ("section-not-mapping", GOOD_RECIPE + "probe: [1, 2]\n", ("probe", "mapping")),
    ("no-inputs", GOOD_RECIPE.replace("data: {texts: prompts.txt}", "data: {limit: 3}"), ("data", "images")),
    ("bad-mode", GOOD_RECIPE + "edit: {mode: erase}\n", ("edit.mode", "erase")),
    ("select-unknown-key", GOOD_RECIPE + "select: {grid: {edit.gamma: [1]}}\n", ("select.grid", "edit.gamma")),
    ("select-bad-cell", GOOD_RECIPE + "select: {grid: {edit.alpha: [0.5, 3]}}\n", ("edit.alpha", "grid cell")),
    ("select-extra-key", GOOD_RECIPE + "select: {split: val}\n", ("unknown key 'select.split'",)),
    ("seeds-empty", GOOD_RECIPE + "seeds: []\n", ("seeds", "non-empty")),
    ("not-yaml", "name: [x\n", ("not valid yaml",)),
    ("top-level-list", "- 1\n", ("top level must be a mapping",)),
]


@pytest.mark.parametrize("case_id,text,words", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_recipe_bad_input(case_id, text, words, tmp_path):
    from debias_export.workflow.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)


def test_recipe_file_missing(tmp_path):
    from debias_export.workflow.recipe import load_recipe

    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("blob", [b"\xff\xfe\x00garbage", b"name: \x80\x81\n"], ids=["utf16-bom", "latin1"])
def test_recipe_file_not_utf8(tmp_path, blob):
    from debias_export.workflow.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_bytes(blob)
    with pytest.raises(ConfigError, match="recipe"):
        load_recipe(path)


def test_recipe_path_is_a_directory(tmp_path):
    from debias_export.workflow.recipe import load_recipe

    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_recipe(tmp_path)
