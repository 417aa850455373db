"""locate: logit-lens layer curves, MaxSkew@k, head/MLP ablation, a planted component, and the CLI."""
import json
import math

import pytest
import torch

from debias_export.analysis.locate import (ablation_hooks, local_max_skew_at_k, locate_bias, max_skew_at_k,
                                           run_with_stream, tower_parts)

PROMPTS = ["a photo of a doctor", "a nurse", "an engineer", "a person", "a kind person", "a criminal"]


def synthetic_images(n=200, strength=0.6, seed=0):
    """Noise images; group 1 carries a fixed faint pattern (the attribute)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    pattern = torch.randn(3, 32, 32, generator=g)
    px = torch.randn(n, 3, 32, 32, generator=g) + strength * y[:, None, None, None] * pattern
    return {"pixel_values": px}, y


def red_shift_images(n=200, strength=0.15, seed=0):
    """Noise images; group 1 is faintly redder everywhere (the attribute)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    px = torch.randn(n, 3, 32, 32, generator=g)
    px[:, 0] += strength * y[:, None, None]
    return {"pixel_values": px}, y


@torch.no_grad()
def plant_head(clip, inputs, y, head=0, layer=0, scale=8.0, seed=0):
    """Turn one attention head into a planted bias mover: uniform attention, reads the attribute
    direction of the patch tokens, writes it (scaled up) along a fixed vector."""
    block = clip.blocks("image")[layer]
    att = block.self_attn
    feats = []
    h = block.layer_norm1.register_forward_hook(lambda m, a, o: feats.append(o[:, 1:].mean(1)))
    clip.embed("image", inputs)
    h.remove()
    f = torch.cat(feats)
    u = f[y == 1].mean(0) - f[y == 0].mean(0)
    u = u / u.norm()
    dh = att.head_dim
    sl = slice(head * dh, (head + 1) * dh)
    for lin in (att.q_proj, att.v_proj):
        lin.weight[sl] = 0
        lin.bias[sl] = 0
    att.v_proj.weight[head * dh] = u
    att.v_proj.bias[head * dh] = -float((f @ u).mean())
    v = torch.randn(32, generator=torch.Generator().manual_seed(seed + 100))
    att.out_proj.weight[:, sl] = 0
    att.out_proj.weight[:, head * dh] = scale * v / v.norm()


def test_max_skew_at_k_by_hand():
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    items = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(4, 1), torch.tensor([[0.0, 1.0]]).repeat(4, 1)])
    items = items + 0.01 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    q = torch.tensor([[1.0, 0.05]])
    assert max_skew_at_k(q, items, groups, k=4) == pytest.approx(math.log(2.0), abs=1e-5)  # top-4 all group 0
    assert max_skew_at_k(q, items, groups, k=8) == pytest.approx(0.0, abs=1e-5)  # everything retrieved
    g = torch.Generator().manual_seed(1)
    q, items, groups = torch.randn(7, 5, generator=g), torch.randn(50, 5, generator=g), torch.randint(0, 3, (50,), generator=g)
    for k in (1, 5, 20):  # the fallback implements the same formula as the shared metric
        assert local_max_skew_at_k(q, items, groups, k) == pytest.approx(max_skew_at_k(q, items, groups, k), abs=1e-9)


@pytest.mark.parametrize("tower", ["image", "text"])
def test_layer_curves_shapes_and_lens(clip, tower):
    inputs, y = synthetic_images(n=60)
    labels = {"gender": ["F" if int(v) else "M" for v in y], "parity": [str(i % 3) for i in range(60)]}
    rep = locate_bias(clip, tower, inputs, labels, PROMPTS, k=5, attribution=(tower == "text"))
    assert [r["layer"] for r in rep["layers"]] == [0, 1, 2]
    assert rep["lens_matches_output"] is True  # the lens at the last block is the real tower output
    for row in rep["layers"]:
        assert set(row["max_skew"]) == {"gender", "parity"}
        assert all(0.0 <= v <= math.log(1 / 0.3) + 1e-6 for v in row["max_skew"].values())
        for v in row["probe_accuracy"].values():
            assert (v is None) if tower == "text" else 0.0 <= v <= 1.0
    assert rep["group_sizes"]["gender"] == {"F": 30, "M": 30}
    assert rep["final"]["gender"]["max_skew_shuffled"]["sd"] >= 0.0
    if tower == "text":
        assert rep["components"] is None and "labelled captions" in rep["components_note"]
    json.dumps(rep)  # JSON-ready


def test_head_ablation_with_full_basis_removes_exactly_that_head(clip):
    inputs, _ = synthetic_images(n=8)
    parts = tower_parts(clip, "image")
    _, ablated, _ = run_with_stream(clip, "image", inputs, ablate=ablation_hooks("image", 1, "head2", torch.eye(32)))
    out_proj = clip.blocks("image")[1].get_submodule(parts.attn_out)
    dh = 32 // parts.num_heads
    saved = out_proj.weight.detach().clone()
    with torch.no_grad():
        out_proj.weight[:, 2 * dh:3 * dh] = 0
        _, zeroed, _ = run_with_stream(clip, "image", inputs)
        out_proj.weight.copy_(saved)
    assert (ablated - zeroed).abs().max() < 1e-5
    _, base, _ = run_with_stream(clip, "image", inputs)
    assert (ablated - base).abs().max() > 1e-3


def test_planted_head_is_found(clip):
    inputs, y = red_shift_images()
    labels = {"gender": ["F" if int(v) else "M" for v in y]}
    before = locate_bias(clip, "image", inputs, labels, PROMPTS, k=10, attribution=False)
    plant_head(clip, inputs, y)
    rep = locate_bias(clip, "image", inputs, labels, PROMPTS, k=10, heads=True)
    assert rep["final"]["gender"]["probe_accuracy"] > before["final"]["gender"]["probe_accuracy"] + 0.05
    assert len(rep["components"]) == 3 * (2 + 4)
    by_decod = sorted(rep["components"], key=lambda r: r["rank_decodability"])
    # the planted head (and the attention layer that contains it) explain the decodability
    assert {r["component"] for r in by_decod[:2]} == {"L0.head0", "L0.attn"}
    head = next(r for r in by_decod if r["component"] == "L0.head0")
    rest = [r["decodability_effect"] for r in by_decod if r["component"] not in ("L0.head0", "L0.attn")]
    # margins hold over 3 model/data seeds x 2 label orders x n in {200, 400} (checked when written)
    assert head["decodability_effect"] > 0.04 and head["decodability_effect"] > max(rest) + 0.03
    assert sorted(r["rank"] for r in rep["components"]) == list(range(1, 19))


def test_stream_direction_option_runs(clip):
    inputs, y = red_shift_images(n=40)
    rep = locate_bias(clip, "image", inputs, {"g": [str(int(v)) for v in y]}, PROMPTS, k=5, heads=False,
                      direction="stream")
    assert rep["ablation_direction"] == "stream" and len(rep["components"]) == 6


def write_dataset(root, n=24):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    rows = ["file,gender,race"]
    for i in range(n):
        arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
        rows.append(f"{i}.png,{'Male' if i % 2 else 'Female'},{['A', 'B', 'C'][i % 3]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")


def test_cli_writes_report_and_refuses_existing(tmp_path, capsys):
    from debias_export.cli.main import main

    write_dataset(tmp_path / "d")
    args = ["locate", "--model", "tiny-clip", "--data", str(tmp_path / "d"), "--column", "gender", "--column", "race",
            "--prompts", str(tmp_path / "d" / "prompts.txt"), "--k", "4", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    rep = json.loads((tmp_path / "out" / "locate.json").read_text())
    assert (tmp_path / "out" / "locate.png").stat().st_size > 1000
    assert len(rep["layers"]) == 3 and len(rep["components"]) == 3 * (2 + 4)
    assert rep["num_images"] == 24 and rep["column"] == "gender"
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args[:-2] + ["--column", "age", "--out", str(tmp_path / "o2")]) == 2
    assert "label column 'age' not in" in capsys.readouterr().err


def test_cli_on_fairface(tmp_path, shared_data):
    from debias_export.cli.main import main

    args = ["locate", "--model", "tiny-clip", "--data", f"{shared_data}/fairface540", "--column", "gender",
            "--limit", "60", "--no-heads", "--out", str(tmp_path / "ff")]
    assert main(args) == 0
    rep = json.loads((tmp_path / "ff" / "locate.json").read_text())
    assert rep["num_images"] == 60 and rep["num_prompts"] > 100 and rep["prompts"].endswith("occupations.csv")


# ----- every family ------------------------------------------------------------------------------
FAMILY_SPECS = {"hf_clip": "tiny-clip", "hf_dual_encoder": "tiny-dual-encoder", "open_clip": "tiny-open-clip",
                "llava": "tiny-llava"}
CAPTIONS = (["a photo of a woman", "a photo of a man", "a portrait of a woman", "a portrait of a man",
             "a photo of a young woman", "a photo of a young man", "a woman", "a man", "a girl", "a boy"],
            {"gender": ["F", "M"] * 5})


def test_every_registered_family_has_tower_parts():
    from debias_export.adapters import registered_families
    from debias_export.adapters.anatomy import FAMILY_PARTS

    assert set(registered_families()) == set(FAMILY_PARTS) == set(FAMILY_SPECS)


def _family(name):
    from debias_export.workflow.model_specs import load_model_spec

    adapter = load_model_spec(f"{FAMILY_SPECS[name]}:3")
    size = adapter.image_size() if hasattr(adapter, "image_size") else 32
    g = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 2
    px = torch.randn(24, 3, size, size, generator=g)
    px[:, 0] += 0.5 * y[:, None, None]
    return adapter, {"pixel_values": px}, {"gender": ["F" if int(v) else "M" for v in y]}


@pytest.mark.parametrize("family", sorted(FAMILY_SPECS))
def test_image_tower_lens_and_attribution_per_family(family):
    adapter, inputs, labels = _family(family)
    rep = locate_bias(adapter, "image", inputs, labels, PROMPTS, k=5, heads=True)
    assert rep["lens_matches_output"] is True  # the readout reproduces the tower's real output at the consumed block
    assert len(rep["layers"]) == adapter.consumed_layer("image") + 1 == rep["consumed_layer"] + 1
    parts = tower_parts(adapter, "image")
    per_layer = 2 + parts.num_heads
    assert len(rep["components"]) == len(rep["layers"]) * per_layer
    if family == "llava":  # no text tower: decodability is the metric, components ranked by separation
        assert rep["final"]["gender"]["max_skew"] is None and rep["num_prompts"] == 0
        assert all(r["bias_effect"] is None for r in rep["components"])
        sep = [r["separation_effect"] for r in sorted(rep["components"], key=lambda r: r["rank"])]
        assert sep == sorted(sep, reverse=True)
    else:
        assert all(math.isfinite(r["bias_effect"]) for r in rep["components"])
    if family == "open_clip":
        assert "no per-head split" in rep["components_note"]
    directions = rep.pop("directions")  # tensors (the CLI writes them to directions.safetensors); the rest is JSON
    assert directions is None or directions["fair"].shape == (adapter.width("image"),)
    json.dumps(rep)


@pytest.mark.parametrize("family", ["hf_clip", "hf_dual_encoder", "open_clip"])
def test_text_tower_curves_and_attribution_per_family(family):
    adapter, inputs, labels = _family(family)
    rep = locate_bias(adapter, "text", inputs, labels, PROMPTS, k=5, heads=False, captions=CAPTIONS)
    assert rep["lens_matches_output"] is True and rep["num_captions"] == 10
    assert all(0.0 <= row["probe_accuracy"]["gender"] <= 1.0 for row in rep["layers"])
    assert len(rep["components"]) == 2 * adapter.num_layers("text")
    assert {r["role"] for r in rep["components"]} <= {"bias-amplifying", "fairness-reinforcing", "neutral"}


@pytest.mark.parametrize("family,tower", [("hf_clip", "text"), ("hf_dual_encoder", "image"), ("hf_dual_encoder", "text"),
                                          ("open_clip", "image"), ("open_clip", "text"), ("llava", "image")])
@pytest.mark.parametrize("component", ["attn", "mlp"])
def test_full_basis_ablation_zeroes_exactly_that_write(family, tower, component):
    """The hook points are the real writes: ablating with the identity basis == zeroing the write's Linear."""
    adapter, inputs, _ = _family(family)
    if tower == "text":
        inputs = adapter.prepare_texts(PROMPTS)
    parts = tower_parts(adapter, tower)
    width = adapter.width(tower)
    _, ablated, _ = run_with_stream(adapter, tower, inputs, ablate=ablation_hooks(tower, 0, component, torch.eye(width)))
    lin = adapter.blocks(tower)[0].get_submodule(parts.attn_out if component == "attn" else parts.mlp_out)
    saved = {k: v.detach().clone() for k, v in lin.state_dict().items()}
    with torch.no_grad():
        for v in lin.parameters():
            v.zero_()
        _, zeroed, _ = run_with_stream(adapter, tower, inputs)
        lin.load_state_dict(saved)
    _, base, _ = run_with_stream(adapter, tower, inputs)
    assert (ablated - zeroed).abs().max() < 1e-5
    assert (ablated - base).abs().max() > 1e-4


def test_text_locate_cli_builds_captions(tmp_path):
    from debias_export.cli.main import main

    write_dataset(tmp_path / "d")
    out = tmp_path / "t"
    args = ["locate", "--model", "tiny-dual-encoder", "--tower", "text", "--data", str(tmp_path / "d"), "--column", "gender",
            "--prompts", str(tmp_path / "d" / "prompts.txt"), "--k", "4", "--no-heads", "--out", str(out)]
    assert main(args) == 0
    rep = json.loads((out / "locate.json").read_text())
    assert rep["num_captions"] == 6  # 2 genders x 3 templates (the synthetic races are not FairFace names)
    assert rep["components"] and rep["layers"][0]["probe_accuracy"]["gender"] is not None


def test_llava_cli_runs_without_prompts(tmp_path):
    from debias_export.cli.main import main

    write_dataset(tmp_path / "d")
    assert main(["locate", "--model", "tiny-llava", "--data", str(tmp_path / "d"), "--column", "gender",
                 "--out", str(tmp_path / "l")]) == 0
    rep = json.loads((tmp_path / "l" / "locate.json").read_text())
    assert rep["prompts"] is None and rep["bias_metric"].startswith("decodability")
    assert main(["locate", "--model", "tiny-llava", "--tower", "text", "--data", str(tmp_path / "d"), "--column", "gender",
                 "--out", str(tmp_path / "l2")]) == 2


def test_fair_direction_is_the_role_mean_write_difference(clip):
    from debias_export.analysis.locate import fair_direction

    rows = [{"component": "L0.attn", "kind": "attn", "role": "fairness-reinforcing", "_mean_write": torch.tensor([1.0, 0.0])},
            {"component": "L0.mlp", "kind": "mlp", "role": "bias-amplifying", "_mean_write": torch.tensor([0.0, 2.0])},
            {"component": "L1.attn", "kind": "attn", "role": "fairness-reinforcing", "_mean_write": torch.tensor([3.0, 0.0])},
            {"component": "L0.head0", "kind": "head0", "role": "bias-amplifying", "_mean_write": torch.tensor([9.0, 9.0])}]
    out = fair_direction(rows)
    assert torch.allclose(out["fair"], torch.tensor([2.0, -2.0]))  # mean(fair) - mean(bias), heads excluded
    assert out["fair_components"] == ["L0.attn", "L1.attn"] and out["bias_components"] == ["L0.mlp"]
    assert all("_mean_write" not in r for r in rows)
    rows = [{"component": "L0.attn", "kind": "attn", "role": "neutral", "_mean_write": torch.zeros(2)}]
    assert fair_direction(rows) is None
    inputs, y = red_shift_images(n=40)
    rep = locate_bias(clip, "image", inputs, {"g": [str(int(v)) for v in y]}, PROMPTS, k=5, heads=False)
    if rep["directions"] is not None:
        assert rep["directions"]["fair"].shape == (32,) and torch.isfinite(rep["directions"]["fair"]).all()


def test_locate_fair_direction_feeds_project(tmp_path):
    """locate (text tower) -> directions.safetensors -> project --fair-from: amplified fair component in the edit."""
    from safetensors.torch import save_file

    from debias_export.cli.main import main
    from debias_export.edits import load_edit

    write_dataset(tmp_path / "d")
    fair = torch.randn(32, generator=torch.Generator().manual_seed(0))
    # a locate output (the roles on a random tiny model are arbitrary, so the file is written like the CLI does)
    save_file({"fair": fair}, str(tmp_path / "directions.safetensors"))
    (tmp_path / "texts.csv").write_text("text,gender\n" + "\n".join(
        f"a photo of a {w},{g}" for w, g in [("woman", "Female"), ("man", "Male"), ("girl", "Female"), ("boy", "Male")] * 3) + "\n")
    assert main(["capture", "--model", "tiny-dual-encoder", "--site", "text.-1", "--texts", str(tmp_path / "texts.csv"),
                 "--tokens", "output", "--out", str(tmp_path / "cap")]) == 0
    assert main(["project", "--capture", str(tmp_path / "cap"), "--column", "gender", "--fair-from",
                 str(tmp_path / "directions.safetensors"), "--amplify", "0.5", "--out", str(tmp_path / "edit")]) == 0
    edit = load_edit(tmp_path / "edit")
    assert edit.fair.shape == (32, 1) and edit.amplify == 0.5
    # orthogonal to the erased subspace, and still the given direction's remainder
    assert (edit.out_dirs.double().T @ edit.fair.double()).abs().max() < 1e-6
    assert abs(float(torch.nn.functional.cosine_similarity(edit.fair[:, 0].double(), fair.double(), dim=0))) > 0.5


@pytest.mark.parametrize("tower", ["image", "text"])
def test_pairs_gap_curve_ends_at_the_models_own_gap(clip, shared_data, tower):
    """The per-layer PAIRS confidence gap read through the lens equals the real model's gap at the last block."""
    from debias_export.eval.retrieval import EvalData, embed, pairs_metrics

    pairs = EvalData.load(clip, shared_data, prompt_sets=[], fairface=False)
    assert pairs.fairface == [] and "fairface" not in pairs.inputs
    inputs, y = synthetic_images(n=24)
    rep = locate_bias(clip, tower, inputs, {"g": [str(int(v)) for v in y]}, PROMPTS, k=5, attribution=False,
                      pairs=pairs, captions=CAPTIONS if tower == "text" else None)
    curve = [row["pairs_gender_gap"] for row in rep["layers"]]
    assert len(curve) == 3 and all(0.0 <= g["mean"] <= 1.0 for g in curve)
    emb = {k: v for k, v in embed(clip, pairs).items() if k == "pairs" or k.startswith("text:pairs/")}
    real = {s: v["gender_gap"] for s, v in pairs_metrics(emb, pairs).items()}
    assert set(curve[-1]) == set(real) | {"mean"}
    for section, gap in real.items():
        assert curve[-1][section] == pytest.approx(gap, abs=1e-4)
