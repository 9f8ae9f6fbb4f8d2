"""The `import` segmentation backend: typed nuclei made elsewhere, rasterised into the tiles.

Many labs already have nuclei typed by a supervised model for their slides; the paper's priors are
HoVer-Net's PanNuke types. One file per slide (the sample sheet's `nuclei` column, `dirl segment
--nuclei`), read by dirl.segment.nuclei_files (QuPath and CellViT GeoJSON, CellViT's cells.json, HoVer-Net
JSON) into level-0 polygons. Each tile gets the nuclei whose bounding box meets it (found through a grid
of tile-sized buckets), ids 1..n in file order; the nucleus table records each nucleus' type (`type`, an
index into the store's `type_names`). The nuclei are the lab's: no size filter is applied, and a nucleus
cut by a tile edge is the part inside the tile. A file that puts no nucleus into the slide's tiles is an
error, not an empty result.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from skimage.draw import polygon as fill_polygon

from dirl.errors import DirlError
from dirl.segment.base import Backend, CommonParams
from dirl.segment.nuclei_files import iter_summary, read_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportParams(CommonParams):
    type_info: str | None = None  # HoVer-Net files: its type_info.json naming the type ids, or `pannuke`


class ImportBackend(Backend):
    name = "import"
    Params = ImportParams

    def __init__(self, params: Any):
        super().__init__(params)
        self.path: Path | None = None
        self.type_names: list[str] = []  # a failed slide (never bound) records none
        self.tile_types: list[np.ndarray] = []
        self.placed = 0
        self.notes: list[str] = []

    @property
    def model(self) -> str:
        return f"imported from {self.path}" if self.path else "import"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "import_notes": self.notes}

    def bind(self, nuclei: str | Path | None, tiles: Any, rows: np.ndarray) -> None:
        """Read `nuclei` for the slide of `tiles` (a store.TileStore) and the rows to be segmented, in order."""
        self.bound = True
        if tiles.failed:  # nothing to segment: its store stays empty
            self.failed = True
            return
        self.failed = False
        if nuclei is None:
            raise DirlError(
                f"segmentation.backend import: no nuclei file for slide {tiles.slide_id!r} "
                "(the sample sheet's `nuclei` column, or dirl segment --nuclei)"
            )
        self.path = Path(nuclei)
        a = tiles.attrs
        contents = read_file(
            self.path,
            slide_mpp=a.get("slide_mpp"),
            magnification=a.get("objective_power"),
            type_info=self.params.type_info,
            max_nucleus_um2=self.params.max_area_um2,
        )
        self.notes = list(iter_summary(contents))
        for line in self.notes:
            log.info("%s: %s", self.path, line)
        if not len(contents.nuclei) and len(contents.points):
            raise DirlError(
                f"nuclei file {self.path} holds {len(contents.points)} typed points (QuPath's Points tool), not "
                "nuclei: give it in the sample sheet's `cell_labels` column (examples for the nucleus classifier)"
            )
        self.nuclei = contents.nuclei
        names = self.nuclei.names
        self.type_names = sorted(set(names))
        index = {n: i for i, n in enumerate(self.type_names)}
        self.types = np.array([index[n] for n in names], dtype=np.int16)
        self.boxes = self.nuclei.boxes
        n_nuclei = len(self.nuclei)
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
        self.placed = 0
        self.slide_id = tiles.slide_id
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
        """Labels (T, T) uint32 ids 1..n of the nuclei meeting the tile at level-0 (x0, y0), and their types.
        A continuous polygon takes the pixels whose centre it holds; a contour of boundary-pixel centres
        (HoVer-Net, CellViT) takes its boundary pixels too, as cv2.fillPoly draws it (findContours' inverse)."""
        import cv2

        lab = np.zeros((tile_px, tile_px), np.uint32)
        ids: list[int] = []
        shift = 4  # cv2.fillPoly's fixed point: vertices to 1/16 px
        for i in self._candidates(x0, y0):
            p = self.nuclei.polygon(i)
            x, y = (p[:, 0] - x0) / self.scale - 0.5, (p[:, 1] - y0) / self.scale - 0.5  # pixel-index space
            if self.nuclei.centres[i]:
                mask = np.zeros((tile_px, tile_px), np.uint8)
                pts = np.round(np.stack([x, y], 1) * (1 << shift)).astype(np.int32)
                cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=shift)
                rr, cc = np.nonzero(mask)
            else:
                rr, cc = fill_polygon(y, x, lab.shape)
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
        self.placed += len(ids)
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
        if at and not self.placed and not getattr(self, "failed", False):
            raise DirlError(
                f"nuclei file {self.path}: {len(self.nuclei)} nuclei, none inside the {at} tiles of slide "
                f"{self.slide_id!r}: is it this slide's file, in level-0 pixels (and the tiles where the nuclei are)?"
            )


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
