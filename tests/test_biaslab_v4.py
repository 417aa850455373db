"""Bias-lab recipe v4: v3 recipes still load / train unchanged, the photo-domain augmentations, the fine-tune
stage (``settings.base``) and the shifted UTKFace validation view."""
import dataclasses
import math

import pytest
import torch
from PIL import Image

from debias_export.core.errors import DebiasError, IntegrityError
from debias_export.workflow.biaslab import BiasLabSettings, ensure_trained, read_recipe
from debias_export.workflow.biaslab import lab as lab_mod
from debias_export.workflow.biaslab.model import read_trained
from debias_export.workflow.biaslab.settings import RECIPE_VERSION, V4_NEUTRAL
from debias_export.workflow.biaslab.shifted import degrade
from debias_export.workflow.biaslab.train import _affine, _blur, _lowres, augment, normalise

TINY = BiasLabSettings(image_size=32, patch_size=8, layers=1, width=32, heads=2, mlp=64, projection_dim=16, epochs=1,
                       batch_size=32, max_images=64)
PHOTO = {"channel_gain": 0.1, "blur_p": 0.5, "blur_sigma_max": 1.2, "lowres_p": 0.5, "lowres_min": 12}


def v3_augment(x: torch.Tensor, s: BiasLabSettings, g: torch.Generator) -> torch.Tensor:
    """Recipe v3's augment, verbatim from before v4 (commit 52b9876): the reference a v3 recipe must still match."""
    n = x.shape[0]
    scale = s.zoom_in_min + torch.rand(n, generator=g) * (s.zoom_out_max - s.zoom_in_min)
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(s.rotate_deg)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * s.shift
    jitter = 1 + (torch.rand(n, 3, generator=g) * 2 - 1) * s.color
    gray_p = torch.rand(n, generator=g) < s.grayscale_p
    xf = _affine(x.float() / 255, scale, angle, flip, shift)
    xf = xf * jitter[:, 0].view(n, 1, 1, 1)
    mean = xf.mean(dim=(1, 2, 3), keepdim=True)
    xf = (xf - mean) * jitter[:, 1].view(n, 1, 1, 1) + mean
    gray = (0.299 * xf[:, 0] + 0.587 * xf[:, 1] + 0.114 * xf[:, 2]).unsqueeze(1)
    sat = torch.where(gray_p, 0.0, jitter[:, 2]).view(n, 1, 1, 1)
    xf = ((xf - gray) * sat + gray).clamp(0, 1)
    return normalise(xf * 255)


# ----- settings -----------------------------------------------------------------------------------------
def test_shipped_v3_recipe_loads_and_writes_back_unchanged():
    d = read_recipe()["settings"]
    assert d["version"] == 3 and not set(V4_NEUTRAL) & set(d)
    s = BiasLabSettings.from_dict(d)
    assert s.to_dict() == d and s.base is None and s.blur_p == 0  # same dict -> same retrain cache key
    assert BiasLabSettings().version == RECIPE_VERSION == 4


def test_v4_settings_round_trip_and_refusals():
    base = BiasLabSettings.from_dict(read_recipe()["settings"])
    s = dataclasses.replace(base, version=4, epochs=2, base=base, **PHOTO)
    d = s.to_dict()
    assert d["base"] == base.to_dict() and BiasLabSettings.from_dict(d) == s
    for bad in ({"version": 3, "blur_p": 0.2}, {"version": 5}, {"blur_p": 1.5}, {"lowres_min": 64},
                {"channel_gain": 1.0}, {"base": dataclasses.replace(base, width=64, mlp=128)}, {"base": {"width": 1}}):
        with pytest.raises(DebiasError, match="bad bias-lab setting"):
            dataclasses.replace(s, **bad)
    with pytest.raises(DebiasError, match="missing"):  # a v4 recipe must be complete
        BiasLabSettings.from_dict({k: v for k, v in d.items() if k != "blur_p"})


# ----- augmentation -------------------------------------------------------------------------------------
def test_a_recipe_without_photo_augmentation_augments_exactly_like_v3():
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for s in (BiasLabSettings.from_dict(read_recipe()["settings"]), BiasLabSettings(color=0.3, grayscale_p=0.2, rotate_deg=5)):
        g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        assert torch.equal(augment(x, s, g1), v3_augment(x, s, g2))
        assert torch.equal(g1.get_state(), g2.get_state())  # and draws the same random numbers


def test_photo_augmentation_is_seeded_and_does_something():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    s = BiasLabSettings(**PHOTO)
    a, b = augment(x, s, torch.Generator().manual_seed(0)), augment(x, s, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, augment(x, BiasLabSettings(), torch.Generator().manual_seed(0)))
    xf = x.float() / 255
    assert torch.equal(_blur(xf, torch.zeros(8)), xf) and torch.equal(_lowres(xf, torch.full((8,), 32)), xf)
    blurred, small = _blur(xf, torch.full((8,), 1.5)), _lowres(xf, torch.full((8,), 8))
    for y in (blurred, small):  # both remove high frequencies: neighbouring pixels get closer
        assert (y.diff(dim=-1).abs().mean() < 0.5 * xf.diff(dim=-1).abs().mean())
    assert torch.allclose(blurred.mean(dim=(2, 3)), xf.mean(dim=(2, 3)), atol=0.02)  # blur keeps the exposure


# ----- the shifted view ---------------------------------------------------------------------------------
def test_shifted_view_is_fixed_per_file():
    y, x = torch.meshgrid(torch.linspace(0, 1, 200), torch.linspace(0, 1, 200), indexing="ij")
    arr = (torch.stack([x, y, (x + y) / 2], -1) * 255).to(torch.uint8)
    img = Image.frombytes("RGB", (200, 200), arr.numpy().tobytes())
    a, b, c = degrade(img, "1_0_0_x.jpg"), degrade(img, "1_0_0_x.jpg"), degrade(img, "2_0_0_y.jpg")
    assert a.size == (200, 200) and a.tobytes() == b.tobytes()
    views = [degrade(img, f"{i}_0_0_z.jpg").tobytes() for i in range(6)]
    assert len(set(views)) == 6 and c.tobytes() != a.tobytes()


# ----- the fine-tune stage ------------------------------------------------------------------------------
def test_fine_tune_stage_retrains_its_base_then_fine_tunes_reproducibly(shared_data, tmp_path):
    stage = dataclasses.replace(TINY, epochs=1, lr=3e-4, base=TINY, **PHOTO)
    logs = []
    path = ensure_trained(stage, shared_data, tmp_path / "cache", progress=False, log=logs.append)
    base = ensure_trained(TINY, shared_data, tmp_path / "cache", progress=False, log=logs.append)
    assert any("reusing" in m for m in logs)  # the base was trained (and cached) on the way
    recipe = read_recipe(path)
    assert recipe["settings"] == stage.to_dict() and recipe["settings"]["base"] == TINY.to_dict()
    mine, start = read_trained(path / lab_mod.WEIGHTS), read_trained(base / lab_mod.WEIGHTS)
    assert any(not torch.equal(mine[k], start[k]) for k in start)  # it trained on from the base's weights
    again = ensure_trained(stage, shared_data, tmp_path / "cache2", progress=False, log=logs.append)
    assert (again / lab_mod.WEIGHTS).read_bytes() == (path / lab_mod.WEIGHTS).read_bytes()
    model, _, _ = lab_mod.load_lab(path)
    assert model.config.vision_config.hidden_size == 32
    other = dataclasses.replace(TINY, seed=1)
    with pytest.raises(IntegrityError, match="base settings"):  # a base folder of another recipe is refused
        lab_mod.start_model(dataclasses.replace(stage, base=other), base)
    with pytest.raises(DebiasError, match="base lab"):
        lab_mod.start_model(stage, None)
