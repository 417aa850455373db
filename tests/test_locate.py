"""locate: logit-lens layer curves, MaxSkew@k, head/MLP ablation, a planted component, and the CLI."""
import json
import math

import pytest
import torch

from debias_export.locate import (ablation_hooks, local_max_skew_at_k, locate_bias, max_skew_at_k, run_with_stream,
                                  tower_parts)

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
        assert rep["components"] is None and "images only" in rep["components_note"]
    json.dumps(rep)  # JSON-ready


def test_head_ablation_with_full_basis_removes_exactly_that_head(clip):
    inputs, _ = synthetic_images(n=8)
    parts = tower_parts(clip, "image")
    _, ablated = run_with_stream(clip, "image", inputs, ablate=ablation_hooks("image", 1, "head2", torch.eye(32)))
    out_proj = clip.blocks("image")[1].get_submodule(parts.attn_out)
    dh = 32 // parts.num_heads
    saved = out_proj.weight.detach().clone()
    with torch.no_grad():
        out_proj.weight[:, 2 * dh:3 * dh] = 0
        _, zeroed = run_with_stream(clip, "image", inputs)
        out_proj.weight.copy_(saved)
    assert (ablated - zeroed).abs().max() < 1e-5
    _, base = run_with_stream(clip, "image", inputs)
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
