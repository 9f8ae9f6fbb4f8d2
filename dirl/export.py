"""`dirl export`: one slide's tiles and nuclei as GeoJSON for QuPath (drag the file onto the open slide).

Coordinates are level-0 pixels, QuPath's and the tile store's. Checked with QuPath's own reader
(`PathIO.readObjects`, 0.4-0.7): every polygon is a valid Polygon (QuPath 0.4/0.5 reject a whole file for
a one-part MultiPolygon, 0.6+ for one self-intersecting ring), every class has a colour and no ":" unless
it names a parent class, and no measurement is NaN (0.4 reads none). The FeatureCollection holds
- the tissue outline the tiling found, one annotation per piece (class `Tissue`);
- every tile (`objectType: tile`, class `tile`), with its tissue fraction and row in the tile store and,
  with `--mil-attention NAME=mil/{source}/{model}/attention.npz`, the MIL model's out-of-fold attention on
  it (raw, and as a percentile within the slide, as the heatmaps show it: QuPath's measurement maps
  colour the tiles by either); with `--attention analysis/attention.json`, for the tiles the attention
  diagnostics sampled, each pretraining run's last-layer attention entropy (1 = uniform: DiRL vs DINO
  tile by tile);
- with `--cells`, every nucleus (`objectType: detection`) as the polygon along its pixels' edges in the
  label map (dirl.polygons: its area is its pixel count, QuPath's area and `Area µm^2` agree), with its
  measurements (area, shape, stain); with `--priors`, classified by the cell class kept there, named and
  coloured as in the priors overlay (`class 2 (large pale elongated)`); without, by its imported type
  (segmentation backend `import`), if it has one. `--nuclei-out` puts them in a file of their own (a
  cohort-scale slide has 10^5-10^6 nuclei), gzipped when it ends in `.gz` (QuPath reads `.geojson.gz`).
Objects land under QuPath's root: *Objects > Annotations > Resolve hierarchy* puts the tiles and nuclei
inside the tissue pieces. Features are written one at a time into a temporary file renamed when complete.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from dirl import store
from dirl.errors import ConfigError, StoreError
from dirl.polygons import ring_area, tile_outlines, valid_rings

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
    finite = {k: v for k, v in measurements.items() if math.isfinite(v)}  # QuPath 0.4 reads no NaN
    return json.dumps(
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": object_type, "classification": cls, "measurements": finite},
        },
        separators=(",", ":"),
    )


def nucleus_rings(labels: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    """The pixel-edge outline (K, 2) of each label in `ids` of one tile's label map, in tile pixel-corner
    coordinates (x, y), each a valid ring (checked with shapely, repaired if need be)."""
    present = set(np.unique(labels).tolist())
    missing = [int(i) for i in ids if int(i) not in present]
    if missing:
        raise StoreError(f"nucleus table names label {missing[0]}, absent from its tile's label map")
    return valid_rings(tile_outlines(labels, ids))


def qupath_class(name: str, colour: list[int]) -> dict[str, Any]:
    """A QuPath classification. QuPath reads "A: B" as class B derived from A: dirl's own names never hold
    ":" (an imported QuPath class such as "Tumor: Positive" keeps its parent on purpose)."""
    return {"name": name, "color": [int(v) for v in colour]}


def _classes(cells: Path, priors: str | None, tab: dict[str, np.ndarray], order: np.ndarray) -> tuple[np.ndarray, list]:
    """Per (sorted) table row an index into the returned QuPath classifications: the cell classes the priors
    store keeps for every nucleus, else the imported types (backend import), else one class `nucleus`."""
    if priors is None:
        types = store.map_attrs(cells, "labels").get("type_names")
        if not types or "type" not in tab or (tab["type"] < 0).any():
            return np.zeros(len(tab["tile"]), np.int64), [NUCLEUS]
        return tab["type"].astype(np.int64), _coloured(types)
    cls, names = store.read_nucleus_classes(priors)
    if len(cls) != len(order):
        raise StoreError(
            f"{priors}: {len(cls)} nucleus classes for {len(order)} nuclei in {cells}: rerun `dirl priors`"
        )
    kmeans = store.map_attrs(priors, "priors").get("phenotype_method") == "kmeans"
    classes = _coloured([f"class {c} ({d})" for c, d in enumerate(names)] if kmeans else names)
    cls = cls[order]
    return np.where(cls < 0, len(classes), cls), [*classes, NUCLEUS]  # -1: a type the model drops


def _coloured(names: list[str]) -> list[dict[str, Any]]:
    """QuPath classifications in the priors overlay's colours, class c in colour c."""
    from dirl.segment.priors import PALETTE

    return [qupath_class(n, PALETTE[c % len(PALETTE)]) for c, n in enumerate(names)]


class FeatureFile:
    """A GeoJSON FeatureCollection written feature by feature under a temporary name (dirl.atomic), gzipped
    when the path ends in `.gz`, renamed into place when the block completes."""

    def __init__(self, path: str | Path):
        self.path, self.n = Path(path), 0

    def __enter__(self) -> FeatureFile:
        self._atomic = store.atomic_path(self.path)
        tmp = self._atomic.__enter__()
        raw = open(tmp, "wb")
        self._raw = raw
        self.f = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3) if self.path.suffix == ".gz" else raw
        self.f.write(b'{"type":"FeatureCollection","features":[\n')
        return self

    def put(self, line: str) -> None:
        self.f.write((line if not self.n else ",\n" + line).encode())
        self.n += 1

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.f.write(b"\n]}\n")
            if self.f is not self._raw:
                self.f.close()
            self._raw.close()
        finally:
            self._atomic.__exit__(*exc)


def tissue_features(tiles: store.TileStore) -> list[str]:
    """One annotation per tissue piece the tiling outlined: a Polygon each (QuPath 0.4 and 0.5 reject a
    whole file for a MultiPolygon of one part), valid (checked with shapely)."""
    rings = [np.asarray(r, np.float64)[:-1] for r in tiles.attrs.get("tissue_outline") or [] if len(r) >= 4]
    out = []
    for k, ring in enumerate(valid_rings(rings) if rings else [], start=1):
        coords = [*ring.round(1).tolist(), ring[0].round(1).tolist()]
        props = {"objectType": "annotation", "classification": TISSUE, "name": f"{tiles.slide_id} tissue {k}"}
        geometry = {"type": "Polygon", "coordinates": [coords]}
        out.append(json.dumps({"type": "Feature", "geometry": geometry, "properties": props}, separators=(",", ":")))
    return out


def export_slide(
    tiles_path: str | Path,
    out: str | Path,
    cells: str | Path | None = None,
    priors: str | None = None,
    mil_attention: dict[str, str | Path] | None = None,
    attention: str | Path | None = None,
    nuclei_out: str | Path | None = None,
) -> dict:
    """Write the GeoJSON of one slide (and, with `nuclei_out`, its nuclei apart); returns counts."""
    t0 = time.perf_counter()
    tiles = store.open_tiles(tiles_path)
    n = len(tiles)
    scale = float(tiles.attrs["tile_px_level0"]) / tiles.tile_px if n else 1.0
    side = float(tiles.attrs["tile_px_level0"]) if n else 0.0
    counts = {"tiles": n, "nuclei": 0}
    scores = _tile_scores(tiles.slide_id, n, mil_attention or {})
    entropy = _attention_entropy(attention, tiles.slide_id) if attention else {}
    with FeatureFile(out) as f:
        for line in tissue_features(tiles):
            f.put(line)
        for row, ((x, y), tissue) in enumerate(zip(tiles.coords.tolist(), tiles.tissue.tolist())):
            ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
            m = {"Tissue fraction": round(float(tissue), 4), "Row": row}
            for name, (raw, pct) in scores.items():
                m[f"MIL {name} attention"] = float(raw[row])
                m[f"MIL {name} attention percentile"] = round(float(pct[row]), 2)
            for run, value in entropy.get(row, {}).items():
                m[f"Attention entropy {run}"] = round(value, 4)
            f.put(_feature(ring, "tile", TILE, m))
        if cells is not None and nuclei_out is None:
            counts["nuclei"] = _put_nuclei(Path(cells), tiles, priors, scale, f.put)
    if cells is not None and nuclei_out is not None:
        with FeatureFile(nuclei_out) as g:
            counts["nuclei"] = _put_nuclei(Path(cells), tiles, priors, scale, g.put)
    log.info(
        "slide %r: %d tiles, %d nuclei -> %s%s in %.1f s",
        tiles.slide_id,
        n,
        counts["nuclei"],
        out,
        f" and {nuclei_out}" if nuclei_out else "",
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


def _put_nuclei(cells: Path, tiles: store.TileStore, priors: str | None, scale: float, put) -> int:
    n = len(tiles)
    level0_um2 = (scale * float(tiles.attrs.get("slide_mpp") or tiles.mpp)) ** 2  # µm² of a tile pixel
    labels = store.open_map(cells, "labels", n)
    tab = store.read_nuclei(cells)
    order = np.lexsort((tab["label"], tab["tile"]))
    tab = {k: v[order] for k, v in tab.items()}
    cls, classes = _classes(cells, priors, tab, order)
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
                pts = (ring * scale + (x0, y0)).round(2).tolist()
                m = {k: round(float(tab[c][j]), 4) for k, c in MEASUREMENTS.items() if c in tab}
                m["Area µm^2"] = round(ring_area(ring) * level0_um2, 4)  # QuPath's area of the polygon, in µm²
                put(_feature([*pts, pts[0]], "detection", classes[int(cls[j])], m))
                done += 1
    return done


# --------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tiles", help="tile store, results/<cohort>/tiles/{slide}.zarr")
    p.add_argument("--out", required=True, help="GeoJSON to write, results/<cohort>/export/{slide}.geojson")
    p.add_argument("--cells", help="cells store (results/<cohort>/cells/{slide}.zarr): export the nuclei")
    p.add_argument("--priors", help="priors store (priors/{slide}.zarr): the nuclei's cell classes, kept there")
    p.add_argument(
        "--mil-attention",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a MIL model's attention.npz (mil/{source}/{model}/), its tiles' attention as measurements NAME",
    )
    p.add_argument("--attention", help="analysis/attention.json: the sampled tiles' attention entropy per run")
    p.add_argument(
        "--nuclei-out",
        help="write the nuclei to this GeoJSON of their own (gzip with .geojson.gz), the tiles' file stays small",
    )


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [args.out, args.nuclei_out], [args.tiles, args.cells, args.priors, args.attention]


def main(args: argparse.Namespace) -> None:
    named = {}
    for item in args.mil_attention:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--mil-attention {item!r}: write NAME=PATH")
        named[name] = path
    export_slide(args.tiles, args.out, args.cells, args.priors, named, args.attention, args.nuclei_out)
