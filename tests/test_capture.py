"""Activation capture against a direct forward: token modes, padding, determinism, resume, errors, CLI."""
import json
import os

import pytest
import torch

from debias_export.capture import ActivationStore, capture_activations
from debias_export.cli.main import main
from debias_export.data.datasets import LabelledImages, TextPrompts
from debias_export.core.errors import DebiasError, IntegrityError
from test_data import write_images

PROMPTS = ["a photo of a nurse", "an engineer", "a long caption about a doctor at work today", "CEO",
           "a smiling teacher in a classroom"]


@pytest.fixture
def images(tmp_path):
    return LabelledImages(write_images(tmp_path / "faces", 7))


@pytest.fixture
def texts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return TextPrompts(p)


def reference(clip, tower, layer, raw):
    """Block ``layer`` output for every token via ``output_hidden_states`` (index 0 is the embeddings)."""
    with torch.no_grad():
        if tower == "image":
            inputs = clip.prepare_images(raw)
            out = clip.model.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        else:
            inputs = clip.prepare_texts(raw)
            out = clip.model.text_model(**inputs, output_hidden_states=True)
    return out.hidden_states[layer + 1], inputs


def all_raw(source):
    return [x for raw, _ in source.batches(100) for x in raw]


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("tokens", ["all", "output", "random-k"])
def test_matches_direct_forward(clip, images, texts, tmp_path, tower, tokens):
    source = images if tower == "image" else texts
    layer = 1
    res = capture_activations(clip, f"{tower}.{layer}", source, tmp_path / "cap", tokens=tokens, k=3, batch_size=2,
                              shard_size=3, progress=False)
    ref, inputs = reference(clip, tower, layer, all_raw(source))
    store = ActivationStore(tmp_path / "cap")
    n, T = ref.shape[:2]
    valid = inputs.get("attention_mask", torch.ones(n, T, dtype=torch.long)).bool()
    acts, rows, pos = store.activations(), store.row_index(), store.token_index()
    expected_tokens = {"all": int(valid.sum()), "output": n, "random-k": 3 * n}[tokens]
    assert res.num_inputs == n and res.num_shards == -(-n // 3) and store.num_tokens == expected_tokens == acts.shape[0]
    assert acts.shape == (expected_tokens, 32) and store.width == 32
    assert torch.allclose(acts, ref[rows, pos], atol=1e-5)
    assert bool(valid[rows, pos].all())  # padding is never stored
    out_idx = clip.output_token_index(tower, inputs)
    assert torch.equal(store.output_token_index(), out_idx)
    if tower == "text":
        assert bool((out_idx > 0).all()) and torch.equal(inputs["input_ids"][torch.arange(n), out_idx], torch.full((n,), 49407))
    assert torch.allclose(store.output_activations(), ref[torch.arange(n), out_idx], atol=1e-5)
    w = valid.unsqueeze(-1).float()
    assert torch.allclose(store.mean_activations(), (ref * w).sum(1) / w.sum(1), atol=1e-5)
    if tokens == "all":
        assert torch.equal(rows, valid.nonzero()[:, 0]) and torch.equal(pos, valid.nonzero()[:, 1])
    if tokens == "output":
        assert torch.equal(pos, out_idx) and torch.equal(rows, torch.arange(n))
    assert store.rows == source.rows and store.settings["site"] == f"{tower}.{layer}.resid_post"


def test_text_padding_excluded_from_mean(clip, texts, tmp_path):
    capture_activations(clip, "text.0", texts, tmp_path / "cap", tokens="all", progress=False)
    store = ActivationStore(tmp_path / "cap")
    ref, inputs = reference(clip, "text", 0, texts.texts)
    lengths = inputs["attention_mask"].sum(1)
    assert int(lengths.min()) < ref.shape[1]  # the batch really is padded
    assert store.num_tokens == int(lengths.sum())
    short = int(lengths.argmin())
    naive = ref[short].mean(0)
    assert not torch.allclose(store.mean_activations()[short], naive, atol=1e-4)
    assert torch.allclose(store.mean_activations()[short], ref[short, :lengths[short]].mean(0), atol=1e-5)


def test_random_k_deterministic_with_replacement(clip, images, texts, tmp_path):
    a = capture_activations(clip, "image.2", images, tmp_path / "a", k=40, batch_size=3, progress=False)
    capture_activations(clip, "image.2", images, tmp_path / "b", k=40, batch_size=7, progress=False)
    capture_activations(clip, "image.2", images, tmp_path / "c", k=40, seed=1, progress=False)
    A, B, C = (ActivationStore(tmp_path / d) for d in "abc")
    assert torch.equal(A.token_index(), B.token_index())  # integer draws: exact
    # batches of 3 vs 7 images are GEMMs of other shapes (BLAS may pick other kernels): equal up to float rounding
    torch.testing.assert_close(A.activations(), B.activations(), rtol=1e-6, atol=1e-6 * float(A.activations().abs().max()))
    assert not torch.equal(A.token_index(), C.token_index())
    pos = A.token_index().reshape(a.num_inputs, 40)
    assert all(len(set(p.tolist())) < 40 for p in pos)  # 40 draws from 17 positions: repeats (with replacement)
    assert int(pos.min()) == 0 and int(pos.max()) == 16  # CLS and the last patch are drawn too
    assert len({tuple(p.tolist()) for p in pos}) == a.num_inputs  # each input draws its own positions
    capture_activations(clip, "text.1", texts, tmp_path / "t", k=30, progress=False)
    t = ActivationStore(tmp_path / "t")
    lengths = clip.prepare_texts(texts.texts)["attention_mask"].sum(1)
    assert bool((t.token_index() < lengths[t.row_index()]).all())


def read_all(path):
    s = ActivationStore(path)
    return s.activations(), s.row_index(), s.token_index(), s.mean_activations(), s.output_activations(), s.rows


def assert_same(a, b):
    for x, y in zip(a[:5], b[:5]):
        assert torch.equal(x, y)
    assert a[5] == b[5]


def test_resume_after_interruption(clip, images, tmp_path, monkeypatch):
    kw = dict(tokens="random-k", k=2, batch_size=2, shard_size=2, progress=False)
    capture_activations(clip, "image.1", images, tmp_path / "full", **kw)
    full = read_all(tmp_path / "full")
    real_load = LabelledImages.load

    def flaky(self, i):
        if i == 5:
            raise KeyboardInterrupt
        return real_load(self, i)

    monkeypatch.setattr(LabelledImages, "load", flaky)
    with pytest.raises(KeyboardInterrupt):
        capture_activations(clip, "image.1", images, tmp_path / "cut", **kw)
    manifest = json.loads((tmp_path / "cut" / "capture.json").read_text())
    assert manifest["status"] == "running" and len(manifest["shards"]) == 2
    with pytest.raises(IntegrityError, match="incomplete"):
        ActivationStore(tmp_path / "cut")
    monkeypatch.setattr(LabelledImages, "load", real_load)
    res = capture_activations(clip, "image.1", images, tmp_path / "cut", **kw)
    assert res.resumed_shards == 2 and res.computed_inputs == 3
    assert_same(read_all(tmp_path / "cut"), full)
    # A complete capture with the same settings is returned without recomputing anything.
    again = capture_activations(clip, "image.1", images, tmp_path / "cut", **kw)
    assert again.computed_inputs == 0 and again.resumed_shards == 4


def test_missing_or_damaged_shard(clip, images, tmp_path):
    kw = dict(batch_size=4, shard_size=3, progress=False)
    capture_activations(clip, "image.0", images, tmp_path / "cap", **kw)
    full = read_all(tmp_path / "cap")
    os.remove(tmp_path / "cap" / "shard-00002.safetensors")
    with pytest.raises(IntegrityError, match="capture shard missing: .*shard-00002.safetensors"):
        ActivationStore(tmp_path / "cap")
    assert capture_activations(clip, "image.0", images, tmp_path / "cap", **kw).resumed_shards == 2
    assert_same(read_all(tmp_path / "cap"), full)
    shard = tmp_path / "cap" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\x00" * 8
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="shard-00001.safetensors does not match its manifest checksum"):
        ActivationStore(tmp_path / "cap").activations()
    assert capture_activations(clip, "image.0", images, tmp_path / "cap", **kw).resumed_shards == 1
    assert_same(read_all(tmp_path / "cap"), full)


def test_refuses_different_settings(clip, images, tmp_path):
    capture_activations(clip, "image.1", images, tmp_path / "cap", k=2, progress=False)
    for change in (dict(k=3), dict(site="image.2"), dict(seed=5), dict(dtype="float16")):
        kw = dict(site="image.1", k=2, progress=False) | change
        with pytest.raises(DebiasError, match="holds a capture with different settings"):
            capture_activations(clip, source=images, out_dir=tmp_path / "cap", **kw)
    from debias_export.workflow.testing import tiny_clip

    with pytest.raises(DebiasError, match="different settings"):  # other weights, same architecture
        capture_activations(tiny_clip(seed=1), "image.1", images, tmp_path / "cap", k=2, progress=False)
    res = capture_activations(clip, "image.1", images, tmp_path / "cap", k=3, overwrite=True, progress=False)
    assert res.resumed_shards == 0 and ActivationStore(tmp_path / "cap").settings["k"] == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DebiasError, match="is not a capture directory"):
        capture_activations(clip, "image.1", images, tmp_path / "other", progress=False)


def test_float16_storage(clip, images, tmp_path):
    capture_activations(clip, "image.1", images, tmp_path / "cap", tokens="output", dtype="float16", progress=False)
    store = ActivationStore(tmp_path / "cap")
    ref, _ = reference(clip, "image", 1, all_raw(images))
    assert store.activations().dtype == torch.float16
    assert torch.allclose(store.activations().float(), ref[:, 0], atol=1e-2, rtol=1e-2)


def test_errors(clip, images, texts, tmp_path):
    with pytest.raises(DebiasError, match="layer 9 out of range"):
        capture_activations(clip, "image.9", images, tmp_path / "a", progress=False)
    with pytest.raises(DebiasError, match="unknown site kind 'mlp_in'"):
        capture_activations(clip, "image.1.mlp_in", images, tmp_path / "a", progress=False)
    with pytest.raises(DebiasError, match="no tower 'audio'"):
        capture_activations(clip, "audio.1", images, tmp_path / "a", progress=False)
    with pytest.raises(DebiasError, match="reads the text tower but the inputs are image inputs"):
        capture_activations(clip, "text.1", images, tmp_path / "a", progress=False)
    with pytest.raises(DebiasError, match="unknown token mode 'some'"):
        capture_activations(clip, "image.1", images, tmp_path / "a", tokens="some", progress=False)
    bad = write_images(tmp_path / "bad", 4)
    (tmp_path / "bad" / "images" / "img_03.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DebiasError, match="cannot read image .*img_03.png"):
        capture_activations(clip, "image.1", LabelledImages(bad), tmp_path / "b", batch_size=2, progress=False)
    with pytest.raises(DebiasError, match="not a capture directory"):
        ActivationStore(tmp_path)


def test_write_sites(clip, images, tmp_path):
    """attn_out / mlp_out sites hook modules that return tensors, not tuples."""
    capture_activations(clip, "image.1.mlp_out", images, tmp_path / "cap", tokens="output", progress=False)
    fc2 = {}
    h = clip.model.vision_model.encoder.layers[1].mlp.fc2.register_forward_hook(lambda m, i, o: fc2.setdefault("o", o))
    with torch.no_grad():
        clip.embed("image", clip.prepare_images(all_raw(images)))
    h.remove()
    assert torch.allclose(ActivationStore(tmp_path / "cap").activations(), fc2["o"][:, 0], atol=1e-5)


def test_cli(tmp_path, capsys):
    csv_path = write_images(tmp_path / "faces", 5)
    args = ["capture", "--model", "tiny-clip", "--site", "image.-1", "--images", str(csv_path), "--out",
            str(tmp_path / "cap"), "--tokens", "output", "--where", "gender=Female", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "captured 2 inputs -> 2 tokens x 32 at image.2.resid_post (output)" in out
    assert ActivationStore(tmp_path / "cap").labels("gender") == ["Female", "Female"]
    assert main(args[:-3] + ["--no-progress"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert main(["capture", "--model", "tiny-clip", "--site", "image.0", "--images", str(csv_path), "--columns",
                 "race", "--out", str(tmp_path / "x")]) == 2
    assert "label column 'race' not in" in capsys.readouterr().err
    assert main(["capture", "--model", "tiny-clip", "--site", "text.0", "--out", str(tmp_path / "y")]) == 2
    assert "exactly one of --images CSV or --texts FILE" in capsys.readouterr().err


def test_shared_fairface_capture(clip, shared_data, tmp_path):
    src = LabelledImages(os.path.join(shared_data, "fairface540", "labels.csv"), limit=6)
    res = capture_activations(clip, "image.-1", src, tmp_path / "cap", batch_size=4, progress=False)
    store = ActivationStore(tmp_path / "cap")
    assert res.num_tokens == 12 and store.labels("race") == [r["race"] for r in src.rows]
    ref, _ = reference(clip, "image", 2, all_raw(src))
    assert torch.allclose(store.activations(), ref[store.row_index(), store.token_index()], atol=1e-5)


@pytest.mark.slow
def test_vit_b16_architecture_capture(tmp_path):
    from transformers import CLIPVisionConfig

    from debias_export.adapters.hf_clip import HFCLIPAdapter

    cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16, projection_dim=512)
    adapter = HFCLIPAdapter.from_config(cfg)
    src = LabelledImages(write_images(tmp_path / "faces", 16, size=(448, 448)))
    res = capture_activations(adapter, "image.11", src, tmp_path / "cap", tokens="all", batch_size=8, progress=False)
    assert res.num_tokens == 16 * 197 and ActivationStore(tmp_path / "cap").activations().shape == (16 * 197, 768)


def test_llava_capture_has_means_but_no_output_token(tmp_path):
    """LLaVA's projector reads every patch token: capture works, output_* are absent with a clear error."""
    import PIL.Image

    from debias_export.adapters.llava import tiny_llava
    from debias_export.capture import ActivationStore, capture_activations
    from debias_export.core.errors import DebiasError

    adapter = tiny_llava(seed=0)
    csv = tmp_path / "labels.csv"
    (tmp_path / "images").mkdir()
    for i in range(4):
        PIL.Image.new("RGB", (40, 40), (60 * i, 20, 200 - 40 * i)).save(tmp_path / "images" / f"{i}.png")
    csv.write_text("file,gender\n" + "".join(f"{i}.png,{'Male' if i % 2 else 'Female'}\n" for i in range(4)))
    from debias_export.data.datasets import LabelledImages

    capture_activations(adapter, "image.-2", LabelledImages(csv), tmp_path / "cap", progress=False)
    store = ActivationStore(tmp_path / "cap")
    assert store.mean_activations().shape[0] == 4 and store.activations().shape[0] == 8
    with pytest.raises(DebiasError, match="no per-input output token"):
        store.output_activations()
    with pytest.raises(DebiasError, match="no single output token"):
        capture_activations(adapter, "image.-2", LabelledImages(csv), tmp_path / "cap2", tokens="output", progress=False)


@pytest.mark.parametrize("tower", ["image", "text"])
def test_an_inputs_cache_shared_by_several_sites_prepares_each_batch_once(clip, images, texts, tmp_path, tower,
                                                                        monkeypatch):
    from debias_export.capture import InputCache

    source = images if tower == "image" else texts
    name = "prepare_images" if tower == "image" else "prepare_texts"
    real, calls = getattr(clip, name), []
    monkeypatch.setattr(clip, name, lambda raw: calls.append(len(raw)) or real(raw))
    cache = InputCache()
    for layer in (0, 1):
        capture_activations(clip, f"{tower}.{layer}", source, tmp_path / f"c{layer}", tokens="all", batch_size=2,
                            shard_size=3, progress=False, inputs_cache=cache)
        capture_activations(clip, f"{tower}.{layer}", source, tmp_path / f"plain{layer}", tokens="all", batch_size=2,
                            shard_size=3, progress=False)
        cached, plain = ActivationStore(tmp_path / f"c{layer}"), ActivationStore(tmp_path / f"plain{layer}")
        assert torch.equal(cached.activations(), plain.activations()) and cached.rows == plain.rows == source.rows
    n = len(source)
    batches = sum(-(-min(3, n - lo) // 2) for lo in range(0, n, 3))  # shards of 3 rows, batches of 2 within each
    assert sum(calls) == 3 * n and len(calls) == 3 * batches  # cached capture once + two uncached ones
    none_kept = InputCache(max_bytes=0)  # past the byte budget nothing is kept: prepared every time, same result
    calls.clear()
    for i in range(2):
        capture_activations(clip, f"{tower}.1", source, tmp_path / f"z{i}", tokens="all", batch_size=2, shard_size=3,
                            progress=False, inputs_cache=none_kept)
    assert sum(calls) == 2 * n and none_kept.bytes == 0
    assert torch.equal(ActivationStore(tmp_path / "z1").activations(), ActivationStore(tmp_path / "plain1").activations())
