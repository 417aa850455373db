"""A fixed, seeded *shifted* view of the UTKFace validation split: a photo-domain stress test (issue #15).

UTKFace validation faces are aligned, tightly cropped, mostly well-lit studio-like images; the lab is meant to
work on in-the-wild photos. This view degrades each validation face by what in-the-wild photos are generally
known to vary in (chosen a priori, never by looking at FairFace or any evaluation set):

- **framing**: the face smaller in the frame (zoom out x1-1.8), off-centre (+-15% of the half-width) and tilted
  (+-15 deg); the new border is filled one of three ways (mirror, defocused mirror = out-of-focus background,
  edge smear) so no single padding style, in particular not training's mirror padding, is what the view rewards;
- **colour**: exposure (brightness x0.6-1.4), contrast (x0.6-1.4), saturation (x0.4-1.4) and white balance
  (per-channel gain x0.85-1.15); 10% grayscale (old / black-and-white photos);
- **resolution / focus**: half the faces downscaled to 24-100 px of the original 200 and upscaled again
  (small faces in a large photo), 30% Gaussian blur (sigma 0.5-2 px at 200 px: focus, motion);
- **compression**: half re-encoded as JPEG at quality 15-60 (web images).

Everything happens at the source resolution (200 px), then the face is resized to the lab's input size like
every other image (PIL bicubic). Random numbers come from a generator seeded by ``sha256(VIEW_SEED + file
name)``, so each face's degradation is fixed, independent of order, subset and machine (up to the JPEG codec).
"""
from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file

from ...data.datasets import load_rgb

VIEW_SEED = "utkface-shifted-v1"
SOURCE = 200  # UTKFace crop size; degradations are defined at this resolution
P_FRAME, ZOOM, SHIFT, ROTATE_DEG = 0.8, (1.0, 1.8), 0.15, 15.0
P_COLOR, BRIGHT, CONTRAST, SATURATION, GAIN = 0.8, (0.6, 1.4), (0.6, 1.4), (0.4, 1.4), 0.15
P_GRAY = 0.1
P_LOWRES, LOWRES_PX = 0.5, (24, 100)
P_BLUR, BLUR_SIGMA = 0.3, (0.5, 2.0)
P_JPEG, JPEG_QUALITY = 0.5, (15, 60)
BORDERS = ("reflection", "defocused", "border")


def _rng(file_name: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256((VIEW_SEED + file_name).encode()).hexdigest()[:15], 16))


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + float(torch.rand((), generator=g)) * (hi - lo)


def _frame(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Zoom out / shift / rotate one float ``[3, H, W]`` image; the uncovered border filled per ``BORDERS``."""
    scale, angle = _u(g, *ZOOM), math.radians(_u(g, -ROTATE_DEG, ROTATE_DEG))
    tx, ty = _u(g, -SHIFT, SHIFT), _u(g, -SHIFT, SHIFT)
    border = BORDERS[int(torch.randint(len(BORDERS), (), generator=g))]
    theta = torch.tensor([[math.cos(angle) * scale, -math.sin(angle) * scale, tx],
                          [math.sin(angle) * scale, math.cos(angle) * scale, ty]]).unsqueeze(0)
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    mode = "border" if border == "border" else "reflection"
    out = F.grid_sample(x[None], grid, mode="bilinear", padding_mode=mode, align_corners=False)[0]
    if border == "defocused":  # background out of focus: blur the mirrored surround, keep the face sharp
        outside = (grid.abs() > 1).any(-1)[0].float()[None]
        soft = _pil_blur(out, 6.0)
        out = soft * outside + out * (1 - outside)
    return out


def _pil_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return _from_pil(_to_pil(x).filter(ImageFilter.GaussianBlur(sigma)))


def _to_pil(x: torch.Tensor) -> Image.Image:
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (arr.shape[1], arr.shape[0]), arr.numpy().tobytes())


def _from_pil(img: Image.Image) -> torch.Tensor:
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1).float() / 255


def degrade(img: Image.Image, file_name: str) -> Image.Image:
    """The shifted view of one face (RGB PIL image in, same size out); fixed by ``file_name``."""
    g = _rng(file_name)
    # every draw happens in a fixed order whether or not its degradation applies, so the steps are independent
    draws = {k: float(torch.rand((), generator=g)) for k in ("frame", "color", "gray", "lowres", "blur", "jpeg")}
    x = _from_pil(img.convert("RGB").resize((SOURCE, SOURCE), Image.BICUBIC))
    if draws["frame"] < P_FRAME:
        x = _frame(x, g)
    if draws["color"] < P_COLOR:
        b, c, s = _u(g, *BRIGHT), _u(g, *CONTRAST), _u(g, *SATURATION)
        gain = torch.tensor([_u(g, 1 - GAIN, 1 + GAIN) for _ in range(3)]).view(3, 1, 1)
        x = x * b * gain
        x = (x - x.mean()) * c + x.mean()
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        x = ((x - gray) * s + gray).clamp(0, 1)
    if draws["gray"] < P_GRAY:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None].expand(3, -1, -1).clamp(0, 1)
    out = _to_pil(x)
    if draws["lowres"] < P_LOWRES:
        px = int(round(_u(g, *LOWRES_PX)))
        out = out.resize((px, px), Image.BILINEAR).resize((SOURCE, SOURCE), Image.BILINEAR)
    if draws["blur"] < P_BLUR:
        out = out.filter(ImageFilter.GaussianBlur(_u(g, *BLUR_SIGMA)))
    if draws["jpeg"] < P_JPEG:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=int(round(_u(g, *JPEG_QUALITY))))
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out


def shifted_images(rows: list[dict], size: int, cache_file: Path | None = None) -> torch.Tensor:
    """uint8 ``[N, 3, size, size]``: :func:`degrade` of every row's image, bicubic-resized (cached on disk)."""
    if cache_file is not None and cache_file.is_file():
        t = load_file(str(cache_file))["images"]
        if t.shape[0] == len(rows) and t.shape[-1] == size:
            return t
    out = torch.empty(len(rows), 3, size, size, dtype=torch.uint8)
    for i, r in enumerate(rows):
        img = degrade(load_rgb(r["path"]), r["file"]).resize((size, size), Image.BICUBIC)
        out[i] = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        save_file({"images": out}, str(tmp))
        tmp.replace(cache_file)
    return out
