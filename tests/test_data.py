"""Labelled image / prompt sources: column and file checks, filters, prompt expansion, data-dir lookup."""
import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from debias_export.data.datasets import (LabelledImages, TextPrompts, default_data_dir, load_rgb, parse_where,
                                         resolve_data_path)
from debias_export.core.errors import DebiasError


def write_images(root: Path, n: int = 5, subdir: str = "images", size=(40, 30)) -> Path:
    """A tiny FairFace-like dataset: labels.csv + coloured PNGs under ``subdir``."""
    (root / subdir).mkdir(parents=True, exist_ok=True)
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "gender", "age"])
        for i in range(n):
            name = f"img_{i:02d}.png"
            Image.new("RGB", size, (40 * i % 256, 80, 200 - 10 * i)).save(root / subdir / name)
            w.writerow([name, "Female" if i % 2 else "Male", str(20 + i)])
    return root / "labels.csv"


def test_rows_columns_and_batches(tmp_path):
    src = LabelledImages(write_images(tmp_path, 5))
    assert len(src) == 5 and src.image_dir == tmp_path / "images"
    assert src.columns == ["gender", "age"]
    assert src.rows[1] == {"file": "img_01.png", "gender": "Female", "age": "21"}
    batches = list(src.batches(2))
    assert [len(imgs) for imgs, _ in batches] == [2, 2, 1]
    img = batches[0][0][0]
    assert img.mode == "RGB" and img.size == (40, 30)
    assert [r["file"] for r in batches[2][1]] == ["img_04.png"]
    assert [r["file"] for _, rows in src.batches(2, start=3, stop=4) for r in rows] == ["img_03.png"]
    assert LabelledImages(tmp_path / "labels.csv", columns=["age"]).rows[0] == {"file": "img_00.png", "age": "20"}


def test_image_dir_next_to_csv(tmp_path):
    src = LabelledImages(write_images(tmp_path, 2, subdir=""))
    assert src.image_dir == tmp_path and src.load(0).size == (40, 30)


def test_limit_and_filters(tmp_path):
    path = write_images(tmp_path, 6)
    assert len(LabelledImages(path, limit=2)) == 2
    women = LabelledImages(path, filter={"gender": "Female"})
    assert [r["file"] for r in women.rows] == ["img_01.png", "img_03.png", "img_05.png"]
    assert len(LabelledImages(path, filter={"age": ["20", "25"]})) == 2
    assert len(LabelledImages(path, filter=lambda r: r["gender"] != "Male", limit=1)) == 1
    with pytest.raises(DebiasError, match="filter column 'race' not in .*columns: file, gender, age"):
        LabelledImages(path, filter={"race": "White"})


def test_missing_columns_name_what_exists(tmp_path):
    path = write_images(tmp_path, 2)
    with pytest.raises(DebiasError, match="file column 'path' not in .*columns: file, gender, age"):
        LabelledImages(path, file_column="path")
    with pytest.raises(DebiasError, match="label column 'race' not in .*columns: file, gender, age"):
        LabelledImages(path, columns=["gender", "race"])


def test_missing_image_is_found_up_front(tmp_path):
    path = write_images(tmp_path, 3)
    os.remove(tmp_path / "images" / "img_02.png")
    with pytest.raises(DebiasError, match="image file not found: .*img_02.png"):
        LabelledImages(path)
    assert len(LabelledImages(path, limit=2)) == 2  # only selected rows are checked


def test_unreadable_image_named_when_opened(tmp_path):
    path = write_images(tmp_path, 3)
    (tmp_path / "images" / "img_01.png").write_bytes(b"not a png at all")
    src = LabelledImages(path)  # exists, so construction succeeds
    src.load(0)
    with pytest.raises(DebiasError, match="cannot read image .*img_01.png"):
        src.load(1)


def test_missing_csv_and_image_dir(tmp_path):
    with pytest.raises(DebiasError, match="CSV file not found"):
        LabelledImages(tmp_path / "nope.csv")
    with pytest.raises(DebiasError, match="image directory not found"):
        LabelledImages(write_images(tmp_path, 1), image_dir=tmp_path / "elsewhere")


def test_text_file_prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a photo of a nurse\n\n  an engineer  \n")
    src = TextPrompts(p)
    assert src.texts == ["a photo of a nurse", "an engineer"]
    assert list(src.batches(1))[1] == (["an engineer"], [{"text": "an engineer"}])


def test_template_concept_csv_is_a_cross_product(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("template,concept\nA photo of a {},nurse\nThis is a {},CEO\n,doctor\n")
    src = TextPrompts(p)
    assert len(src) == 6
    assert src.rows[0] == {"text": "A photo of a nurse", "template": "A photo of a {}", "concept": "nurse"}
    assert src.texts[-1] == "This is a doctor"
    rows = TextPrompts(p, pairing="rows")
    assert rows.texts[:2] == ["A photo of a nurse", "This is a CEO"]
    assert len(TextPrompts(p, filter={"concept": "CEO"})) == 2


def test_prompt_csv_errors(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("phrase,word\nx,y\n")
    with pytest.raises(DebiasError, match="needs 'template' and 'concept' columns.*columns: phrase, word"):
        TextPrompts(p)
    p.write_text("template,concept\nA {0} {1},nurse\n")
    with pytest.raises(DebiasError, match=r"line 2: template 'A \{0\} \{1\}' cannot be formatted"):
        TextPrompts(p)
    p.write_text("prompt\nhello\n")
    assert TextPrompts(p).texts == ["hello"]
    with pytest.raises(DebiasError, match="prompt file not found"):
        TextPrompts(tmp_path / "missing.txt")


def test_default_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DEBIAS_EXPORT_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()
    write_images(tmp_path / "faces", 1)
    assert resolve_data_path("faces/labels.csv") == tmp_path.resolve() / "faces" / "labels.csv"
    assert resolve_data_path("other/labels.csv") == Path("other/labels.csv")
    monkeypatch.setenv("DEBIAS_EXPORT_DATA", str(tmp_path / "missing"))
    with pytest.raises(DebiasError, match="DEBIAS_EXPORT_DATA=.*missing is not a directory"):
        default_data_dir()


def test_parse_where():
    assert parse_where(["gender=Female", "race=White,Black", "gender=Male"]) == {
        "gender": ["Female", "Male"], "race": ["White", "Black"]}
    with pytest.raises(DebiasError, match="bad --where 'gender'"):
        parse_where(["gender"])


def test_shared_fairface_pairs_and_prompts(shared_data):
    ff = LabelledImages(os.path.join(shared_data, "fairface540", "labels.csv"))
    assert len(ff) == 540 and ff.columns == ["age", "gender", "race", "fairface_file"]
    assert ff.image_dir.name == "images" and ff.load(0).mode == "RGB"
    assert {r["gender"] for r in ff.rows} == {"Male", "Female"}
    pairs = LabelledImages(os.path.join(shared_data, "pairs", "labels.csv"), filter={"section": "occupations"})
    assert len(pairs) == 80 and pairs.load(0).mode == "RGB"
    occ = TextPrompts(os.path.join(shared_data, "prompts", "occupations.csv"))
    assert len(occ) == 7 * 41 and occ.rows[0]["concept"] == "doctor"


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """Every 16-bit value maps to round(v / 257); PIL's own convert("RGB") clips everything above 255."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(values).save(tmp_path / "all.png")
    with Image.open(tmp_path / "all.png") as img:
        assert img.mode == "I;16"
        assert (np.asarray(img.convert("RGB")) == 255).mean() > 0.99  # the bug this guards against
    rgb = np.asarray(load_rgb(tmp_path / "all.png"))
    want = (values.astype(np.int64) * 255 + 32767) // 65535  # round(v * 255 / 65535) in integers
    assert rgb.dtype == np.uint8 and rgb.shape == (256, 256, 3)
    assert np.array_equal(rgb[..., 0], want) and np.array_equal(rgb[..., 1], want) and np.array_equal(rgb[..., 2], want)
    assert np.array_equal(want, np.rint(values / 257.0))  # the same thing as v / 257, rounded
