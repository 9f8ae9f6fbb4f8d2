"""The `import` segmentation backend: typed nuclei made elsewhere, rasterised into the tiles.

Many labs already have nuclei typed by a supervised model for their slides; the paper's priors are
HoVer-Net's PanNuke types. One file per slide (the sample sheet's `nuclei` column, `dirl segment
--nuclei`), polygons in level-0 pixels:
- GeoJSON as QuPath writes it (a FeatureCollection, or a bare list of features; one Polygon per nucleus,
  its class in `properties.classification.name`; a cell's `nucleusGeometry`; annotations and tiles
  skipped) and as CellViT writes it (one MultiPolygon per type);
- HoVer-Net's JSON (`{"nuc": {id: {"contour": [[x, y], ...], "type": t}}}`), types named as PanNuke's.
Each tile gets the nuclei whose bounding box meets it (found through a grid of tile-sized buckets),
filled where a pixel centre lies inside the polygon, ids 1..n in file order; the nucleus table records
each nucleus' type (`type`, an index into the store's `type_names`). The nuclei are the lab's: no
size filter is applied, and a nucleus cut by a tile edge is the part inside the tile.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from skimage.draw import polygon as fill_polygon

from dirl.errors import DirlError
from dirl.segment.base import Backend, CommonParams

log = logging.getLogger(__name__)

# HoVer-Net's PanNuke type ids (its type_info.json); 0 = no label
HOVERNET_TYPES = {0: "unlabelled", 1: "neoplastic", 2: "inflammatory", 3: "connective", 4: "dead", 5: "epithelial"}


class Nuclei:
    """Polygons in level-0 (x, y), packed: vertices of nucleus i are `xy[offsets[i]:offsets[i + 1]]`
    (float32; a million nuclei of ~30 vertices take ~250 MB, not the gigabytes of parsed JSON), their
    bounding boxes (x0, y0, x1, y1) and type names."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self.names: list[str] = []

    def add(self, ring: Any, name: str) -> None:
        xy = np.asarray(ring, dtype=np.float32).reshape(-1, 2)
        if len(xy) < 3:
            raise ValueError(f"a nucleus of {len(xy)} vertices: polygons need 3 or more")
        self._parts.append(xy)
        self.names.append(name)

    def pack(self) -> Nuclei:
        sizes = [len(p) for p in self._parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.xy = np.concatenate(self._parts) if self._parts else np.zeros((0, 2), np.float32)
        self.boxes = (
            np.array([[*p.min(0), *p.max(0)] for p in self._parts], np.float64) if self._parts else np.zeros((0, 4))
        )
        self._parts = []
        return self

    def __len__(self) -> int:
        return len(self.names)

    def polygon(self, i: int) -> np.ndarray:
        return self.xy[self.offsets[i] : self.offsets[i + 1]]


def read_nuclei_file(path: str | Path) -> Nuclei:
    """The nuclei of a GeoJSON or HoVer-Net JSON file, parsed as a stream (one nucleus in memory at a time)."""
    import ijson

    from dirl import jsonsafe

    path = Path(path)
    if not path.exists():
        raise DirlError(f"nuclei file {path} does not exist")
    if not path.is_file():
        raise DirlError(f"nuclei file {path} is not a regular file (a directory, FIFO or device?)")
    out = Nuclei()
    try:
        jsonsafe.check(path)
        kind = _kind(path)
        with jsonsafe.open_json(path) as f:
            if kind == "hovernet":
                for _, v in ijson.kvitems(f, "nuc", use_float=True):
                    t = v.get("type")
                    out.add(
                        v["contour"], HOVERNET_TYPES.get(int(t), f"type {int(t)}") if t is not None else "unclassified"
                    )
            elif kind in ("features", "list"):
                for feat in ijson.items(f, "features.item" if kind == "features" else "item", use_float=True):
                    _add_feature(out, feat)
            elif kind == "feature":
                _add_feature(out, json.load(f))
            else:
                raise DirlError(
                    f"nuclei file {path}: neither GeoJSON (QuPath, CellViT) nor HoVer-Net JSON (a 'nuc' dict)"
                )
    except ijson.JSONError as e:
        raise DirlError(f"nuclei file {path} is not JSON ({e})") from e
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise DirlError(f"nuclei file {path} is malformed: {e!r}") from e
    return out.pack()


def _kind(path: Path) -> str:
    """What the top level holds, from its first keys: hovernet ('nuc'), features (a FeatureCollection),
    feature (one Feature), list (a bare list of features)."""
    import ijson

    from dirl.jsonsafe import open_json

    with open_json(path) as f:
        for prefix, event, value in ijson.parse(f):
            if prefix == "" and event == "start_array":
                return "list"
            if prefix == "" and event == "map_key":
                kind = {"nuc": "hovernet", "features": "features", "geometry": "feature"}.get(value)
                if kind:
                    return kind
            if prefix == "" and event == "end_map":
                break
    return "unknown"


# QuPath objects that are not nuclei (tissue annotations, tiles, TMA cores)
NOT_NUCLEI = {"annotation", "tile", "tma_core", "root"}


def _add_feature(out: Nuclei, f: dict[str, Any]) -> None:
    if not isinstance(f, dict):
        raise ValueError(f"a feature that is not a JSON object: {str(f)[:80]}")
    props = f.get("properties") or {}
    if not isinstance(props, dict):
        raise ValueError(f"feature properties that are not a JSON object: {str(props)[:80]}")
    if str(props.get("objectType", "detection")).lower() in NOT_NUCLEI:
        return
    cls = props.get("classification") or "unclassified"
    name = str(cls.get("name", "unclassified") if isinstance(cls, dict) else cls)
    g = props.get("nucleusGeometry") or f["geometry"]  # a QuPath cell: its nucleus
    if g["type"] == "Polygon":
        out.add(g["coordinates"][0], name)
    elif g["type"] == "MultiPolygon":
        for poly in g["coordinates"]:
            out.add(poly[0], name)
    else:
        raise ValueError(f"a {g['type']} geometry: nuclei must be Polygons or MultiPolygons")


class ImportBackend(Backend):
    name = "import"
    Params = CommonParams

    def __init__(self, params: Any):
        super().__init__(params)
        self.path: Path | None = None
        self.type_names: list[str] = []  # a failed slide (never bound) records none
        self.tile_types: list[np.ndarray] = []

    @property
    def model(self) -> str:
        return f"imported from {self.path}" if self.path else "import"

    def bind(self, nuclei: str | Path | None, tiles: Any, rows: np.ndarray) -> None:
        """Read `nuclei` for the slide of `tiles` (a store.TileStore) and the rows to be segmented, in order."""
        if tiles.failed:  # nothing to segment: its store stays empty
            return
        if nuclei is None:
            raise DirlError(
                f"segmentation.backend import: no nuclei file for slide {tiles.slide_id!r} "
                "(the sample sheet's `nuclei` column, or dirl segment --nuclei)"
            )
        self.path = Path(nuclei)
        self.nuclei = read_nuclei_file(self.path)
        names = self.nuclei.names
        self.type_names = sorted(set(names))
        index = {n: i for i, n in enumerate(self.type_names)}
        self.types = np.array([index[n] for n in names], dtype=np.int16)
        self.boxes = self.nuclei.boxes
        n_nuclei = len(self.nuclei)
        a = tiles.attrs
        w, h = a.get("level0_width"), a.get("level0_height")
        if n_nuclei and w and h:
            out = (
                (self.boxes[:, 0] < -1)
                | (self.boxes[:, 1] < -1)
                | (self.boxes[:, 2] > w + 1)
                | (self.boxes[:, 3] > h + 1)
            )
            if out.any():
                i = int(np.flatnonzero(out)[0])
                raise DirlError(
                    f"nuclei file {self.path}: {int(out.sum())} of {n_nuclei} nuclei lie outside slide "
                    f"{tiles.slide_id!r} ({w} x {h} level-0 px), the first at {self.boxes[i, :2].round(1).tolist()}: "
                    "is it this slide's file, in level-0 pixels?"
                )
        self.side = float(a.get("tile_px_level0") or 0)
        self.scale = self.side / tiles.tile_px if len(tiles) else 1.0
        self.origins = np.asarray(tiles.coords, dtype=np.float64)[np.asarray(rows, dtype=np.int64)]
        self.buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        if self.side:
            cells = np.floor(self.boxes / self.side).astype(np.int64)
            for i, (x0, y0, x1, y1) in enumerate(cells.tolist()):
                for cx in range(x0, x1 + 1):
                    for cy in range(y0, y1 + 1):
                        self.buckets[cx, cy].append(i)
        self.tile_types = []
        log.info("%s: %d nuclei of types %s", self.path, n_nuclei, self.type_names)

    def types_of(self, position: int) -> np.ndarray:
        return self.tile_types[position]

    def _candidates(self, x0: float, y0: float) -> list[int]:
        s = self.side
        found: set[int] = set()
        for cx in range(int(np.floor(x0 / s)), int(np.floor((x0 + s) / s)) + 1):
            for cy in range(int(np.floor(y0 / s)), int(np.floor((y0 + s) / s)) + 1):
                found.update(self.buckets.get((cx, cy), ()))
        b = self.boxes
        return sorted(i for i in found if b[i, 0] < x0 + s and b[i, 2] >= x0 and b[i, 1] < y0 + s and b[i, 3] >= y0)

    def rasterise(self, x0: float, y0: float, tile_px: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels (T, T) uint32 ids 1..n of the nuclei meeting the tile at level-0 (x0, y0), and their types."""
        lab = np.zeros((tile_px, tile_px), np.uint32)
        ids: list[int] = []
        for i in self._candidates(x0, y0):
            p = self.nuclei.polygon(i)
            rr, cc = fill_polygon((p[:, 1] - y0) / self.scale - 0.5, (p[:, 0] - x0) / self.scale - 0.5, lab.shape)
            if len(rr):
                ids.append(i)
                lab[rr, cc] = len(ids)
        # a later nucleus may cover an earlier one: keep the ids still present, renumbered 1..n
        present = np.unique(lab)
        present = present[present > 0]
        if len(present) < len(ids):
            remap = np.zeros(len(ids) + 1, np.uint32)
            remap[present] = np.arange(1, len(present) + 1, dtype=np.uint32)
            lab = remap[lab]
            ids = [ids[k - 1] for k in present.tolist()]
        return lab, self.types[ids] if ids else np.zeros(0, np.int16)

    def stream(self, blocks: Iterable[np.ndarray], mpp: float) -> Iterator[np.ndarray]:
        at = 0
        for block in blocks:
            if not hasattr(self, "origins"):
                raise DirlError("the import backend reads nuclei per slide: run it through `dirl segment --nuclei`")
            out = np.zeros(block.shape[:3], np.uint32)
            for j in range(len(block)):
                x0, y0 = self.origins[at + j]
                out[j], types = self.rasterise(float(x0), float(y0), block.shape[1])
                self.tile_types.append(types)
            at += len(block)
            yield out


# --------------------------------------------------------------------------------------------------
# phenotypes.source: imported — the cell classes are the imported types (mapped, merged or dropped)
def type_mapping(types: list[str], type_classes: tuple[str, ...], unknown_types: str) -> dict[str, str | None]:
    """Type name -> class name (None: painted as non-nuclear tissue). `type_classes`: "type=class" items
    ("type=-" drops the type); empty: every type is its own class. `unknown_types` (error | drop | other)
    says what becomes of the types `type_classes` does not name."""
    if not type_classes:
        return {t: t for t in types}
    mapping: dict[str, str | None] = {}
    for item in type_classes:
        t, sep, c = (x.strip() for x in item.partition("="))
        if not sep or not t or not c:
            raise DirlError(f"phenotypes.type_classes item {item!r}: write 'type=class' (or 'type=-' to drop it)")
        mapping[t] = None if c == "-" else c
    unknown = [t for t in types if t not in mapping]
    if unknown and unknown_types == "error":
        raise DirlError(
            f"imported nucleus types {unknown} are not in phenotypes.type_classes: map them, or set "
            "phenotypes.unknown_types to drop or other"
        )
    for t in unknown:
        mapping[t] = None if unknown_types == "drop" else "other"
    return mapping


def fit_imported(
    cells: list[Path], type_classes: tuple[str, ...], unknown_types: str, sample: int, seed: int
) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The phenotype model of imported types: (model dict, sampled table, store index, class per row)
    as `phenotype.fit` returns them, so that the gallery and the priors work the same way."""
    from dirl import store
    from dirl.segment.phenotype import SUMMARY, VERSION, sample_nuclei

    names = []
    for c in cells:
        n = store.map_attrs(c, "labels").get("type_names")
        if n is None:
            raise DirlError(f"{c} was not segmented by backend import: phenotypes.source imported needs imported types")
        names.append(list(n))
    types = sorted({t for n in names for t in n})
    mapping = type_mapping(types, type_classes, unknown_types)
    classes_ = sorted({c for c in mapping.values() if c is not None})
    if not classes_:
        raise DirlError(f"phenotypes.type_classes drops every imported type ({types}): no cell class is left")
    class_of = {t: (classes_.index(c) if c is not None else -1) for t, c in mapping.items()}
    columns = sorted({"tile", "label", "cx", "cy", "border", "type", *SUMMARY})
    tab, src, total = sample_nuclei(cells, sample, seed, columns)
    cls = np.array([class_of[names[s][t]] for s, t in zip(src.tolist(), tab["type"].tolist())], dtype=np.int64)
    summary = []
    for k, name in enumerate(classes_):
        sel = cls == k
        summary.append(
            {
                "id": k,
                "prior_value": k + store.FIRST_CELL_PRIOR,
                "n": int(sel.sum()),
                "fraction": float(sel.mean()) if len(cls) else 0.0,
                "description": name,
                "types": [t for t, c in mapping.items() if c == name],
                "mean": {f: float(tab[f][sel].mean()) if sel.any() else float("nan") for f in SUMMARY},
                "sd": {f: float(tab[f][sel].std()) if sel.any() else float("nan") for f in SUMMARY},
            }
        )
    model = {
        "version": VERSION,
        "method": "imported",
        "k": len(classes_),
        "seed": seed,
        "features": [],
        "mean": [],
        "std": [],
        "centroids": [[] for _ in classes_],
        "classes": summary,
        "type_classes": class_of,
        "dropped_types": [t for t, c in mapping.items() if c is None],
        "prior_values": {
            "0": "background (glass)",
            "1": "non-nuclear tissue (and dropped types)",
            **{str(k + store.FIRST_CELL_PRIOR): f"class {k}: {n}" for k, n in enumerate(classes_)},
        },
        "sample": {"requested": sample, "used": len(cls), "total_nuclei": total, "slides": len(cells)},
        "cells": [str(p) for p in cells],
    }
    return model, tab, src, cls


def imported_classes(class_of: dict[str, int], type_names: list[str] | None, types: np.ndarray) -> np.ndarray:
    """Class of every row of one store's table from its `type` column and the store's `type_names`
    (-1: a dropped type, painted as tissue)."""
    if type_names is None:
        raise DirlError(
            "the phenotype model classes imported types, but this cells store has none: segment it with backend import"
        )
    missing = sorted(set(type_names) - set(class_of))
    if missing:
        raise DirlError(f"nucleus types {missing} are not in the phenotype model: rerun `dirl phenotype` on the cohort")
    lut = np.array([class_of[n] for n in type_names] or [-1], dtype=np.int64)
    return lut[np.asarray(types, dtype=np.int64)]
