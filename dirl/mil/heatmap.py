"""Attention heatmaps: MIL tile attention painted at the tiles' coordinates on a slide thumbnail.

The thumbnail is assembled from the tile store itself (each tile downsampled and placed at its level-0
coordinates), so MIL needs no slide file and works where the slides are not mounted. Areas without
tiles stay white. Attention is shown as percentile ranks within the slide (as CLAM does), so one
slide's map is readable whatever the spread of its raw weights.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from dirl import store

log = logging.getLogger(__name__)


def pick_slides(rows: list[dict], classes: list[str], n: int) -> list[str]:
    """Up to `n` slides: per class in turn, the most confidently correct out-of-fold predictions."""
    per_class = []
    for c in classes:
        r = [x for x in rows if x["label"] == c]
        r.sort(key=lambda x: (x["pred"] != c, -x[f"prob_{c}"]))
        per_class.append([x["slide_id"] for x in r])
    out: list[str] = []
    while len(out) < n and any(per_class):
        for lst in per_class:
            if lst and len(out) < n:
                out.append(lst.pop(0))
    return out


def thumbnail(
    tiles_path: str | Path | None, coords: np.ndarray, tile_px_level0: int, max_px: int = 1024
) -> tuple[np.ndarray, float, np.ndarray, int]:
    """RGB thumbnail (H, W, 3) uint8 of the tiled area, scale (thumb px per level-0 px), each tile's
    top-left in the thumbnail, and the tile side in thumbnail px."""
    import torch
    import torch.nn.functional as F

    coords = np.asarray(coords, dtype=np.int64)
    x0, y0 = coords.min(0)
    x1, y1 = coords.max(0) + tile_px_level0
    scale = min(max_px / max(1, x1 - x0), max_px / max(1, y1 - y0))
    t = max(1, int(math.ceil(tile_px_level0 * scale)))
    pos = np.floor((coords - [x0, y0]) * scale).astype(int)
    h = int(pos[:, 1].max()) + t
    w = int(pos[:, 0].max()) + t
    img = np.full((h, w, 3), 255, np.uint8)
    if tiles_path is not None:
        tiles = store.open_tiles(tiles_path)
        if len(tiles) != len(coords):
            raise ValueError(f"{tiles_path} has {len(tiles)} tiles, the feature file {len(coords)}")
        step = 256
        for a in range(0, len(tiles), step):
            block = torch.from_numpy(tiles.read(a, min(len(tiles), a + step))).permute(0, 3, 1, 2).float()
            small = F.interpolate(block, size=(t, t), mode="area" if t < block.shape[-1] else "bilinear")
            small = small.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
            for (px, py), tile in zip(pos[a : a + len(small)], small):
                img[py : py + t, px : px + t] = tile
    return img, scale, pos, t


def render(
    out_png: str | Path,
    coords: np.ndarray,
    attention: np.ndarray,
    *,
    tiles: str | Path | None,
    tile_px_level0: int,
    title: str = "",
    max_px: int = 1024,
    alpha: float = 0.5,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import rankdata

    attention = np.asarray(attention, dtype=np.float64)
    thumb, _, pos, t = thumbnail(tiles, coords, tile_px_level0, max_px)
    rank = (rankdata(attention) - 1) / max(1, len(attention) - 1)
    cmap = plt.get_cmap("jet")
    overlay = thumb.astype(np.float32) / 255.0
    heat = np.zeros_like(overlay)
    mask = np.zeros(overlay.shape[:2], bool)
    colours = cmap(rank)[:, :3]
    for (px, py), col in zip(pos, colours):
        heat[py : py + t, px : px + t] = col
        mask[py : py + t, px : px + t] = True
    overlay[mask] = (1 - alpha) * overlay[mask] + alpha * heat[mask]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    axes[0].imshow(thumb)
    axes[0].set_title("tiles")
    axes[1].imshow(overlay)
    axes[1].set_title("attention (percentile within slide)")
    for ax in axes:
        ax.axis("off")
    sm = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=cmap)
    fig.colorbar(sm, ax=axes[1], fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    with store.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out_png
