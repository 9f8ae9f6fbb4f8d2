"""`dirl export`: one slide's tiles and nuclei as GeoJSON for QuPath (drag the file onto the open slide).

Coordinates are level-0 pixels, QuPath's and the tile store's. The FeatureCollection holds
- the tissue outline the tiling found (`objectType: annotation`, class `Tissue`);
- every tile (`objectType: tile`, class `tile`), with its tissue fraction and row in the tile store and,
  with `--mil-attention NAME=mil/{source}/{model}/attention.npz`, the MIL model's out-of-fold attention on
  it (raw, and as a percentile within the slide, as the heatmaps show it: QuPath's measurement maps
  colour the tiles by either); with `--attention analysis/attention.json`, for the tiles the attention
  diagnostics sampled, each pretraining run's last-layer attention entropy (1 = uniform: DiRL vs DINO
  tile by tile);
- with `--cells`, every nucleus (`objectType: detection`) as the polygon traced around its pixels in the
  label map, with its measurements (area, shape, stain); with `--phenotypes`, classified by its cell
  class, named and coloured as in the priors overlay (`class 2: large pale elongated`); without, by its
  imported type (segmentation backend `import`), if it has one.
Features are written one at a time (a slide can carry a million nuclei) into a temporary file renamed
when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from dirl import store
from dirl.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

# nucleus measurements exported (name in QuPath: table column)
MEASUREMENTS = {
    "Area µm^2": "area_um2",
    "Perimeter µm": "perimeter_um",
    "Circularity": "circularity",
    "Eccentricity": "eccentricity",
    "Solidity": "solidity",
    "Hematoxylin OD mean": "h_od",
    "Eosin OD mean": "e_od",
}
NUCLEUS = {"name": "nucleus", "color": [31, 119, 180]}
TILE = {"name": "tile", "color": [200, 200, 200]}
TISSUE = {"name": "Tissue", "color": [0, 160, 0]}


def _feature(ring: list[list[float]], object_type: str, cls: dict[str, Any], measurements: dict) -> str:
    return json.dumps(
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": object_type, "classification": cls, "measurements": measurements},
        },
        separators=(",", ":"),
    )


def outline(mask: np.ndarray) -> np.ndarray:
    """(K, 2) x, y pixel-centre vertices around a mask's largest connected part (its bounding box when the
    part is too small to make a polygon of three points)."""
    m = np.pad(mask.astype(np.uint8), 1)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        c = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float64) - 1.0
        if len(c) >= 3:
            return c
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min() - 0.5, xs.max() + 0.5, ys.min() - 0.5, ys.max() + 0.5
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


def nucleus_rings(labels: np.ndarray, ids: np.ndarray) -> Iterator[np.ndarray]:
    """The outline (K, 2) of each label in `ids` of one tile's label map, in tile pixels (x, y)."""
    boxes = ndimage.find_objects(labels)
    for i in ids:
        box = boxes[int(i) - 1] if 0 < i <= len(boxes) else None
        if box is None:
            raise StoreError(f"nucleus table names label {int(i)}, absent from its tile's label map")
        yield outline(labels[box] == i) + (box[1].start, box[0].start)


def _classes(cells: Path, model_path: str | None, tab: dict[str, np.ndarray]) -> tuple[np.ndarray, list[dict]]:
    """Per table row an index into the returned QuPath classifications: the phenotype model's classes,
    else the imported types (backend import), else one class `nucleus`."""
    if model_path is None:
        types = store.map_attrs(cells, "labels").get("type_names")
        if not types or "type" not in tab or (tab["type"] < 0).any():
            return np.zeros(len(tab["tile"]), np.int64), [NUCLEUS]
        return tab["type"].astype(np.int64), _coloured(types)
    from dirl.segment.phenotype import PhenotypeModel

    model = PhenotypeModel.load(model_path)
    names = store.prior_class_names([c["description"] for c in model.raw["classes"]])[store.FIRST_CELL_PRIOR :]
    classes = _coloured(names)
    cls = model.predict(tab, store.map_attrs(cells, "labels").get("type_names"))
    return np.where(cls < 0, len(classes), cls), [*classes, NUCLEUS]  # -1: a type the model drops


def _coloured(names: list[str]) -> list[dict[str, Any]]:
    """QuPath classifications in the priors overlay's colours, class c in colour c."""
    from dirl.segment.priors import PALETTE

    return [{"name": n, "color": [int(v) for v in PALETTE[c % len(PALETTE)]]} for c, n in enumerate(names)]


def export_slide(
    tiles_path: str | Path,
    out: str | Path,
    cells: str | Path | None = None,
    phenotypes: str | None = None,
    mil_attention: dict[str, str | Path] | None = None,
    attention: str | Path | None = None,
) -> dict:
    """Write the GeoJSON of one slide; returns counts."""
    t0 = time.perf_counter()
    tiles = store.open_tiles(tiles_path)
    n = len(tiles)
    scale = float(tiles.attrs["tile_px_level0"]) / tiles.tile_px if n else 1.0
    side = float(tiles.attrs["tile_px_level0"]) if n else 0.0
    counts = {"tiles": n, "nuclei": 0}
    scores = _tile_scores(tiles.slide_id, n, mil_attention or {})
    entropy = _attention_entropy(attention, tiles.slide_id) if attention else {}
    with store.atomic_path(out) as tmp, open(tmp, "w") as f:
        f.write('{"type":"FeatureCollection","features":[\n')
        first = True

        def put(line: str) -> None:
            nonlocal first
            f.write(line if first else ",\n" + line)
            first = False

        rings = tiles.attrs.get("tissue_outline") or []
        if rings:
            geometry = {"type": "MultiPolygon", "coordinates": [[r] for r in rings]}
            props = {"objectType": "annotation", "classification": TISSUE, "name": f"{tiles.slide_id} tissue"}
            put(json.dumps({"type": "Feature", "geometry": geometry, "properties": props}, separators=(",", ":")))
        for row, ((x, y), tissue) in enumerate(zip(tiles.coords.tolist(), tiles.tissue.tolist())):
            ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
            m = {"Tissue fraction": round(float(tissue), 4), "Row": row}
            for name, (raw, pct) in scores.items():
                m[f"MIL {name} attention"] = float(raw[row])
                m[f"MIL {name} attention percentile"] = round(float(pct[row]), 2)
            for run, value in entropy.get(row, {}).items():
                m[f"Attention entropy {run}"] = round(value, 4)
            put(_feature(ring, "tile", TILE, m))
        if cells is not None:
            counts["nuclei"] = _put_nuclei(Path(cells), tiles, phenotypes, scale, put)
        f.write("\n]}\n")
    log.info(
        "slide %r: %d tiles, %d nuclei -> %s in %.1f s",
        tiles.slide_id,
        n,
        counts["nuclei"],
        out,
        time.perf_counter() - t0,
    )
    return counts


def _tile_scores(slide: str, n: int, sources: dict[str, str | Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per MIL model, the slide's tile attention and its percentile rank within the slide (a slide that
    model did not score, e.g. unlabelled, is left out)."""
    out = {}
    for name, path in sources.items():
        a = store.read_tile_scores(path, [slide]).get(slide)  # one slide's array, not the cohort's
        if a is None:
            continue
        if len(a) != n:
            raise StoreError(f"{path}: {len(a)} attention values for slide {slide!r} of {n} tiles: rerun `dirl mil`")
        ranks = np.argsort(np.argsort(a, kind="stable"), kind="stable")
        out[name] = (a, 100.0 * ranks / max(n - 1, 1))
    return out


def _attention_entropy(path: str | Path, slide: str) -> dict[int, dict[str, float]]:
    """Tile row -> {run: per-head attention entropy} for the tiles of `slide` the diagnostics sampled."""
    d = json.loads(Path(path).read_text())
    rows = [(i, int(r)) for i, (s, r) in enumerate(d["tiles"]) if s == slide]
    return {r: {run: float(v["per_image"]["head_entropy"][i]) for run, v in d["runs"].items()} for i, r in rows}


def _put_nuclei(cells: Path, tiles: store.TileStore, phenotypes: str | None, scale: float, put) -> int:
    n = len(tiles)
    labels = store.open_map(cells, "labels", n)
    tab = store.read_nuclei(cells)
    order = np.lexsort((tab["label"], tab["tile"]))
    tab = {k: v[order] for k, v in tab.items()}
    cls, classes = _classes(cells, phenotypes, tab)
    bounds = np.searchsorted(tab["tile"], np.arange(n + 1))
    done = 0
    for a in range(0, n, store.SHARD_TILES):  # one shard of label maps in memory at a time
        block = np.asarray(labels[a : a + store.SHARD_TILES])
        for t in range(a, a + len(block)):
            lo, hi = bounds[t], bounds[t + 1]
            if lo == hi:
                continue
            x0, y0 = (float(v) for v in tiles.coords[t])
            for j, ring in zip(range(lo, hi), nucleus_rings(block[t - a], tab["label"][lo:hi])):
                pts = ((ring + 0.5) * scale + (x0, y0)).round(1).tolist()
                m = {k: round(float(tab[c][j]), 4) for k, c in MEASUREMENTS.items() if c in tab}
                put(_feature([*pts, pts[0]], "detection", classes[int(cls[j])], m))
                done += 1
    return done


# --------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tiles", help="tile store, results/<cohort>/tiles/{slide}.zarr")
    p.add_argument("--out", required=True, help="GeoJSON to write, results/<cohort>/export/{slide}.geojson")
    p.add_argument("--cells", help="cells store (results/<cohort>/cells/{slide}.zarr): export the nuclei")
    p.add_argument("--phenotypes", help="phenotype model (phenotypes/model.json): classify the nuclei")
    p.add_argument(
        "--mil-attention",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a MIL model's attention.npz (mil/{source}/{model}/), its tiles' attention as measurements NAME",
    )
    p.add_argument("--attention", help="analysis/attention.json: the sampled tiles' attention entropy per run")


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [args.out], [args.tiles, args.cells, args.phenotypes, args.attention]


def main(args: argparse.Namespace) -> None:
    named = {}
    for item in args.mil_attention:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--mil-attention {item!r}: write NAME=PATH")
        named[name] = path
    export_slide(args.tiles, args.out, args.cells, args.phenotypes, named, args.attention)
