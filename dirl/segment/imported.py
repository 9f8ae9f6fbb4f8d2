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
