"""transformers.js (node, ``@huggingface/transformers`` pinned in tests/js) loads an export bundle and agrees with
onnxruntime-python: the same token ids, the same embeddings on identical inputs (fp32 and int8 graphs, with
SAE edits in both towers), and its own image preprocessing close to ours.

Skips without node or ``tests/js/node_modules`` (``npm ci --prefix tests/js``); CI sets
``DEBIAS_EXPORT_REQUIRE_NODE=1`` so that a missing node is a failure there, not a skip.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer  # the reference for our tokenizer.json: open_clip's own Python BPE
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPProcessor

from debias_export import SAEEdit, apply_edits
from debias_export.export import export_bundle
from debias_export.adapters.hf_clip import HFCLIPAdapter
from debias_export.export.transformers_js import FILES, clip_bpe_document, image_processor_config, tokenizer_files
from debias_export.workflow.testing import random_sae, tiny_clip
from conftest import SHARED_DATA

JS = Path(__file__).parent / "js"
TEXTS = ["a photo of a nurse", "A portrait of a WOMAN, smiling!", "an engineer", "a doctor at work, 2024"]
EMBED_ATOL = 1e-4  # same graph, same inputs: two onnxruntime builds (node 1.21, python 1.23) differ only in float order


def _node() -> str:
    node = shutil.which("node")
    missing = ("node is not on PATH" if node is None else
               f"{JS}/node_modules is missing (run: npm ci --prefix tests/js)"
               if not (JS / "node_modules" / "@huggingface" / "transformers").is_dir() else None)
    if missing:
        if os.environ.get("DEBIAS_EXPORT_REQUIRE_NODE") == "1":
            pytest.fail(f"DEBIAS_EXPORT_REQUIRE_NODE=1 but {missing}")
        pytest.skip(f"transformers.js test needs node + tests/js/node_modules: {missing}")
    return node


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    _node()
    adapter = tiny_clip(seed=0)
    edits = [SAEEdit(site="image.-1", sae=random_sae(32, 96, seed=1), neurons=[2, 9, 40], alpha=0.8),
             SAEEdit(site="text.-1", sae=random_sae(32, 96, seed=2), neurons=list(range(0, 96, 3)), alpha=0.8)]
    apply_edits(adapter, edits)
    out = tmp_path_factory.mktemp("tjs") / "model"
    export_bundle(adapter, out, precisions=["fp32", "int8"])
    return adapter, out


@pytest.fixture(scope="module")
def faces(shared_data_dir):
    images = sorted((Path(shared_data_dir) / "fairface540" / "images").glob("*.jpg"))[:2]
    if len(images) < 2:
        pytest.skip(f"no fairface540 images under {shared_data_dir}")
    return images


@pytest.fixture(scope="module")
def shared_data_dir():
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"shared data not found at {path}")
    return path


def _run_node(bundle_dir: Path, request: dict, tmp: Path) -> dict:
    req = tmp / f"request_{request['dtype']}.json"
    req.write_text(json.dumps(request))
    proc = subprocess.run([_node(), str(JS / "embed.mjs"), str(bundle_dir), str(req)], capture_output=True, text=True,
                          timeout=300, cwd=JS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _arr(t: dict) -> np.ndarray:
    return np.asarray(t["data"]).reshape(t["dims"])


def _tensor(x: torch.Tensor) -> dict:
    return {"dims": list(x.shape), "data": x.flatten().tolist()}


def _ort(path: Path, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})[0]


def test_layout_is_what_transformers_js_reads(bundle):
    _, out = bundle
    for name in FILES:
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "clip" and "auto_map" not in config  # remote code stays in hf/
    assert config["transformers.js_config"]["dtype"] == "fp32"
    assert {"vision_model.onnx", "vision_model_quantized.onnx", "text_model.onnx", "text_model_quantized.onnx"} <= \
        {p.name for p in (out / "onnx").iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(FILES) <= set(manifest["files"])  # the top-level manifest covers them (verify / reproduce)
    assert "transformers.js" in (out / "README.md").read_text()


def test_python_transformers_reads_the_layout_too(bundle):
    adapter, out = bundle
    tok = AutoTokenizer.from_pretrained(out)
    ours = adapter.prepare_texts(TEXTS)  # open_clip's BPE (pads with 0)
    theirs = tok(TEXTS, padding=True, return_tensors="pt")
    mask = ours["attention_mask"].bool()
    assert torch.equal(theirs["attention_mask"], ours["attention_mask"])
    assert torch.equal(theirs["input_ids"][mask], ours["input_ids"][mask])  # same ids up to the pad
    assert (theirs["input_ids"][~mask] == 49407).all() and (ours["input_ids"][~mask] == 0).all()
    proc = CLIPImageProcessor.from_pretrained(out)
    assert proc.crop_size["height"] == adapter.image_size() and proc.size["shortest_edge"] == adapter.image_size()


def test_bpe_document_tokenizes_like_open_clip():
    """Our hand-written tokenizer.json tokenizes like open_clip's reference tokenizer on awkward text."""
    tok = Tokenizer.from_str(json.dumps(clip_bpe_document()))
    ref = SimpleTokenizer()
    for text in [*TEXTS, "Ünïcödé   spaces\tand\nnewlines", "it's they're we'll 1234 #hashtag :-)"]:
        ids = ref.encode(text)
        assert tok.encode(text).ids == [49406, *ids, 49407], text


def test_a_models_own_processor_is_carried_over(tmp_path):
    """A model with its own processor: its image settings and its fast tokenizer go out, with CLIP's pad."""
    adapter = tiny_clip(seed=0)
    doc, cfg = tokenizer_files(adapter)  # no processor: CLIP's BPE
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 32, "width": 40},
                                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]),
                         tokenizer=AutoTokenizer.from_pretrained(tmp_path))
    own = HFCLIPAdapter(adapter.model, source="own", processor=proc)
    image = image_processor_config(own)
    assert image["size"] == {"shortest_edge": 48} and image["crop_size"] == {"height": 32, "width": 40}
    assert image["image_mean"] == [0.5] * 3 and image["image_std"] == [0.25] * 3 and image["resample"] == 3
    doc2, cfg2 = tokenizer_files(own)
    assert cfg2 == cfg and cfg2["pad_token"] == "<|endoftext|>" and cfg2["model_max_length"] == 32
    assert Tokenizer.from_str(json.dumps(doc2)).encode(TEXTS[1]).ids == Tokenizer.from_str(json.dumps(doc)).encode(TEXTS[1]).ids


@pytest.mark.parametrize("dtype,graph_suffix", [("fp32", ""), ("q8", "_quantized")])
def test_node_matches_onnxruntime_python(bundle, faces, tmp_path, dtype, graph_suffix, capsys):
    """Images: the two faces at the tower's size (32 x 32 PNG: the resize is the identity on both sides, so the
    rest of the preprocessing -- RGB, crop, rescale, mean / std, channel order -- must agree to float rounding)
    and as stored (224 x 224 JPEG). On those transformers.js resizes with sharp's bicubic *affine* interpolation,
    which samples without an antialiasing filter, while torchvision / PIL widen the bicubic kernel by the scale;
    at the tiny tower's 7x downscale that aliases, so only the embeddings' direction is bounded (cosine >= 0.9;
    a real CLIP's 224 px input from a 224 px image is a 1x resize)."""
    adapter, out = bundle
    size = adapter.image_size()
    small = []
    for p in faces:
        small.append(tmp_path / f"{p.stem}_{size}.png")
        Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC).save(small[-1])
    images = [*small, *faces]
    pixels = adapter.prepare_images([Image.open(p).convert("RGB") for p in images])["pixel_values"]  # torchvision
    ids = adapter.prepare_texts(TEXTS)  # our BPE, pads with 0
    res = _run_node(out, {"dtype": dtype, "images": [str(p) for p in images], "texts": TEXTS,
                          "pixel_values": _tensor(pixels), "input_ids": _tensor(ids["input_ids"]),
                          "attention_mask": _tensor(ids["attention_mask"])}, tmp_path)

    # token ids: transformers.js == the exported tokenizer == our BPE up to the pad (CLIP pads with EOS)
    js_ids = torch.tensor(_arr(res["input_ids"]))
    assert res["pad_token_id"] == 49407
    assert torch.equal(js_ids, AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")["input_ids"])
    mask = ids["attention_mask"].bool()
    assert torch.equal(torch.tensor(_arr(res["attention_mask"])), ids["attention_mask"])
    assert torch.equal(js_ids[mask], ids["input_ids"][mask])

    vision, text = out / "onnx" / f"vision_model{graph_suffix}.onnx", out / "onnx" / f"text_model{graph_suffix}.onnx"
    # identical inputs: node and python run the same graph
    img_py = _ort(vision, {"pixel_values": pixels})
    d_img = np.abs(_arr(res["image_embeds_given"]) - img_py).max()
    txt_py = _ort(text, ids)
    d_txt = np.abs(_arr(res["text_embeds_given"]) - txt_py).max()
    # transformers.js' own ids (pad 49407) through python: the same embeddings
    d_tok = np.abs(_arr(res["text_embeds"]) - _ort(text, {"input_ids": js_ids, "attention_mask": ids["attention_mask"]})).max()
    # ... and vs our ids (pad 0): an fp32 graph pools at the first EOS, causally, so the pad never reaches
    # text_embeds; an int8 graph quantizes activations with one dynamic scale per tensor, over the padded
    # positions too, so there the pad id moves every row a little: use the exported tokenizer's pad
    d_pad = np.abs(_arr(res["text_embeds"]) - txt_py).max()
    # transformers.js' own preprocessing vs ours
    n = len(small)
    d_pix = np.abs(_arr(res["pixel_values"]) - pixels.numpy())
    img_js = _arr(res["image_embeds"])
    d_img_own = np.abs(img_js - _ort(vision, {"pixel_values": torch.tensor(_arr(res["pixel_values"]), dtype=torch.float32)})).max()
    d_own = np.abs(img_js[:n] - img_py[:n]).max()
    cos = (img_js[n:] * img_py[n:]).sum(-1) / np.linalg.norm(img_js[n:], axis=-1) / np.linalg.norm(img_py[n:], axis=-1)
    with capsys.disabled():
        print(f"\n[transformers.js {dtype}] ids identical; max|diff| on identical inputs: image {d_img:.2e} text {d_txt:.2e}, "
              f"image from its own pixels {d_img_own:.2e}; "
              f"text with its own ids {d_tok:.2e}, vs ours padded with 0 {d_pad:.2e}; {size}px images, own preprocessing: pixels {d_pix[:n].max():.2e} "
              f"embeds {d_own:.2e}; 224px JPEGs: pixels mean {d_pix[n:].mean():.3f} max {d_pix[n:].max():.3f}, "
              f"embedding cosine min {cos.min():.4f}")
    assert max(d_img, d_txt, d_tok, d_img_own) <= EMBED_ATOL
    assert d_pix[:n].max() <= 1e-5
    if dtype == "fp32":  # int8: one dynamic activation scale per batch tensor couples the rows (see d_pad)
        assert d_pad <= EMBED_ATOL and d_own <= EMBED_ATOL and cos.min() >= 0.9
    # the edit is in what transformers.js ran: fp32 matches the patched torch model, not the unmodified one
    if dtype == "fp32":
        with torch.no_grad():
            patched = adapter.embed("image", {"pixel_values": pixels}).numpy()
            plain = tiny_clip(seed=0).embed("image", {"pixel_values": pixels}).numpy()  # same weights, no edit
        assert np.abs(_arr(res["image_embeds_given"]) - patched).max() <= EMBED_ATOL
        assert np.abs(_arr(res["image_embeds_given"]) - plain).max() > 100 * EMBED_ATOL
