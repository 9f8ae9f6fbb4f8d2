"""Paired views of a tile and its prior map for DINO / DiRL.

Geometric operations (random resized crop, horizontal/vertical flips, 90° rotations) are applied to the
image and its prior map together (bilinear for the image, nearest for the map); photometric ones (colour
jitter, HED stain jitter, Gaussian blur, greyscale, solarisation) to the image only. Every random draw
comes from a generator seeded by (seed, epoch, tile index, view), so a view is a pure function of those
numbers: runs are reproducible, a resumed run sees exactly the views the uninterrupted one would, and
one process or several DDP ranks produce identical batches.

Each view keeps its geometry (`Geometry`: crop box in tile pixels, flips, rotation) so the region two
views share is known; `overlap_mask` maps the intersection of two crop boxes into a view's output pixels
(used by `match: overlap`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dirl.imaging import EOSIN, HEMATOXYLIN, unit

# ImageNet statistics (timm.data.IMAGENET_DEFAULT_MEAN/STD), used for training from scratch; recorded in
# backbone.json so that extraction normalises the same way.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# HED stain space (dirl.imaging's vectors; the third row completes the basis, as skimage's rgb_from_hed)
_RGB_FROM_HED = torch.tensor(np.stack([unit(HEMATOXYLIN), unit(EOSIN), np.cross(unit(HEMATOXYLIN), unit(EOSIN))]))
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED).float()
_RGB_FROM_HED = _RGB_FROM_HED.float()


@dataclass(frozen=True)
class ViewSpec:
    """How to draw one kind of view (global or local)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    blur_p: float = 1.0
    solarize_p: float = 0.0
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grey_p: float = 0.2
    hed_p: float = 0.5
    hed_sigma: float = 0.05
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flips: bool = True
    rotations: bool = True


@dataclass(frozen=True)
class Geometry:
    """Where a view came from: crop box (top, left, height, width) in tile pixels, then horizontal flip,
    vertical flip and `rot` counter-clockwise quarter turns (torch.rot90 over (H, W)), in that order."""

    top: int
    left: int
    height: int
    width: int
    hflip: bool
    vflip: bool
    rot: int

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(
            [self.top, self.left, self.height, self.width, int(self.hflip), int(self.vflip), self.rot],
            dtype=torch.int64,
        )


def view_rng(seed: int, epoch: int, index: int, view: int) -> np.random.Generator:
    """The generator of one view: a pure function of (seed, epoch, tile index, view number)."""
    return np.random.default_rng([int(seed), int(epoch), int(index), int(view)])


def sample_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with an explicit generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def apply_geometry(x: torch.Tensor, g: Geometry, size: int, mode: str) -> torch.Tensor:
    """Crop, resize to size x size, flip and rotate `x` (..., H, W). mode: 'bilinear' (images, float)
    or 'nearest' (label maps; nearest-exact so a map and a pixel-accurate mask stay aligned)."""
    crop = x[..., g.top : g.top + g.height, g.left : g.left + g.width]
    lead = crop.shape[:-2]
    c4 = crop.reshape(-1, 1, g.height, g.width) if crop.dim() != 4 else crop
    if mode == "bilinear" and x.dtype == torch.uint8 and crop.dim() == 3:
        # uint8 images stay uint8: torch's uint8 antialiased kernel is 3x the float one (rounding < 1/255)
        out = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    elif mode == "bilinear":
        out = F.interpolate(c4.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    else:
        out = F.interpolate(
            c4.float() if c4.dtype != torch.float32 else c4, size=(size, size), mode="nearest-exact"
        ).to(x.dtype)
    out = out.reshape(*lead, size, size)
    return orient(out, g)


def orient(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """The flips and rotation of `g` on the last two dims."""
    if g.hflip:
        x = x.flip(-1)
    if g.vflip:
        x = x.flip(-2)
    if g.rot:
        x = torch.rot90(x, g.rot, dims=(-2, -1))
    return x


def _overlap_axes(g: Geometry, other: Geometry, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which output rows and columns of view `g` (before its flips and rotation) come from source pixels
    inside the crop box of view `other`: (size,) booleans each (the shared region is their product)."""
    y0, y1 = max(g.top, other.top), min(g.top + g.height, other.top + other.height)
    x0, x1 = max(g.left, other.left), min(g.left + g.width, other.left + other.width)
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    ys = g.top + centres * g.height  # source coordinate of each output row / column centre
    xs = g.left + centres * g.width
    return (ys >= y0) & (ys < y1), (xs >= x0) & (xs < x1)


def overlap_mask(g: Geometry, other: Geometry, size: int) -> torch.Tensor:
    """(size, size) float mask of the output pixels of view `g` whose source pixel also lies in the crop
    box of view `other`: the shared region, in `g`'s coordinates (after its flips and rotation)."""
    my, mx = _overlap_axes(g, other, size)
    return orient((my[:, None] & mx[None, :]).float(), g)


def overlap_occupancy(g: Geometry, other: Geometry, size: int, patch: int) -> torch.Tensor:
    """(N,) fraction of each of view `g`'s tokens inside the region it shares with view `other`:
    `mask_occupancy(overlap_mask(...))` without the pixel mask. The mask is a product of a row and a
    column indicator, so its patch means are products of 1-D means; flips and quarter turns move whole
    patches, so they can act on the token grid."""
    my, mx = _overlap_axes(g, other, size)
    fy = my.float().view(-1, patch).mean(1)
    fx = mx.float().view(-1, patch).mean(1)
    return orient(fy[:, None] * fx[None, :], g).flatten()


def _hed_jitter(img: torch.Tensor, rng: np.random.Generator, sigma: float) -> torch.Tensor:
    """Tellez et al. stain augmentation: s' = s * alpha + beta in HED optical-density space."""
    od = -torch.log(img.clamp_min(1e-6))  # (3, H, W)
    hed = torch.einsum("chw,cd->dhw", od, _HED_FROM_RGB)
    alpha = torch.from_numpy(rng.uniform(1 - sigma, 1 + sigma, 3)).float()
    beta = torch.from_numpy(rng.uniform(-sigma, sigma, 3)).float()
    hed = hed * alpha[:, None, None] + beta[:, None, None]
    od = torch.einsum("dhw,dc->chw", hed, _RGB_FROM_HED)
    return torch.exp(-od).clamp(0, 1)


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, (min(img.shape[-2:]) - 1) // 2) or 1
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    # separable, as weighted sums of shifted slices: 2.4x faster on one CPU core than conv2d (groups=3)
    x = F.pad(img[None], (radius, radius, radius, radius), mode="reflect")[0]
    h, w = img.shape[-2:]
    rows = x[..., :w] * k[0]
    for i in range(1, len(k)):
        rows.add_(x[..., i : i + w], alpha=float(k[i]))
    out = rows[..., :h, :] * k[0]
    for i in range(1, len(k)):
        out.add_(rows[..., i : i + h, :], alpha=float(k[i]))
    return out


def _grey(img: torch.Tensor) -> torch.Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def _adjust_hue(img: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue by `shift` turns (as torchvision's adjust_hue): RGB -> HSV, h += shift, back."""
    r, g, b = img.unbind(0)
    v = img.amax(0)
    delta = v - img.amin(0)  # the chroma, v * s
    dc = delta.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / dc, torch.where(v == g, (b - r) / dc + 2.0, (r - g) / dc + 4.0))
    h6 = (h + 6.0 * shift).remainder_(6.0)  # hue in sixths of a turn (grey pixels: any hue, chroma 0)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=img.dtype).view(3, 1, 1)
    k = (n + h6).remainder_(6.0)  # HSV -> RGB: c = v - v s max(0, min(k, 4 - k, 1))
    return v - delta * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def photometric(img: torch.Tensor, rng: np.random.Generator, spec: ViewSpec) -> torch.Tensor:
    """Colour jitter (random order, as torchvision), HED jitter, greyscale, blur, solarisation on a
    float (3, H, W) image in [0, 1]. Every decision is drawn from `rng` in a fixed sequence."""
    draws = rng.random(6)  # fixed number of draws, whatever is enabled
    order = rng.permutation(4)
    factors = (
        rng.uniform(max(0, 1 - spec.brightness), 1 + spec.brightness),
        rng.uniform(max(0, 1 - spec.contrast), 1 + spec.contrast),
        rng.uniform(max(0, 1 - spec.saturation), 1 + spec.saturation),
        rng.uniform(-spec.hue, spec.hue),
    )
    sigma = rng.uniform(*spec.blur_sigma)
    if draws[0] < spec.jitter_p:
        for op in order:
            f = factors[op]
            if op == 0:
                img = (img * f).clamp(0, 1)
            elif op == 1:
                img = (f * img + (1 - f) * _grey(img).mean()).clamp(0, 1)
            elif op == 2:
                img = (f * img + (1 - f) * _grey(img)).clamp(0, 1)
            elif f != 0.0:
                img = _adjust_hue(img, f)
    if draws[1] < spec.hed_p and spec.hed_sigma > 0:
        img = _hed_jitter(img, rng, spec.hed_sigma)
    if draws[2] < spec.grey_p:
        img = _grey(img).expand(3, -1, -1)
    if draws[3] < spec.blur_p:
        img = _gaussian_blur(img, sigma)
    if draws[4] < spec.solarize_p:
        img = torch.where(img >= 0.5, 1.0 - img, img)
    return img


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_INV_STD = 1.0 / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalise(img: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a float (3, H, W) image in [0, 1] (in place when it may)."""
    return img.sub(_MEAN).mul_(_INV_STD)


def draw_geometry(rng: np.random.Generator, tile_px: int, spec: ViewSpec) -> Geometry:
    top, left, h, w = sample_box(rng, tile_px, tile_px, spec.scale, spec.ratio)
    flips = rng.random(2)
    rot = int(rng.integers(0, 4))
    return Geometry(
        top,
        left,
        h,
        w,
        bool(spec.flips and flips[0] < 0.5),
        bool(spec.flips and flips[1] < 0.5),
        rot if spec.rotations else 0,
    )


def make_view(
    image: torch.Tensor,
    prior: torch.Tensor | None,
    rng: np.random.Generator,
    spec: ViewSpec,
    photometric_ops: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, Geometry]:
    """One view: image uint8 (3, T, T) -> normalised float (3, S, S); prior (T, T) -> (S, S) (nearest).

    The geometry is drawn first (from `rng`) and then the photometric parameters, so switching the
    photometric ops off does not change the crop."""
    g = draw_geometry(rng, image.shape[-1], spec)
    crop = apply_geometry(image, g, spec.size, "bilinear")
    img = crop / 255.0 if crop.dtype == torch.uint8 else (crop / 255.0).clamp(0, 1)  # uint8: in range already
    pm = apply_geometry(prior, g, spec.size, "nearest") if prior is not None else None
    if photometric_ops:
        img = photometric(img, rng, spec)
    return normalise(img), pm, g
