"""Projection edits: patched and folded forms vs a literal reference hook; stock checkpoints; ONNX ops."""
import json
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from debias_export import DebiasError, SAEEdit, apply_edits, load_edit
from debias_export.adapters.transformers_compat import pooled
from debias_export.edits.projection import ProjectionEdit, fold_projection, reference_map
from debias_export.analysis.locate import tower_parts
from debias_export.workflow.testing import random_sae


def make_edit(site, d, strength=1.0, amplify=0.5, seed=0, center=True, method="leace"):
    """LEACE edit fitted on synthetic activations with a planted 3-class attribute, plus 2 fair directions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (400,), generator=g)
    x = torch.randn(400, d, generator=g) @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)) + torch.randn(3, d, generator=g)[y] + 0.7
    return ProjectionEdit.fit(site, x, y, method=method, fair=torch.randn(d, 2, generator=g), strength=strength,
                              amplify=amplify, center=center)


def ref_hook(module, fn):
    def hook(mod, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)

    return module.register_forward_hook(hook)


def site_module(clip, edit):
    return clip.model.get_submodule(clip.site_module_path(edit.site))


SITES = [f"{t}.{l}.{k}" for t in ("image", "text") for l in (0, 2) for k in ("resid_post", "attn_out", "mlp_out")]


@pytest.mark.parametrize("site", SITES)
def test_patched_and_folded_match_reference(clip, clip_inputs, site):
    tower = site.split(".")[0]
    edit = make_edit(site, 32)
    inp = clip_inputs[tower]
    with torch.no_grad():
        base = clip.embed(tower, inp)
        h = ref_hook(site_module(clip, edit), lambda o: reference_map(edit, o))
        ref = clip.embed(tower, inp)
        h.remove()
        patch = apply_edits(clip, edit)
        patched = clip.embed(tower, inp)
        patch.remove()
        if not site.endswith("resid_post"):
            fold = fold_projection(clip, edit, mode="site")
            folded = clip.embed(tower, inp)
            fold.remove()
            assert (folded - ref).abs().max() < 1e-5
        assert torch.equal(clip.embed(tower, inp), base)  # both undo exactly
    assert (ref - base).abs().max() > 1e-3  # non-trivial edit
    assert (patched - ref).abs().max() < 1e-5


@pytest.mark.parametrize("tower", ["image", "text"])
def test_output_projection_fold(clip, clip_inputs, tower):
    parts = tower_parts(clip, tower)
    proj = clip.model.get_submodule(parts.projection)
    inp = clip_inputs[tower]
    with pytest.raises(DebiasError, match="has no bias but the edit has a mean term"):
        fold_projection(clip, make_edit(f"{tower}.-1", 16), mode="output")
    assert proj.bias is None  # the refused fold left the model untouched
    for edit, add_bias in ((make_edit(f"{tower}.-1", 16, center=False), False), (make_edit(f"{tower}.-1", 16), True)):
        with torch.no_grad():
            h = ref_hook(proj, lambda o: reference_map(edit, o))
            ref = clip.embed(tower, inp)
            h.remove()
            fold = fold_projection(clip, edit, mode="output", add_bias=add_bias)
            assert fold.describe()["stock"] is not add_bias
            out = clip.embed(tower, inp)
            fold.remove()
        assert (out - ref).abs().max() < 1e-5
    assert clip.model.get_submodule(parts.projection) is proj and proj.bias is None


def every_writer_reference(clip, tower, edit):
    """Literal hooks: linear map on every writer, the mean term once (block 0 attention), embeddings too."""
    parts = tower_parts(clip, tower)
    lin = lambda o: reference_map(edit, o, linear_only=True)
    c = edit.constant().float()
    hooks = [ref_hook(clip.model.get_submodule(p), lin) for p in parts.embedding_writers]
    for layer, block in enumerate(clip.blocks(tower)):
        attn, mlp = block.get_submodule(parts.attn_out), block.get_submodule(parts.mlp_out)
        hooks.append(ref_hook(attn, (lambda o: lin(o) + c) if layer == 0 else lin))
        hooks.append(ref_hook(mlp, lin))
    return hooks


@pytest.mark.parametrize("tower", ["image", "text"])
def test_every_writer_fold(clip, clip_inputs, tower):
    edit = make_edit(f"{tower}.1", 32, amplify=0.0)
    inp = clip_inputs[tower]
    with torch.no_grad():
        hooks = every_writer_reference(clip, tower, edit)
        ref = clip.embed(tower, inp)
        for h in hooks:
            h.remove()
        fold = fold_projection(clip, edit, mode="every_writer")
        streams = []
        grab = [b.register_forward_hook(lambda m, a, o: streams.append(o[0] if isinstance(o, tuple) else o))
                for b in clip.blocks(tower)]
        out = clip.embed(tower, inp)
        for h in grab:
            h.remove()
        fold.remove()
    assert (out - ref).abs().max() < 1e-5
    assert fold.skipped == (["vision_model.pre_layrnorm"] if tower == "image" else [])
    if tower == "text":
        # b = 1: the bias-subspace coordinates of the whole stream are pinned to those of mu at every block
        coords = [((s.double() - edit.mu.double()) @ edit.in_dirs.double()).abs().max() for s in streams]
        scale = max(float((s.double() @ edit.in_dirs.double()).abs().max()) for s in streams)
        assert max(coords) < 1e-4 * scale


@pytest.mark.parametrize("tower", ["image", "text"])
def test_zero_strength_is_identity(clip, clip_inputs, tower):
    edit = make_edit(f"{tower}.1.mlp_out", 32, strength=0.0, amplify=0.0)
    inp = clip_inputs[tower]
    with torch.no_grad():
        base = clip.embed(tower, inp)
        p = apply_edits(clip, edit)
        assert torch.equal(clip.embed(tower, inp), base)
        p.remove()
        before = {k: v.clone() for k, v in clip.model.state_dict().items()}
        fold = fold_projection(clip, edit, mode="every_writer")
        assert all(torch.equal(v, before[k]) for k, v in clip.model.state_dict().items())
        fold.remove()


def test_combined_with_sae_edits(clip, clip_inputs):
    proj = make_edit("image.1", 32)
    sae_same = SAEEdit(site="image.1", sae=random_sae(32, 64), neurons=[2, 5], alpha=0.6)
    sae_other = SAEEdit(site="image.2", sae=random_sae(32, 64, seed=1), neurons=[7], alpha=0.6, mode="residual")
    proj_mlp = make_edit("image.2.mlp_out", 32, seed=3)
    from debias_export.edits import reference_formula

    inp = clip_inputs["image"]
    with torch.no_grad():
        blocks = clip.blocks("image")
        hooks = [ref_hook(blocks[1], lambda o: reference_map(proj, o)),  # chained in edit order
                 ref_hook(blocks[1], lambda o: reference_formula(sae_same, o)),
                 ref_hook(blocks[2].mlp.fc2, lambda o: reference_map(proj_mlp, o)),
                 ref_hook(blocks[2], lambda o: reference_formula(sae_other, o))]
        ref = clip.embed("image", inp)
        for h in hooks:
            h.remove()
        patch = apply_edits(clip, [proj, sae_same, proj_mlp, sae_other])
        kinds = {r["site"]: [e["type"] for e in r["edits"]] for r in patch.records}
        out = clip.embed("image", inp)
        patch.remove()
    assert kinds == {"image.1.resid_post": ["lowrank", "sae"], "image.2.mlp_out": ["lowrank"],
                     "image.2.resid_post": ["sae"]}
    assert (out - ref).abs().max() < 1e-5


def test_save_load_round_trip(tmp_path, clip, clip_inputs):
    edit = make_edit("text.2.attn_out", 32, method="mean_diff", amplify=0.3)
    edit.save(tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "edit_config.json").read_text())
    assert cfg["kind"] == "projection" and cfg["rank"] == 2 and cfg["fair_rank"] == 2
    again = load_edit(tmp_path / "e")
    assert isinstance(again, ProjectionEdit) and again.to_json() == edit.to_json()
    assert torch.allclose(again.matrix(), edit.matrix(), atol=1e-6)  # saved as float32


STOCK_CHECK = textwrap.dedent("""
    import sys
    sys.modules["debias_export"] = None  # the folded checkpoint must not need this package
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPModel
    m = CLIPModel.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
    t = load_file(sys.argv[2])
    with torch.no_grad():
        img = m.get_image_features(pixel_values=t["pixel_values"])
        txt = m.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))  # transformers 5 returns output objects
    print(float((img - t["image"]).abs().max()), float((txt - t["text"]).abs().max()))
""")


def test_folded_model_is_a_stock_checkpoint(tmp_path, clip, clip_inputs):
    folds = [fold_projection(clip, make_edit("image.1.attn_out", 32), mode="site"),
             fold_projection(clip, make_edit("text.2.mlp_out", 32, seed=1), mode="site"),
             fold_projection(clip, make_edit("text.0", 32, seed=2), mode="every_writer"),
             fold_projection(clip, make_edit("image.-1", 16, seed=4, center=False), mode="output")]
    with torch.no_grad():
        expect = {"image": clip.embed("image", clip_inputs["image"]), "text": clip.embed("text", clip_inputs["text"])}
    clip.model.save_pretrained(tmp_path / "model")
    tensors = {**expect, **clip_inputs["image"], **clip_inputs["text"]}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "io.safetensors"))
    script = tmp_path / "check.py"
    script.write_text(STOCK_CHECK)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "io.safetensors")],
                         capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    img_err, txt_err = map(float, res.stdout.split())
    assert img_err < 1e-5 and txt_err < 1e-5
    for f in folds:
        f.remove()


class ImageTower(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return pooled(self.model.get_image_features(pixel_values=pixel_values))


def onnx_ops(model, x, path):
    import onnx

    torch.onnx.export(ImageTower(model), (x,), str(path), dynamo=False, input_names=["pixel_values"], opset_version=17)
    # Identity nodes alias weights the exporter de-duplicated (random init has equal LayerNorm/bias
    # tensors; folding makes some distinct): they depend on values, not on the architecture.
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node if n.op_type != "Identity")


def test_folded_onnx_has_the_same_operators(tmp_path, clip, clip_inputs):
    x = clip_inputs["image"]["pixel_values"]
    before = onnx_ops(clip.model, x, tmp_path / "a.onnx")
    fold_projection(clip, make_edit("image.1.attn_out", 32), mode="site")
    fold_projection(clip, make_edit("image.2", 32, seed=1), mode="every_writer")
    fold_projection(clip, make_edit("image.-1", 16, seed=2, center=False), mode="output")
    after = onnx_ops(clip.model, x, tmp_path / "b.onnx")
    assert before == after and before["MatMul"] > 0


def test_errors_name_the_problem(clip):
    with pytest.raises(DebiasError, match="width 16 does not match site image.1.resid_post width 32"):
        apply_edits(clip, make_edit("image.1", 16))
    with pytest.raises(DebiasError, match="block output, not a Linear's output"):
        fold_projection(clip, make_edit("image.1", 32), mode="site")
    with pytest.raises(DebiasError, match="unknown fold mode"):
        fold_projection(clip, make_edit("image.1", 32), mode="all")
    with pytest.raises(DebiasError, match="not orthonormal"):
        ProjectionEdit(site="image.1", fair=torch.ones(32, 2))
    with pytest.raises(DebiasError, match="strength must be finite"):
        make_edit("image.1", 32, strength=float("nan"))
    p = apply_edits(clip, make_edit("image.1.mlp_out", 32))
    with pytest.raises(DebiasError, match="patched by apply_edits"):
        fold_projection(clip, make_edit("image.1.mlp_out", 32), mode="site")
    p.remove()


def test_fitted_edit_erases_the_attribute_inside_the_model(clip):
    """End to end: fit LEACE on CLS activations of block 1, patch the block, re-read: no cross-covariance left."""
    from debias_export.analysis.leace import one_hot

    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 3
    px = torch.randn(96, 3, 32, 32, generator=g)
    px[:, 0] += 0.5 * (y == 1)[:, None, None]
    px[:, 2] += 0.5 * (y == 2)[:, None, None]
    inp = {"pixel_values": px}

    def cls_after_block1():
        acts = []
        h = clip.blocks("image")[1].register_forward_hook(  # a tuple on transformers 4.x, a tensor on 5.x
                lambda m, a, o: acts.append((o[0] if isinstance(o, tuple) else o)[:, 0]))
        with torch.no_grad():
            clip.embed("image", inp)
        h.remove()
        return acts[0].double()

    def xcov(x):
        z = one_hot(y)
        return ((x - x.mean(0)).T @ (z - z.mean(0))).norm()

    x = cls_after_block1()
    edit = ProjectionEdit.fit("image.1", x.float(), y)
    patch = apply_edits(clip, edit)
    erased = cls_after_block1()
    patch.remove()
    assert xcov(erased) / xcov(x) < 1e-4  # float32 forward; exact (1e-6) in float64 (test_leace)


def test_fold_mode_is_saved_and_checked(tmp_path):
    edit = make_edit("image.1.mlp_out", 32, amplify=0.0)
    edit.fold = "site"
    edit.save(tmp_path / "e")
    assert load_edit(tmp_path / "e").fold == "site"
    cfg = json.loads((tmp_path / "e" / "edit_config.json").read_text())
    cfg.pop("fold")  # edits saved before fold modes existed are patched
    (tmp_path / "e" / "edit_config.json").write_text(json.dumps(cfg))
    assert load_edit(tmp_path / "e").fold == "none"
    with pytest.raises(DebiasError, match="unknown fold mode 'all'"):
        ProjectionEdit(site="image.1", in_dirs=edit.in_dirs, out_dirs=edit.out_dirs, mu=edit.mu, fold="all")
