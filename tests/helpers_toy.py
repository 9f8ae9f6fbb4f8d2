"""A toy cohort for pretraining and attention tests: tiny tile and prior stores with known classes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dirl import store

# `dirl pretrain` flags of a model small enough for tests (ViT-Tiny at 64 px, small heads)
TINY_SETTINGS = dict(
    arch="vit_tiny_patch16_224",
    img_size=64,
    out_dim=256,
    dense_out_dim=128,
    head_hidden_dim=256,
    num_workers=0,
    log_every=1,
    warmup_epochs=0,
)
TINY_PRETRAIN = [f for k, v in TINY_SETTINGS.items() for f in (f"--{k.replace('_', '-')}", str(v))]  # as CLI flags


def write_toy_cohort(
    root: str | os.PathLike,
    n_slides: int = 2,
    n_tiles: int = 8,
    tile_px: int = 64,
    n_cell_classes: int = 2,
    seed: int = 0,
    write_n_classes: bool = True,
) -> tuple[list[Path], list[Path]]:
    """Tiny tile + prior stores for tests and benchmarks: pink tissue with dark round 'nuclei' whose
    colour depends on their class, on white background; the prior map marks them. Returns the store paths
    (tiles, priors)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    tiles, priors = [], []
    n_classes = n_cell_classes + 2
    yy, xx = np.mgrid[:tile_px, :tile_px]
    for s in range(n_slides):
        imgs = np.empty((n_tiles, tile_px, tile_px, 3), np.uint8)
        maps = np.zeros((n_tiles, tile_px, tile_px), np.uint8)
        for t in range(n_tiles):
            cx, cy, r = rng.uniform(0, tile_px, 3) * (1, 1, 0.9)
            tissue = (xx - cx) ** 2 + (yy - cy) ** 2 < (r + tile_px / 3) ** 2
            m = np.where(tissue, 1, 0).astype(np.uint8)
            for _ in range(rng.integers(2, 7)):
                k = int(rng.integers(0, n_cell_classes))
                nx, ny = rng.uniform(0, tile_px, 2)
                nr = tile_px / 16 * (1 + k)
                m[((xx - nx) ** 2 + (yy - ny) ** 2 < nr**2) & tissue] = 2 + k
            palette = np.array(
                [[240, 240, 240], [230, 150, 200]] + [[60 + 50 * k, 40, 140 - 20 * k] for k in range(n_cell_classes)],
                np.float64,
            )
            img = palette[m] + rng.normal(0, 8, (tile_px, tile_px, 3))
            imgs[t] = np.clip(img, 0, 255).astype(np.uint8)
            maps[t] = m
        sid = f"toy{s}"
        coords = np.stack([np.arange(n_tiles) * tile_px, np.zeros(n_tiles)], 1).astype(np.int64)
        tp = root / "tiles" / f"{sid}.zarr"
        attrs = store.TileAttrs.without_slide(
            sid, tile_px, mpp=0.5, slide_mpp=0.25, width=n_tiles * tile_px * 2, height=tile_px * 2, source="toy"
        )
        with store.tile_store_writer(tp, coords=coords, tissue=np.ones(n_tiles), tile_px=tile_px, attrs=attrs) as w:
            w.write(0, imgs)
        pp = root / "priors" / f"{sid}.zarr"
        pattrs = {"slide_id": sid, **({"n_classes": n_classes} if write_n_classes else {})}
        with store.map_store_writer(pp, "priors", n=n_tiles, tile_px=tile_px, dtype="uint8", attrs=pattrs) as (_, arr):
            arr[:] = maps
        tiles.append(tp)
        priors.append(pp)
    return tiles, priors
