"""`dirl priors`: per-pixel prior maps, tiles + cells + model.json -> priors/{slide}.zarr.

`priors` uint8 (N, T, T), row-aligned with the tiles: 0 background (glass), 1 non-nuclear tissue,
2..K+1 the class of the nucleus covering the pixel (class c -> c + 2, see model.json).

- Each nucleus gets its class from the phenotype model: the nearest k-means centroid (standardised features,
  some read from the tile around it), its imported type, or the trained classifier (`PhenotypeModel`).
- `dilate_um` > 0 grows every nucleus by that many µm without overwriting its neighbours
  (`skimage.segmentation.expand_labels`), so small nuclei still cover whole tokens at 16-px patches.
- Glass vs tissue, per pixel: after a `smooth_um` box blur, a pixel is glass when it is bright
  (HSV value >= `glass_value`) and unsaturated (saturation < `glass_sat`). Stained tissue, even pale
  stroma or fat septa, is saturated; glass is grey-white whatever its brightness, so the saturation
  test carries the decision and the brightness test only keeps dark unsaturated debris/folds from
  being called glass. Defaults (0.06, 0.75) were checked on CMU-1 (glass S < 0.02, V ~ 0.95) and on
  dirl.synth slides; raise `glass_sat` for scanners whose glass has a colour cast. Nucleus pixels are
  tissue whatever the test says.

The overlay PNG shows a few tiles (the ones with most nuclei, and a spread below) with nucleus
contours coloured by class next to their prior map.
"""

from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dirl import store
from dirl.segment.phenotype import PhenotypeModel
from dirl.settings import Settings, bounded

log = logging.getLogger(__name__)

# class colours (tab10 without grey), RGB
PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (188, 189, 34),
        (23, 190, 207),
    ],
    dtype=np.uint8,
)


@dataclass(frozen=True)
class PriorSettings(Settings):
    """The `phenotypes` section's keys that paint the maps (the others fit the classes)."""

    dilate_um: float = bounded(1.0, ge=0)  # nuclei grow by this much into the map (their boundary pixels count)
    glass_sat: float = bounded(0.06, ge=0, le=1)  # glass: saturation below this ...
    glass_value: float = bounded(0.75, ge=0, le=1)  # ... and brightness above this, after smoothing
    smooth_um: float = bounded(2.0, ge=0)  # box smoothing before the glass test


def glass_mask(rgb: np.ndarray, mpp: float, s: PriorSettings = PriorSettings()) -> np.ndarray:
    """Boolean (T, T): True where the pixel is glass (background)."""
    import cv2

    k = max(1, round(s.smooth_um / mpp)) | 1
    x = cv2.blur(rgb, (k, k)).astype(np.float32) / 255 if k > 1 else rgb.astype(np.float32) / 255
    r, g, b = x[..., 0], x[..., 1], x[..., 2]  # (faster than reducing over a length-3 last axis)
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    return (mx >= s.glass_value) & (sat < s.glass_sat)


def paint(
    rgb: np.ndarray, labels: np.ndarray, lut: np.ndarray, mpp: float, s: PriorSettings = PriorSettings()
) -> np.ndarray:
    """Prior map (T, T) uint8 of one tile; lut[label] = prior value (2..K+1) of each nucleus."""
    from skimage.segmentation import expand_labels

    out = np.where(glass_mask(rgb, mpp, s), 0, 1).astype(np.uint8)
    lab = labels
    if s.dilate_um > 0 and lab.any():
        lab = expand_labels(lab, distance=s.dilate_um / mpp)
    nz = lab > 0
    if nz.any() and int(lab.max()) >= len(lut):  # ids without a table row (should not happen): tissue
        lut = np.concatenate([lut, np.ones(int(lab.max()) + 1 - len(lut), dtype=np.uint8)])
    out[nz] = lut[lab[nz]]
    return out


def _lut(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """An array mapping one tile's label -> prior value (a label without a class: tissue)."""
    lab = np.asarray(labels, np.int64)
    lut = np.ones(int(lab.max()) + 1 if len(lab) else 1, dtype=np.uint8)
    lut[lab] = np.where(values >= store.FIRST_CELL_PRIOR, values, 1)
    return lut


def make_priors(
    tiles_path: str | Path,
    cells_path: str | Path,
    model_path: str | Path,
    out: str | Path,
    s: PriorSettings = PriorSettings(),
    *,
    overlay: str | Path | None = None,
    threads: int = 2,
    n_overlay: int = 4,
) -> dict[str, Any]:

    t0 = time.perf_counter()
    tiles = store.open_tiles(tiles_path)
    n, tp, mpp = len(tiles), tiles.tile_px, tiles.mpp
    labels = store.open_map(cells_path, "labels", n)
    cells_attrs = store.map_attrs(cells_path, "cells")
    # only the tiles that were segmented (pretrain.tiles_per_slide): the other rows stay 0
    rows = np.asarray(cells_attrs.get("rows", np.arange(n)), dtype=np.int64)
    subset = {"rows": rows.tolist(), "tiles_per_slide": cells_attrs["tiles_per_slide"]} if "rows" in cells_attrs else {}
    model = PhenotypeModel.load(model_path)
    tab = store.read_nuclei(cells_path)
    order = np.lexsort((tab["label"], tab["tile"])) if len(tab["tile"]) else np.zeros(0, np.int64)
    tab = {k: v[order] for k, v in tab.items()}  # by tile, then label: each tile's rows in one run
    bounds = np.searchsorted(tab["tile"], np.arange(n + 1))
    if model.needs_pixels:  # the model looks at each nucleus's surroundings: per tile, below
        cls = np.full(len(tab["tile"]), -1, np.int64)
        context = model.slide_context(tiles)
    else:
        cls = model.predict(tab, store.map_attrs(cells_path, "labels").get("type_names"))
        context = None
    n_classes = store.prior_value(model.k)
    names = store.prior_class_names([c["description"] for c in model.raw["classes"]])
    attrs = {
        "slide_id": tiles.slide_id,
        "mpp": mpp,
        "tile_px": tp,
        "k": model.k,
        "n_classes": n_classes,
        "class_names": names,
        "model": str(Path(model_path)),
        "phenotype_method": model.raw.get("method"),
        "cells": str(Path(cells_path)),
        "settings": asdict(s),
        **subset,
    }
    counts = np.zeros(n_classes, dtype=np.int64)
    with (
        store.map_store_writer(out, "priors", n=n, tile_px=tp, dtype="uint8", attrs=attrs) as (root, arr),
        ThreadPoolExecutor(max(1, threads)) as pool,
    ):

        def one(img: np.ndarray, lab: np.ndarray, t: int) -> np.ndarray:
            a, b = bounds[t], bounds[t + 1]
            return paint(img, lab, _lut(tab["label"][a:b], store.prior_value(cls[a:b])), mpp, s)

        for idx in store.rows_by_shard(rows):  # whole shards: write_rows writes each once
            imgs, labs = tiles.take(idx), store.read_rows(labels, idx)
            if model.needs_pixels:
                parts = [{k: v[bounds[t] : bounds[t + 1]] for k, v in tab.items()} for t in idx.tolist()]
                for t, c in zip(idx.tolist(), model.predict_tiles(imgs, labs, mpp, parts, context, pool)):
                    cls[bounds[t] : bounds[t + 1]] = c
            block = np.stack(list(pool.map(one, imgs, labs, idx.tolist())))
            if subset:
                store.write_rows(arr, idx, block)
            else:
                arr[idx[0] : idx[-1] + 1] = block
            counts += np.bincount(block.ravel(), minlength=n_classes)[:n_classes]
        root.attrs["pixel_fractions"] = (counts / max(counts.sum(), 1)).round(5).tolist()
        unsorted = np.empty(len(cls), np.int64)
        unsorted[order] = cls  # the cells table's own row order
        store.write_nucleus_classes(root, unsorted, [c["description"] for c in model.raw["classes"]])
    if overlay:
        note = f" ({len(rows)} of {n} tiles: pretrain.tiles_per_slide)" if subset else ""
        write_overlay(overlay, tiles, labels, out, tab, cls, model, note=note)
    dt = time.perf_counter() - t0
    log.info(
        "slide %r: priors for %d tiles in %.1f s; pixel fractions %s",
        tiles.slide_id,
        n,
        dt,
        (counts / max(counts.sum(), 1)).round(3).tolist(),
    )
    return {"tiles": n, "fractions": (counts / max(counts.sum(), 1)).tolist(), "seconds": dt}


def pick_tiles(tab: dict[str, np.ndarray], n_tiles: int, k: int) -> list[int]:
    """The tile with most nuclei and a spread down to the median count."""
    if n_tiles == 0:
        return []
    per = np.bincount(tab["tile"].astype(np.int64), minlength=n_tiles)
    order = np.argsort(-per, kind="stable")[: max(1, n_tiles // 2)]
    idx = np.unique(np.linspace(0, len(order) - 1, min(k, len(order))).round().astype(int))
    return [int(order[i]) for i in idx]


def write_overlay(
    path: str | Path,
    tiles: Any,
    labels: Any,
    priors_path: str | Path,
    tab: dict[str, np.ndarray],
    cls: np.ndarray,
    model: PhenotypeModel,
    n: int = 4,
    note: str = "",
) -> None:
    """PNG: per chosen tile, the image with class-coloured nucleus contours | the prior map."""
    from PIL import Image, ImageDraw
    from skimage.segmentation import find_boundaries

    from dirl.store import atomic_path

    pri = store.open_map(priors_path, "priors", len(tiles))
    chosen = pick_tiles(tab, len(tiles), n)
    k = model.k
    colours = np.concatenate([[(255, 255, 255), (215, 215, 215)], PALETTE[np.arange(k) % len(PALETTE)]])
    tp = tiles.tile_px
    names = store.prior_class_names([c["description"] for c in model.raw["classes"]])
    gap, head = 4, 16 + 14 * len(names) + 4
    canvas = Image.new("RGB", (2 * tp + 3 * gap, head + max(1, len(chosen)) * (tp + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 2), f"{tiles.slide_id}: nuclei by class | prior map{note}", fill="black")
    for c, label in enumerate(names):
        y = 16 + 14 * c
        draw.rectangle((gap, y, gap + 10, y + 10), fill=tuple(int(v) for v in colours[c]), outline="black")
        draw.text((gap + 14, y - 1), f"{c}: {label}", fill="black")
    bounds = np.searchsorted(tab["tile"], np.arange(len(tiles) + 1)) if len(tab["tile"]) else None
    for r, t in enumerate(chosen):
        img = tiles.tile(t).copy()
        lab = np.asarray(labels[t])
        if bounds is not None and bounds[t + 1] > bounds[t]:
            a, b = bounds[t], bounds[t + 1]
            lut = np.zeros(int(lab.max()) + 1, dtype=np.int64)
            lut[tab["label"][a:b].astype(np.int64)] = store.prior_value(cls[a:b])
            edge = find_boundaries(lab, mode="inner")
            img[edge] = colours[lut[lab[edge]]]
        y = head + r * (tp + gap)
        canvas.paste(Image.fromarray(img), (gap, y))
        canvas.paste(Image.fromarray(colours[np.asarray(pri[t])].astype(np.uint8)), (2 * gap + tp, y))
        draw.text((gap + 2, y + 2), f"tile {t}", fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tiles", help="tile store")
    p.add_argument("cells", help="cells store of the same slide")
    p.add_argument("model", help="phenotypes/model.json")
    p.add_argument("out", help="priors store to write, results/<cohort>/priors/{slide}.zarr")
    p.add_argument("--overlay", help="QC PNG of a few tiles with class-coloured contours")
    p.add_argument("--threads", type=int, default=2)
    PriorSettings.add_arguments(p.add_argument_group("settings (PriorSettings)"))


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [args.out, args.overlay], [args.tiles, args.cells, args.model]


def main(args: argparse.Namespace) -> None:
    s = PriorSettings.from_args(args)
    make_priors(args.tiles, args.cells, args.model, args.out, s, overlay=args.overlay, threads=args.threads)
