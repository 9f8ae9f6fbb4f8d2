"""Synthetic H&E-like whole-slide images, for tests and benchmarks. One module on purpose (the renderer,
its noise, stain model and nuclei, and the pyramid writer share their coordinate conventions).

`render` computes any level-0 region of a virtual slide; `write_slide` streams a whole pyramidal,
tiled JPEG TIFF (Aperio SVS or generic TIFF) that OpenSlide opens.

The virtual slide is a pure function of level-0 pixel coordinates, so a region rendered whole equals
the same region assembled from pieces (pixels and instance labels alike):

* Tissue ("blobs"): a few seeded Gaussian bumps in coordinates normalised by the slide size, plus
  value noise at slide scale and at 300 and 60 µm for an irregular border, thresholded at the level
  that covers 30-50 % of the slide.
* Stroma: eosin with low-frequency variation, collagen-like fibres (periodic anisotropic noise
  textures looked up at domain-warped coordinates), pale gaps, a little background hematoxylin.
* Nuclei: per fixed 256 µm grid cell and population, a Poisson number of candidates seeded by
  (seed, cell, population), kept with probability equal to the tissue fraction at their centre
  (an inhomogeneous Poisson process of intensity density x tissue). Filled ellipses with
  hematoxylin optical density darkness x U(0.6, 0.9), chromatin texture, a darker rim and
  nucleoli for pale nuclei. Overlaps are painted in list order (later on top).
* Colour: Beer-Lambert. Optical densities (log10) of hematoxylin and eosin along skimage's
  `rgb_from_hed` H and E directions, each with a share of its third ("residual") direction as real
  scans show when unmixed with those vectors, are summed, blurred by the optics (a 3-tap binomial
  kernel) and converted to RGB against a white of ~240; glass is that white with sensor noise.
  All noise is seeded by position (hashed lattices or periodic textures), never by call order.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dirl.errors import ConfigError, DirlError
from dirl.imaging import DAB, EOSIN, HEMATOXYLIN, unit
from dirl.settings import Settings, bounded

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# public data types
@dataclass(frozen=True)
class Population:
    name: str
    density_per_mm2: float  # nuclei centres per mm² of tissue
    radius_um: float  # mean equivalent radius sqrt(a*b) of the nucleus ellipse, µm
    elongation: float = 1.0  # major/minor axis ratio (1 = round)
    darkness: float = 1.0  # multiplies the hematoxylin optical density (1.3 dark, 0.6 pale)
    radius_sd: float = 0.12  # relative spread of radius


POPULATIONS: dict[str, Population] = {
    # small, dark, round
    "lymphocyte": Population("lymphocyte", 1800.0, 2.8, elongation=1.1, darkness=1.4, radius_sd=0.10),
    # large, pale (vesicular), elongated, with nucleoli
    "tumour": Population("tumour", 1400.0, 5.5, elongation=1.9, darkness=0.65, radius_sd=0.15),
    # thin spindle nuclei of stroma
    "fibroblast": Population("fibroblast", 400.0, 3.2, elongation=3.2, darkness=1.0, radius_sd=0.12),
}
# names the CLI accepts for several populations at once
PRESETS: dict[str, tuple[str, ...]] = {"mixed": ("lymphocyte", "tumour")}


@dataclass(frozen=True)
class Nucleus:
    x: float
    y: float  # centre, level-0 px
    a: float
    b: float  # semi-axes, level-0 px
    theta: float  # radians
    population: int  # index into the populations tuple


TISSUE_MODES = ("blobs", "full", "none")
FORMATS = ("svs", "tiff")
DEFAULT_SLIDE_SIZE = (4096, 4096)  # what `render(..., slide_size=None)` assumes for "blobs"

# --------------------------------------------------------------------------------------------------
# constants of the model
CELL_UM = 256.0  # nucleus placement grid
FIELD_STEP_UM = 4.0  # lattice of the smooth fields (tissue, stain variation, warps)
TEX = 1024  # period (px) of the periodic textures: fibres, chromatin, sensor noise
MAX_REGION_PX = 1 << 20  # render() works in strips of at most this many pixels
NOISE_SD = 1.4  # sensor noise, RGB units
WHITE = np.array([241.0, 239.0, 240.5], dtype=np.float32)  # glass


_H, _E, _R = unit(HEMATOXYLIN), unit(EOSIN), unit(DAB)  # the residual direction tints both stains
H_OD = (_H + 0.25 * _R).astype(np.float32)  # OD per unit hematoxylin, per RGB channel
E_OD = (_E + 0.80 * _R).astype(np.float32)  # OD per unit eosin
INK_OD = np.log10(WHITE / np.array([55.0, 75.0, 165.0])).astype(np.float32)  # blue marker

_U32 = 0xFFFFFFFF
_OFF = 1 << 20  # cell index offset in keys (cells may be negative: regions beyond the slide)


# --------------------------------------------------------------------------------------------------
# position-seeded noise
def _mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 integer hash (uint32 -> uint32), vectorised."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


@functools.lru_cache(maxsize=1024)
def _salt(*parts: int) -> int:
    h = 0x9E3779B9
    for p in parts:
        h = int(_mix32(np.array([(h ^ (p & _U32)) & _U32], dtype=np.uint32))[0])
        h = (h * 0x01000193 + (p >> 32 & _U32)) & _U32
    return h


def _hash01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [-1, 1) float32 per integer lattice point (broadcasting ix against iy)."""
    ux = (np.asarray(ix, dtype=np.int64) & _U32).astype(np.uint32)
    uy = (np.asarray(iy, dtype=np.int64) & _U32).astype(np.uint32)
    h = _mix32(_mix32(ux ^ np.uint32(salt)) ^ (uy * np.uint32(0x9E3779B1)))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0 / (1 << 24)) - np.float32(1.0)


def _vnoise(x: np.ndarray, y: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Smooth value noise in [-1, 1] at points (level-0 px); features of size ~`scale` px.

    x of shape (1, n) with y of shape (m, 1) is a grid, evaluated separably (same values)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    fx, fy = x / scale, y / scale
    ix, iy = np.floor(fx), np.floor(fy)
    tx, ty = (fx - ix).astype(np.float32), (fy - iy).astype(np.float32)
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    if x.ndim == 2 and y.ndim == 2 and x.shape[0] == 1 and y.shape[1] == 1:  # grid
        bx, by = ix.min(), iy.min()
        v = _hash01(np.arange(bx, ix.max() + 2)[None, :], np.arange(by, iy.max() + 2)[:, None], salt)
        jx, jy = (ix - bx)[0], (iy - by)[:, 0]
        g = v[:, jx] * (1 - tx) + v[:, jx + 1] * tx
        return g[jy] * (1 - ty) + g[jy + 1] * ty
    ix, iy = np.broadcast_arrays(ix, iy)
    v00, v10, v01, v11 = _hash01(np.stack([ix, ix + 1, ix, ix + 1]), np.stack([iy, iy, iy + 1, iy + 1]), salt)
    return (v00 * (1 - tx) + v10 * tx) * (1 - ty) + (v01 * (1 - tx) + v11 * tx) * ty


class _Lattice:
    """The global lattice (i*step, j*step) over a region, for bilinear interpolation of fields
    sampled at its nodes to the region's pixel centres. Every pixel depends on its global position
    only, so regions are exactly seamless."""

    def __init__(self, x0: int, y0: int, w: int, h: int, step: float):
        fx = (np.arange(x0, x0 + w, dtype=np.float64) + 0.5) / step
        fy = (np.arange(y0, y0 + h, dtype=np.float64) + 0.5) / step
        ix, iy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
        self.wx, self.wy = (fx - ix).astype(np.float32), (fy - iy).astype(np.float32)
        self.jx, self.jy = ix - ix[0], iy - iy[0]
        self.X = (np.arange(ix[0], ix[-1] + 2) * step)[None, :]  # node coordinates, (1, nx)
        self.Y = (np.arange(iy[0], iy[-1] + 2) * step)[:, None]  # (ny, 1)

    def interp(self, v: np.ndarray) -> np.ndarray:
        """(C, ny, nx) node values -> (h, C, w) float32 (row-major by pixel row: each row of all
        channels is computed from two node rows in one small, cache-resident operation)."""
        v = np.asarray(v, dtype=np.float32)
        g = v[:, :, self.jx] + (v[:, :, self.jx + 1] - v[:, :, self.jx]) * self.wx  # (C, ny, w)
        g = np.ascontiguousarray(g.transpose(1, 0, 2))  # (ny, C, w)
        d = g[1:] - g[:-1]
        out = np.empty((len(self.jy), v.shape[0], g.shape[2]), dtype=np.float32)
        for r, (j, wr) in enumerate(zip(self.jy.tolist(), self.wy.tolist())):
            o = out[r]
            np.multiply(d[j], wr, out=o)
            o += g[j]
        return out


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


@functools.lru_cache(maxsize=4)
def _textures(mpp: float) -> dict[str, np.ndarray]:
    """Periodic (TEX x TEX) textures: two fibre orientations, chromatin, sensor noise. The same for
    every seed (slides differ by a seeded offset into them), so a new seed costs no FFTs."""
    rng = np.random.default_rng([0x7E47, int(round(mpp * 1e6))])
    k = np.fft.fftfreq(TEX).astype(np.float32)
    kr = np.fft.rfftfreq(TEX).astype(np.float32)
    ky, kx = k[:, None], kr[None, :]

    def filtered(sd_along: float, sd_across: float, angle: float) -> np.ndarray:
        c, s = math.cos(angle), math.sin(angle)
        kpar, kperp = kx * c + ky * s, -kx * s + ky * c
        g = np.exp(-2 * math.pi**2 * ((kpar * sd_along) ** 2 + (kperp * sd_across) ** 2))
        t = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((TEX, TEX), dtype=np.float32)) * g, s=(TEX, TEX))
        return ((t - t.mean()) / t.std()).astype(np.float32)

    a0 = rng.uniform(0, math.pi)
    out = {}
    for i, ang in enumerate((a0, a0 + rng.uniform(0.9, 1.6))):
        fine = filtered(7.0 / mpp, 0.8 / mpp, ang)  # single fibres
        coarse = filtered(28.0 / mpp, 3.5 / mpp, ang)  # bundles and the clefts between them
        dens = np.clip(0.6 + 0.3 * fine, 0, 1) * _smoothstep((coarse + 1.0) * 0.9)
        out[f"fib{i}"] = dens.astype(np.float32).ravel()
    out["fibd"] = out["fib0"] - out["fib1"]
    out["chrom"] = filtered(0.45 / mpp, 0.45 / mpp, 0.0).ravel()
    n = np.clip(rng.standard_normal((3, TEX, TEX), dtype=np.float32), -6, 6) * np.float32(NOISE_SD)
    # the glass intensity with sensor noise (multiplicative, so never negative), + 0.5 so that
    # truncation to uint8 rounds
    out["white"] = ((WHITE + 0.5)[:, None, None] * (1 + n / WHITE[:, None, None])).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------------
# the slide model
@dataclass(frozen=True)
class _Model:
    seed: int
    mpp: float
    populations: tuple[Population, ...]
    tissue: str
    slide_size: tuple[int, int]
    pen: bool = False

    @property
    def cell_px(self) -> float:
        return CELL_UM / self.mpp

    @functools.cached_property
    def blobs(self) -> dict[str, np.ndarray | float]:
        """Parameters of the tissue field and its threshold (for tissue == "blobs")."""
        W, H = self.slide_size
        S = float(max(W, H))
        rng = np.random.default_rng([self.seed & _U32, 0xB10B, W, H])
        k = int(rng.integers(3, 7))
        cx = rng.uniform(0.22, 0.78, k) * W / S
        cy = rng.uniform(0.22, 0.78, k) * H / S
        s1 = rng.uniform(0.07, 0.15, k)
        s2 = s1 * rng.uniform(0.4, 0.9, k)
        ang = rng.uniform(0, math.pi, k)
        amp = rng.uniform(0.8, 1.2, k)
        p = {"S": S, "cx": cx, "cy": cy, "s1": s1, "s2": s2, "ang": ang, "amp": amp, "thr": 0.0, "ramp": 1.0}
        # threshold at the quantile giving the wanted coverage, on a 160 x 160 grid of the slide
        gx = (np.arange(160) + 0.5) * W / 160
        gy = (np.arange(160) + 0.5) * H / 160
        f = self._blob_field(p, gx[None, :], gy[:, None])
        cover = rng.uniform(0.32, 0.48)
        thr = float(np.quantile(f, 1 - cover))
        # ramp: the field change over ~2 µm at the border, so edges are sharp whatever the size
        gyy, gxx = np.gradient(f, H / 160, W / 160)
        near = np.abs(f - thr) < 0.1
        grad = float(np.median(np.hypot(gxx, gyy)[near])) if near.any() else 1.0 / S
        p["thr"], p["ramp"] = thr, max(grad * 2.0 / self.mpp, 1e-6)
        return p

    def _blob_field(self, p: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        S = p["S"]
        u, v = np.asarray(x, np.float64) / S, np.asarray(y, np.float64) / S
        f = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=np.float64)
        for i in range(len(p["cx"])):
            du, dv = u - p["cx"][i], v - p["cy"][i]
            c, s = math.cos(p["ang"][i]), math.sin(p["ang"][i])
            q = ((du * c + dv * s) / p["s1"][i]) ** 2 + ((-du * s + dv * c) / p["s2"][i]) ** 2
            f = f + p["amp"][i] * np.exp(-0.5 * q)
        # irregular border: the bumps' slope is ~1 / (0.1 S) per px, so these amplitudes move the
        # border by up to ~60 and ~15 µm on a large slide (relatively more on a small one)
        um = self.mpp
        a300 = min(0.14, 60.0 / um / (0.1 * S))
        a60 = min(0.06, 15.0 / um / (0.1 * S))
        f = f + 0.20 * _vnoise(x, y, 0.12 * S, _salt(self.seed, 1))
        f = f + a300 * _vnoise(x, y, 300.0 / um, _salt(self.seed, 2))
        f = f + a60 * _vnoise(x, y, 60.0 / um, _salt(self.seed, 3))
        # keep a margin of glass along the slide's border (mostly)
        W, H = self.slide_size
        edge = np.minimum(np.minimum(u, W / S - u), np.minimum(v, H / S - v))
        edge = edge + 0.03 * _vnoise(x, y, 0.08 * S, _salt(self.seed, 4))
        return f - 2.0 * (1 - _smoothstep(edge / 0.12))

    def tissue_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue fraction in [0, 1] at level-0 points (or a grid: x (1, n), y (m, 1))."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if self.tissue != "blobs":
            shape = np.broadcast_shapes(x.shape, y.shape)
            return np.full(shape, 1.0 if self.tissue == "full" else 0.0, dtype=np.float32)
        p = self.blobs
        return np.clip((self._blob_field(p, x, y) - p["thr"]) / p["ramp"] + 0.5, 0, 1).astype(np.float32)

    @property
    def max_extent_px(self) -> float:
        """Largest possible semi-axis of any nucleus, px (z-scores are clipped at 3)."""
        if not self.populations:
            return 0.0
        return (
            max(
                p.radius_um * math.exp(3 * p.radius_sd) * math.sqrt(max(p.elongation, 1.0) * math.exp(0.24))
                for p in self.populations
            )
            / self.mpp
        )

    # ---------------------------------------------------------------------------------------------
    def stroma_nodes(self, X: np.ndarray, Y: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Stroma fields at lattice nodes (t: tissue fraction there): (4, ny, nx) = eosin density
        before the fibre texture, fibre orientation mix, warp x, warp y (px)."""
        seed, um = self.seed, self.mpp
        eos = 0.6 * _vnoise(X, Y, 180 / um, _salt(seed, 10)) + 0.4 * _vnoise(X, Y, 45 / um, _salt(seed, 11))
        gap = 0.65 * _vnoise(X, Y, 14 / um, _salt(seed, 18)) + 0.35 * _vnoise(X, Y, 60 / um, _salt(seed, 19))
        g = _smoothstep((gap - 0.38) * 4.0)
        t = np.broadcast_to(t, g.shape)
        e = t * (0.30 * (1 + 0.3 * eos)) * (1 - 0.85 * g)
        mix = _smoothstep(_vnoise(X, Y, 90 / um, _salt(seed, 13)) * 1.6 + 0.5)
        wx = _vnoise(X, Y, 35 / um, _salt(seed, 14)) * (7 / um) + _vnoise(X, Y, 110 / um, _salt(seed, 16)) * (20 / um)
        wy = _vnoise(X, Y, 35 / um, _salt(seed, 15)) * (7 / um) + _vnoise(X, Y, 110 / um, _salt(seed, 17)) * (20 / um)
        return np.stack([e, mix, wx, wy])

    # ---------------------------------------------------------------------------------------------
    def pen_density(self, x0: int, y0: int, w: int, h: int) -> np.ndarray | None:
        """Blue marker stroke: a wavy line near the top of the slide, mostly over glass."""
        if not self.pen:
            return None
        W, H = self.slide_size
        S = max(W, H)
        half = max(0.012 * S, 12.0 / self.mpp)  # half width, px
        xa, xb = 0.12 * W, 0.88 * W
        yc0, amp, per = 0.09 * H, 0.025 * H, 0.45 * W
        if x0 > xb + half or x0 + w < xa - half or y0 > yc0 + amp + half or y0 + h < yc0 - amp - half:
            return None
        xs = np.arange(x0, x0 + w, dtype=np.float64)[None, :] + 0.5
        ys = np.arange(y0, y0 + h, dtype=np.float64)[:, None] + 0.5
        xc = np.clip(xs, xa, xb)
        yc = yc0 + amp * np.sin(2 * math.pi * xc / per)
        slope = amp * 2 * math.pi / per * np.cos(2 * math.pi * xc / per)
        d = np.hypot((ys - yc) / np.sqrt(1 + slope**2), xs - xc)  # ~distance to the centre line
        streak = 0.85 + 0.15 * _vnoise(xs * 0.05, ys, 6 / self.mpp, _salt(self.seed, 30))  # along the stroke
        dens = np.clip((half - d) / 3.0 + 0.5, 0, 1) * streak
        return dens.astype(np.float32)

    # ---------------------------------------------------------------------------------------------
    def cell_nuclei(self, ix: int, iy: int) -> tuple[np.ndarray, np.ndarray]:
        return _cell_nuclei(self, ix, iy)

    def nuclei_near(self, x0: float, y0: float, x1: float, y1: float) -> tuple[np.ndarray, np.ndarray]:
        """Candidate nuclei whose cell is near [x0, x1) x [y0, y1): params (n, F) and keys (n,),
        sorted by key (the canonical painting order)."""
        if self.tissue == "none" or not self.populations:
            return np.zeros((0, _NF)), np.zeros(0, dtype=np.int64)
        m, c = self.max_extent_px + 2, self.cell_px
        cx0, cx1 = math.floor((x0 - m) / c), math.floor((x1 + m) / c)
        cy0, cy1 = math.floor((y0 - m) / c), math.floor((y1 + m) / c)
        parts = [self.cell_nuclei(ix, iy) for iy in range(cy0, cy1 + 1) for ix in range(cx0, cx1 + 1)]
        params = np.concatenate([p for p, _ in parts])
        keys = np.concatenate([k for _, k in parts])
        e = params[:, _EXT]
        near = (params[:, _X] + e > x0) & (params[:, _X] - e < x1) & (params[:, _Y] + e > y0) & (params[:, _Y] - e < y1)
        return params[near], keys[near]


# nucleus parameter columns
_NF = 14
_X, _Y, _A, _B, _TH, _POP, _DARK, _MEMB, _NLU, _NLV, _NLR, _EXT, _COS, _SIN = range(_NF)


@functools.lru_cache(maxsize=2048)  # ~50 MB at most; a tile row of any slide needs a few hundred
def _cell_nuclei(model: _Model, ix: int, iy: int) -> tuple[np.ndarray, np.ndarray]:
    """The nuclei of one grid cell, all populations: params (n, _NF) and keys (n,), in key order.

    Candidates are drawn at the full density and kept with probability = tissue fraction at their
    centre; the random draws never depend on the tissue, only on (seed, cell, population)."""
    c, um = model.cell_px, model.mpp
    area_mm2 = (CELL_UM / 1000.0) ** 2
    params, keys, keep_u = [], [], []
    for p, pop in enumerate(model.populations):
        rng = np.random.default_rng([model.seed & _U32, 0xCE11, ix + _OFF, iy + _OFF, p])
        n = int(rng.poisson(pop.density_per_mm2 * area_mm2))
        u = rng.random((n, 2))
        z = np.clip(rng.standard_normal((n, 2)), -3, 3)
        theta = rng.random(n) * math.pi
        dark = rng.uniform(0.6, 0.9, n) * pop.darkness
        keep_u.append(rng.random(n))
        nl = rng.random((n, 3))
        x, y = (ix + u[:, 0]) * c, (iy + u[:, 1]) * c
        sd = pop.radius_sd
        r = pop.radius_um * np.exp(sd * z[:, 0] - sd * sd) / um  # E[r²] = radius²
        e = np.maximum(1.0, pop.elongation * np.exp(0.08 * z[:, 1]))
        a, b = r * np.sqrt(e), r / np.sqrt(e)
        memb = np.full(n, min(0.6, max(0.0, 1.1 - pop.darkness)))
        pale = pop.darkness < 0.9
        nl_r = np.where(pale & (nl[:, 2] < 0.7), 0.7 / um, 0.0)
        ang = nl[:, 0] * 2 * math.pi
        rad = 0.35 * np.sqrt(nl[:, 1])
        params.append(
            np.stack(
                [
                    x,
                    y,
                    a,
                    b,
                    theta,
                    np.full(n, p, float),
                    dark,
                    memb,
                    rad * np.cos(ang),
                    rad * np.sin(ang),
                    nl_r,
                    a + 1.0,
                    np.cos(theta),
                    np.sin(theta),
                ],
                axis=1,
            )
        )
        keys.append(((((iy + _OFF) << 21) + (ix + _OFF)) << 21) + (p << 16) + np.arange(n, dtype=np.int64))
    if not params:
        return np.zeros((0, _NF)), np.zeros(0, dtype=np.int64)
    P, K = np.concatenate(params), np.concatenate(keys)
    keep = np.concatenate(keep_u) < model.tissue_at(P[:, _X], P[:, _Y])
    return P[keep], K[keep]


def _paint_nuclei(
    params: np.ndarray,
    X0: int,
    Y0: int,
    W: int,
    H: int,
    chrom: np.ndarray,
    tex_idx: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise nuclei into the region [X0, X0+W) x [Y0, Y0+H), scanline by scanline.

    A pixel belongs to a nucleus when its centre lies in the ellipse. Returns flat pixel indices,
    nucleus index (into params) and that nucleus's hematoxylin OD at the pixel; one entry per
    (pixel, nucleus) pair. Every quantity depends on the nucleus and the global pixel only."""
    empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    n = len(params)
    if n == 0:
        return empty
    # (transcendental functions are evaluated once per cell, in _cell_nuclei: the same bits
    # whatever region asks, so regions stay exactly seamless)
    cx, cy, a, b, c, s = (params[:, k] for k in (_X, _Y, _A, _B, _COS, _SIN))
    ia2, ib2 = 1 / (a * a), 1 / (b * b)
    # ellipse: A dx² + B dx dy + C dy² <= 1
    A = c * c * ia2 + s * s * ib2
    B = 2 * c * s * (ia2 - ib2)
    C = s * s * ia2 + c * c * ib2
    ey = np.sqrt(A / (A * C - B * B / 4))  # vertical half-extent
    gy0 = np.maximum(np.ceil(cy - ey - 0.5), Y0).astype(np.int64)
    gy1 = np.minimum(np.floor(cy + ey - 0.5), Y0 + H - 1).astype(np.int64)
    nrow = np.maximum(gy1 - gy0 + 1, 0)
    if not nrow.any():
        return empty
    # one entry per (nucleus, row)
    rn = np.repeat(np.arange(n), nrow)
    gy = gy0[rn] + (np.arange(len(rn)) - np.repeat(np.cumsum(nrow) - nrow, nrow))
    dy = gy + 0.5 - cy[rn]
    Ar, Br = A[rn], B[rn] * dy
    disc = Br * Br - 4 * Ar * (C[rn] * dy * dy - 1)
    sq = np.sqrt(np.maximum(disc, 0))
    xl = cx[rn] + (-Br - sq) / (2 * Ar)
    xr = cx[rn] + (-Br + sq) / (2 * Ar)
    gx0 = np.maximum(np.ceil(xl - 0.5), X0).astype(np.int64)
    gx1 = np.minimum(np.floor(xr - 0.5), X0 + W - 1).astype(np.int64)
    ncol = np.where(disc >= 0, np.maximum(gx1 - gx0 + 1, 0), 0)
    if not ncol.any():
        return empty
    # one entry per pixel
    er = np.repeat(np.arange(len(rn)), ncol)
    px = gx0[er] + (np.arange(len(er)) - np.repeat(np.cumsum(ncol) - ncol, ncol))
    py = gy[er]
    nid = rn[er]
    # per-nucleus constants, gathered per pixel in one go
    T = np.stack([cx, c, s, 1 / a, 1 / b, params[:, _DARK], params[:, _MEMB]]).astype(np.float32)
    cxe, cs, sn, iae, ibe, dark, memb = T[:, nid]
    dxe = px.astype(np.float32) + np.float32(0.5) - cxe
    dye = dy[er].astype(np.float32)
    u = (dxe * cs + dye * sn) * iae
    v = (dye * cs - dxe * sn) * ibe
    q = np.minimum(u * u + v * v, 1)
    q *= q
    q -= np.float32(0.3)
    q *= memb
    q += 1
    od = dark * q
    od *= np.maximum(0.35, 1 + 0.22 * chrom[tex_idx(px, py)])
    # nucleolus: a small dark dot at (nlu, nlv) in ellipse-normalised coordinates
    has = params[:, _NLR] > 0
    if has.any():
        k = np.flatnonzero(has[nid])
        nk = nid[k]
        du = (u[k] - params[nk, _NLU]) * a[nk]
        dv = (v[k] - params[nk, _NLV]) * b[nk]
        od[k[du * du + dv * dv < params[nk, _NLR] ** 2]] += np.float32(0.5)
    return (py - Y0) * W + (px - X0), nid, od


def _top(pix: np.ndarray, nid: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel, the entry of the last nucleus in painting order (the one on top)."""
    order = np.lexsort((nid, pix))
    pix, nid, val = pix[order], nid[order], val[order]
    last = np.ones(len(pix), dtype=bool)
    last[:-1] = pix[1:] != pix[:-1]
    return pix[last], nid[last], val[last]


def _periodic_blocks(x0: int, y0: int, w: int, h: int) -> Iterator[tuple[tuple[slice, slice], tuple[slice, slice]]]:
    """Split a region into blocks that map onto contiguous slices of a TEX-periodic texture:
    ((region rows, region cols), (texture rows, texture cols))."""

    def split(a0: int, n: int) -> list[tuple[slice, slice]]:
        res, i = [], 0
        while i < n:
            t0 = (a0 + i) % TEX
            k = min(n - i, TEX - t0)
            res.append((slice(i, i + k), slice(t0, t0 + k)))
            i += k
        return res

    for ry, ty in split(y0, h):
        for rx, tx in split(x0, w):
            yield (ry, rx), (ty, tx)


def _blur121(a: np.ndarray) -> np.ndarray:
    """3-tap binomial blur of (H, W) -> (H-2, W-2) (the optics' point spread)."""
    t = a[1:-1] * np.float32(2)
    t += a[:-2]
    t += a[2:]
    o = t[:, 1:-1] * np.float32(2)
    o += t[:, :-2]
    o += t[:, 2:]
    o *= np.float32(1 / 16)
    return o


def _render_region(
    model: _Model, x0: int, y0: int, w: int, h: int, want_labels: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RGB (h, w, 3), labels (h, w) int32 indexing the returned nuclei (1-based), and the nuclei
    with at least one pixel in the region: params (n, F) and keys (n,), in key order.
    want_labels False: the image only (labels all 0, no nuclei returned)."""
    um = model.mpp
    X0, Y0, W, H = x0 - 1, y0 - 1, w + 2, h + 2  # one pixel margin for the blur
    tex = _textures(um)
    # a seed-dependent offset into the periodic textures
    toff = _salt(model.seed, 40)
    tox, toy = toff & (TEX - 1), (toff >> 12) & (TEX - 1)
    xs = np.arange(X0, X0 + W, dtype=np.int64)
    ys = np.arange(Y0, Y0 + H, dtype=np.int64)

    def tex_idx(px: np.ndarray, py: np.ndarray) -> np.ndarray:
        return ((py + toy) & (TEX - 1)) * TEX + ((px + tox) & (TEX - 1))

    lat = _Lattice(X0, Y0, W, H, FIELD_STEP_UM / um)
    t_nodes = None if model.tissue == "none" else model.tissue_at(lat.X, lat.Y)
    tissue = t_nodes is not None and bool(t_nodes.any())
    if model.tissue == "none":
        params, keys = np.zeros((0, _NF)), np.zeros(0, dtype=np.int64)
    else:
        params, keys = model.nuclei_near(X0, Y0, X0 + W, Y0 + H)
    pen = model.pen_density(x0, y0, w, h)
    M = TEX - 1
    labels = np.zeros((h, w), dtype=np.int32)

    if not tissue and len(params) == 0:
        od = None  # glass only
    else:
        if tissue:  # stroma
            f = lat.interp(model.stroma_nodes(lat.X, lat.Y, t_nodes))
            e, mix, wx, wy = (f[:, k] for k in range(4))
            # texture coordinates, warped; + 0.5 and a large multiple of TEX: truncation = rounding
            off = np.float32(0.5 + 64 * TEX)
            fy = ((ys.astype(np.float32)[:, None] + (off + toy)) + wy).astype(np.int32)
            fy &= M
            fy *= TEX
            fx = ((xs.astype(np.float32)[None, :] + (off + tox)) + wx).astype(np.int32)
            fx &= M
            fy += fx
            fib = tex["fibd"].take(fy)
            fib *= mix
            fib += tex["fib1"].take(fy)  # mix * fib0 + (1 - mix) * fib1
            E = fib * np.float32(0.85)
            E += np.float32(0.15)
            E *= e
            Hm = fib * np.float32(0.7 * 0.17)
            Hm += np.float32(0.3 * 0.17)
            Hm *= e  # a little hematoxylin (purple tint) in stroma
        else:
            E = np.zeros((H, W), dtype=np.float32)
            Hm = np.zeros((H, W), dtype=np.float32)
        # nuclei
        if len(params):
            pix, nid, val = _paint_nuclei(params, X0, Y0, W, H, tex["chrom"], tex_idx)
            if want_labels:
                # nuclei with any own pixel in the region, even if painted over by later ones
                r, c = pix // W, pix % W
                present = np.zeros(len(params) + 1, dtype=bool)
                present[1:][nid[(r >= 1) & (r <= H - 2) & (c >= 1) & (c <= W - 2)]] = True
            pix, nid, val = _top(pix, nid, val)
            Hf, Ef = Hm.reshape(-1), E.reshape(-1)
            Hf[pix] = val
            Ef[pix] *= np.float32(0.6)
            if want_labels:
                lab = np.zeros(W * H, dtype=np.int32)
                lab[pix] = nid + 1
                lab = lab.reshape(H, W)[1:-1, 1:-1]
                newid = np.cumsum(present).astype(np.int32) * present
                labels = newid[lab]
                keep = present[1:]
                params, keys = params[keep], keys[keep]
        od = (_blur121(Hm), _blur121(E))
    out = np.empty((h, w, 3), dtype=np.uint8)
    ln10 = np.float32(-math.log(10))
    white = tex["white"]
    for ch in range(3):
        if od is None and pen is None:
            v = None
        else:
            v = np.zeros((h, w), dtype=np.float32) if od is None else od[0] * (H_OD[ch] * ln10)
            if od is not None:
                v += od[1] * (E_OD[ch] * ln10)
            if pen is not None:
                v += pen * (INK_OD[ch] * ln10)
            np.exp(v, out=v)
        for (ry, rx), (ty, tx) in _periodic_blocks(x0 + tox, y0 + toy, w, h):
            if v is None:
                out[ry, rx, ch] = white[ch, ty, tx]  # truncation: white has the +0.5
            else:
                b = v[ry, rx]
                b *= white[ch, ty, tx]
                out[ry, rx, ch] = b
    if len(params) == 0 or not want_labels:
        params, keys = np.zeros((0, _NF)), np.zeros(0, dtype=np.int64)
    return out, labels, params, keys


# --------------------------------------------------------------------------------------------------
# public: render
def _model(
    mpp: float,
    populations: Sequence[Population],
    seed: int,
    tissue: str,
    slide_size: tuple[int, int] | None,
    pen: bool = False,
) -> _Model:
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    if tissue not in TISSUE_MODES:
        raise ValueError(f"tissue must be one of {TISSUE_MODES}, got {tissue!r}")
    pops = tuple(populations)
    for p in pops:
        if not isinstance(p, Population):
            raise TypeError(f"populations must be Population objects, got {p!r}")
        if not (0 <= p.density_per_mm2 <= 1e5 and p.radius_um > 0 and p.elongation > 0 and p.radius_sd >= 0):
            raise ValueError(f"invalid population {p!r}: density 0..1e5 per mm², positive sizes")
    if len(pops) > 15:
        raise ValueError("at most 15 populations")
    size = tuple(int(v) for v in (slide_size or DEFAULT_SLIDE_SIZE))
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"slide_size must be (width, height) > 0, got {slide_size!r}")
    return _cached_model(int(seed), float(mpp), pops, tissue, size, bool(pen))


_cached_model = functools.lru_cache(maxsize=32)(_Model)  # one instance (and caches) per slide


def _nuclei_list(params: np.ndarray) -> list[Nucleus]:
    return [
        Nucleus(float(p[_X]), float(p[_Y]), float(p[_A]), float(p[_B]), float(p[_TH]), int(p[_POP])) for p in params
    ]


def _render_model(
    model: _Model, x0: int, y0: int, w: int, h: int, want_labels: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Render in strips of at most MAX_REGION_PX pixels and merge (seamless by construction)."""
    rows = max(1, MAX_REGION_PX // max(w, 1))
    if rows >= h:
        return _render_region(model, x0, y0, w, h, want_labels)
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    labels = np.zeros((h, w), dtype=np.int32)
    parts = []
    for s in range(0, h, rows):
        hh = min(rows, h - s)
        img, lab, params, keys = _render_region(model, x0, y0 + s, w, hh, want_labels)
        rgb[s : s + hh] = img
        parts.append((s, hh, lab, params, keys))
    all_keys = np.concatenate([p[4] for p in parts])
    all_params = np.concatenate([p[3] for p in parts])
    uk, first = np.unique(all_keys, return_index=True)
    for s, hh, lab, _params, keys in parts:
        lut = np.zeros(len(keys) + 1, dtype=np.int32)
        lut[1:] = np.searchsorted(uk, keys) + 1
        labels[s : s + hh] = lut[lab]
    return rgb, labels, all_params[first], uk


def render(
    x0: int,
    y0: int,
    w: int,
    h: int,
    *,
    mpp: float,
    populations: Sequence[Population],
    seed: int = 0,
    tissue: str = "blobs",
    slide_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[Nucleus]]:
    """Level-0 region of the synthetic slide: RGB uint8 (h, w, 3), int32 instance labels (h, w)
    (0 = no nucleus, 1..n in the order of the returned list), and the nuclei overlapping the region.
    Deterministic: the same slide pixel has the same value whatever region asks for it (nuclei are
    seeded per fixed 256 µm grid cell from `seed`). tissue: "blobs" (a few irregular tissue regions on
    white glass, covering ~30-50 % of slide_size; slide_size None means DEFAULT_SLIDE_SIZE), "full"
    (tissue everywhere), "none" (glass only). A nucleus overlaps the region when a pixel centre of
    the region lies in its ellipse (it may be painted over by later ones). Stain: Beer-Lambert H&E
    model (pink eosin stroma with fibre texture, hematoxylin nuclei with chromatin texture), slight
    noise."""
    x0, y0, w, h = int(x0), int(y0), int(w), int(h)
    if w <= 0 or h <= 0:
        raise ValueError(f"region size must be positive, got {w} x {h}")
    model = _model(mpp, populations, seed, tissue, slide_size)
    rgb, labels, params, _ = _render_model(model, x0, y0, w, h)
    return rgb, labels, _nuclei_list(params)


# --------------------------------------------------------------------------------------------------
# public: write_slide
def _level_dims(width: int, height: int, levels: int | None) -> list[tuple[int, int]]:
    dims = [(width, height)]
    if levels is None:
        while max(dims[-1]) >= 1000:
            w, h = dims[-1]
            dims.append(((w + 1) // 2, (h + 1) // 2))
        return dims
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    for _ in range(levels - 1):
        w, h = dims[-1]
        if w == 1 and h == 1:
            break
        dims.append(((w + 1) // 2, (h + 1) // 2))
    return dims


def _half(img: np.ndarray) -> np.ndarray:
    """2 x 2 area average of (h, w, 3) uint8 (odd sizes: the missing pixel repeats its neighbour)."""
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    r = img[0::2].astype(np.uint16)
    r += img[1::2]
    r = r.reshape(r.shape[0], r.shape[1] // 2, 6)
    s = r[:, :, :3] + r[:, :, 3:]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


class _Scratch:
    """An (h, w, 3) uint8 image in a raw file, written in blocks and read in whole rows with
    positional I/O (no memory map: the process's memory stays flat whatever the slide size)."""

    def __init__(self, path: str, w: int, h: int):
        self.w, self.h = w, h
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, w * h * 3)

    def put(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Write `block` at (x0, y0), clipped to the image."""
        bh, bw = min(block.shape[0], self.h - y0), min(block.shape[1], self.w - x0)
        if bh <= 0 or bw <= 0:
            return
        block = np.ascontiguousarray(block[:bh, :bw])
        if x0 == 0 and bw == self.w:
            os.pwrite(self.fd, block.data, y0 * self.w * 3)
            return
        for r in range(bh):
            os.pwrite(self.fd, block[r].data, ((y0 + r) * self.w + x0) * 3)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        n = (y1 - y0) * self.w * 3
        buf = os.pread(self.fd, n, y0 * self.w * 3)
        if len(buf) != n:
            raise OSError(f"short read from the scratch file ({len(buf)} of {n} bytes)")
        return np.frombuffer(buf, dtype=np.uint8).reshape(y1 - y0, self.w, 3)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _ordered(pool: ThreadPoolExecutor | None, fn: Callable, args: Iterator, ahead: int) -> Iterator:
    """pool.map with at most `ahead` tasks in flight (flat memory), results in order. If the
    consumer stops early (an error), queued tasks are cancelled and running ones waited for."""
    if pool is None:
        yield from (fn(*a) for a in args)
        return
    pending: collections.deque[Future] = collections.deque()
    try:
        for a in args:
            pending.append(pool.submit(fn, *a))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        concurrent.futures.wait(pending)


def _threads() -> int:
    env = os.environ.get("DIRL_SYNTH_THREADS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def write_slide(
    path: str | Path,
    width: int,
    height: int,
    *,
    mpp: float = 0.5,
    fmt: str = "svs",
    populations: Sequence[Population] = (POPULATIONS["lymphocyte"], POPULATIONS["tumour"]),
    seed: int = 0,
    tissue: str = "blobs",
    write_mpp: bool = True,
    pen: bool = False,
    tile: int = 256,
    quality: int = 90,
    levels: int | None = None,
) -> Path:
    """Pyramidal tiled JPEG TIFF that OpenSlide opens. fmt "svs": Aperio-style (ImageDescription
    starting 'Aperio Image Library ...|AppMag = y|MPP = x' so OpenSlide's aperio driver reads mpp,
    a stripped thumbnail as page 1 like Aperio's, and the resolution tags too); fmt "tiff": generic
    tiled TIFF with XResolution/YResolution + ResolutionUnit=CENTIMETER tags and reduced levels
    written with subfiletype=1 (else OpenSlide sees one level). levels None = halve until < ~1000 px;
    levels n = n levels (fewer if the image reaches 1 px). write_mpp False omits every resolution
    field (MPP, AppMag; the TIFF tags then say 1 pixel per unit with ResolutionUnit NONE, which
    tifffile always writes). pen True adds a blue pen stroke. The image is `render` of the same
    slide (slide_size = (width, height); plus the pen), JPEG-compressed. Streams tile by tile: level 0 is rendered
    once, in blocks, on a thread pool (DIRL_SYNTH_THREADS, default: the usable CPUs up to 8); each
    reduced level is the 2 x 2 area average of the one above, kept in a scratch file next to `path`,
    so a 50 000 x 50 000 slide is written with flat memory. Written atomically
    (dirl.store.atomic_path)."""
    import imagecodecs
    import tifffile

    from dirl.store import atomic_path

    path = Path(path)
    width, height, tile, quality = int(width), int(height), int(tile), int(quality)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"slide size must be positive, got {width} x {height}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    model = _model(mpp, populations, seed, tissue, (width, height), pen)
    dims = _level_dims(width, height, levels)
    threads = _threads()
    jpeg = {"level": quality, "subsampling": (2, 2), "colorspace": "RGB", "outcolorspace": "YCBCR"}

    def encode(t: np.ndarray) -> bytes:
        if t.shape[0] != tile or t.shape[1] != tile:  # edge tiles: repeat the border (no ringing)
            t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
        return imagecodecs.jpeg_encode(t, **jpeg)

    mag = round(10.0 / mpp)
    common = {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "subsampling": (2, 2),
        "tile": (tile, tile),
        "dtype": np.uint8,
        "metadata": None,
    }
    big = width * height * 3 * sum(4**-k for k in range(len(dims))) > 3.5 * 2**30
    # SVS: an Aperio-style thumbnail (stripped, page 1; OpenSlide's associated image "thumbnail",
    # and what tifffile's SVS reader expects there), area-averaged by F from the level-0 render
    F = 1
    while max(width, height) > 1024 * F and F < tile:
        F *= 2
    thumb = np.zeros((-(-height // F), -(-width // F), 3), np.float32) if fmt == "svs" else None
    t0 = time.perf_counter()
    with (
        atomic_path(path) as tmp,
        tempfile.TemporaryDirectory(prefix=f".{path.name}.scratch-", dir=path.parent) as scratch,
        ThreadPoolExecutor(threads) as executor,
        tifffile.TiffWriter(tmp, bigtiff=big) as tw,
    ):
        pool = executor if threads > 1 else None
        below: _Scratch | None = None  # the level being built
        above: _Scratch | None = None  # the level being written, k >= 1
        scratches: list[_Scratch] = []  # closed in the end whatever happens
        try:
            for k, (lw, lh) in enumerate(dims):
                nty, ntx = -(-lh // tile), -(-lw // tile)
                if k + 1 < len(dims):
                    nw, nh = dims[k + 1]
                    below = _Scratch(os.path.join(scratch, f"level{k + 1}.raw"), nw, nh)
                    scratches.append(below)
                else:
                    below = None

                def task(
                    ty: int,
                    tx0: int,
                    tx1: int,
                    k: int = k,
                    lw: int = lw,
                    lh: int = lh,
                    src: _Scratch | None = above,
                    dst: _Scratch | None = below,
                ) -> list[bytes]:
                    y0, x0 = ty * tile, tx0 * tile
                    if k == 0:  # render whole tiles (beyond the slide edge too: it is the same slide)
                        img, _, _, _ = _render_model(model, x0, y0, (tx1 - tx0) * tile, tile, want_labels=False)
                    else:
                        img = src.rows(y0, min(y0 + tile, lh))  # whole rows (one task per tile row)
                    half = _half(img) if dst is not None or (thumb is not None and k == 0 and F > 1) else None
                    if dst is not None:
                        dst.put(y0 // 2, x0 // 2, half)
                    if k == 0 and thumb is not None:
                        if F == 1:
                            small = img.astype(np.float32)
                        else:  # from the half-size image: 4 times less to average
                            f = F // 2
                            small = half.reshape(tile // F, f, -1, f, 3).mean((1, 3), dtype=np.float32)
                        ty, tx = y0 // F, x0 // F
                        sh = min(small.shape[0], thumb.shape[0] - ty)
                        sw = min(small.shape[1], thumb.shape[1] - tx)
                        thumb[ty : ty + sh, tx : tx + sw] = small[:sh, :sw]
                    return [encode(img[:, (i - tx0) * tile : (i - tx0 + 1) * tile]) for i in range(tx0, tx1)]

                per = max(1, 2048 // tile) if k == 0 else ntx
                jobs = ((ty, tx, min(tx + per, ntx)) for ty in range(nty) for tx in range(0, ntx, per))
                chunks = _ordered(pool, task, jobs, 3 * threads)
                tiles = (b for chunk in chunks for b in chunk)
                kw: dict = dict(common)
                if fmt == "svs":
                    head = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
                    if k > 0:  # like Aperio's own reduced levels: no key = value fields
                        desc = f"{head} -> {lw}x{lh} JPEG/RGB Q={quality}"
                    else:
                        desc = (
                            f"{head} JPEG/RGB Q={quality}"
                            + (f"|AppMag = {mag}|MPP = {mpp:.6g}" if write_mpp else "")
                            + f"|Filename = {path.stem}"
                            + f"|Synthetic = dirl.synth seed {seed} tissue {tissue}"
                        )
                    kw["description"] = desc.encode("ascii", "replace")
                    kw["subfiletype"] = 0
                else:
                    kw["description"] = f"DiRL synthetic H&E slide: seed {seed}, tissue {tissue}, level {k}"
                    kw["subfiletype"] = 1 if k else 0
                if write_mpp:
                    ds = width / lw
                    kw["resolution"] = (1e4 / (mpp * ds), 1e4 / (mpp * height / lh))
                    kw["resolutionunit"] = "CENTIMETER"
                try:
                    tw.write(tiles, shape=(lh, lw, 3), **kw)
                finally:
                    chunks.close()  # on an error: no task left running on the scratch files
                if k == 0 and thumb is not None:
                    th, tw_ = thumb.shape[:2]
                    desc = f"{head} -> {tw_}x{th} JPEG/RGB Q={quality}"
                    tw.write(
                        np.rint(thumb).astype(np.uint8),
                        photometric="rgb",
                        compression="jpeg",
                        compressionargs={"level": quality},
                        rowsperstrip=16,
                        metadata=None,
                        subsampling=(2, 2),
                        description=desc.encode("ascii", "replace"),
                    )
                above = below
                log.debug("level %d (%d x %d) written after %.1f s", k, lw, lh, time.perf_counter() - t0)
        finally:
            for sc in scratches:
                sc.close()
    log.info(
        "wrote %s: %d x %d px, %d levels, %.3g µm/px%s, in %.1f s",
        path,
        width,
        height,
        len(dims),
        mpp,
        "" if write_mpp else " (not recorded)",
        time.perf_counter() - t0,
    )
    return path


# --------------------------------------------------------------------------------------------------
# CLI: dirl synth
@dataclass(frozen=True)
class SynthSettings(Settings):
    """One synthetic slide of the config's `synth` section."""

    populations: tuple[str, ...] = field(
        default=("lymphocyte", "tumour"),
        metadata={
            "flag": "population",
            "help": f"nucleus populations: {', '.join(sorted(POPULATIONS) + sorted(PRESETS))}",
        },
    )
    width: int = bounded(2048, ge=256)  # level-0 width, px
    height: int = bounded(2048, ge=256)  # level-0 height, px
    mpp: float = bounded(0.5, gt=0)  # µm per pixel at level 0
    seed: int = 0
    format: str | None = field(
        default=None, metadata={"help": "svs (Aperio) or tiff (generic); none: from the file suffix"}
    )
    tissue: str = field(default="blobs", metadata={"choices": TISSUE_MODES})

    def validate(self) -> SynthSettings:
        super().validate()
        known = set(POPULATIONS) | set(PRESETS)
        bad = [n for n in self.populations if n not in known]
        if bad or not self.populations:
            raise ConfigError(f"synth.populations {list(self.populations)}: use {', '.join(sorted(known))}")
        if self.format not in (None, *FORMATS):
            raise ConfigError(f"synth.format {self.format!r}: use one of {', '.join(FORMATS)}")
        return self


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="output slide (.svs or .tif/.tiff)")
    p.add_argument(
        "--no-mpp",
        dest="write_mpp",
        action="store_false",
        help="record no resolution (for testing the missing-µm/px error)",
    )
    p.add_argument("--pen", action="store_true", help="add a blue pen stroke")
    p.add_argument("--tile", type=int, default=256, help="TIFF tile size, px")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--levels", type=int, default=None, help="pyramid levels (default: halve to < 1000 px)")
    SynthSettings.add_arguments(p.add_argument_group("settings (SynthSettings)"))


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [args.out], []


def main(args: argparse.Namespace) -> None:
    s = SynthSettings.from_args(args)
    fmt = s.format or ("tiff" if args.out.suffix.lower() in (".tif", ".tiff") else "svs")
    names: list[str] = []
    for n in s.populations:
        names.extend(PRESETS.get(n, (n,)))
    pops = tuple(POPULATIONS[n] for n in dict.fromkeys(names))
    try:
        write_slide(
            args.out,
            s.width,
            s.height,
            mpp=s.mpp,
            fmt=fmt,
            populations=pops,
            seed=s.seed,
            tissue=s.tissue,
            write_mpp=args.write_mpp,
            pen=args.pen,
            tile=args.tile,
            quality=args.quality,
            levels=args.levels,
        )
    except ValueError as e:
        raise DirlError(f"dirl synth: {e}") from e
