"""Typed nuclei (and typed points) as the tools labs use write them, read into level-0 polygons.

Each reader follows its tool's own writer (the tests rebuild every layout from the tool's source, cited):
- **QuPath GeoJSON** (0.3-0.7; FeatureCollection, a bare list or one Feature; gzip too): detections and
  tiles-less cells, a cell's nucleus from its Feature-level `nucleusGeometry` (0.4+) or its properties
  (older); classes `{"name": ...}`, `{"names": [...]}` (a derived class, read "Tumor: Positive") or a string;
  `objectType` or 0.3's `object_type`; TMA cores, tiles and the root left out; 0.4's bare `NaN`
  measurements read. Annotations: classified Points/MultiPoints are **typed points** (QuPath's Points tool:
  how pathologists mark cells by hand), nucleus-sized polygons are nuclei (CellViT writes its nuclei as one
  MultiPolygon annotation per type), larger ones regions (left out). Coordinates are continuous level-0
  pixels: a pixel is inside when its centre is.
- **CellViT / CellViT++** `cells.json` (`type_map` name -> id in CellViT, id -> name in CellViT++) and
  `cells.geojson`: contours are the integer pixel indices cv2.findContours returns, level 0 (CellViT v1
  only when it processed the slide at its base magnification).
- **HoVer-Net** JSON (`{"mag", "nuc": {id: {"contour", "type", ...}}}`): contours are integer pixel indices at
  the processing magnification `mag`; scaled to level 0 by the slide's magnification over `mag`; type ids
  named by a HoVer-Net `type_info.json` (`segmentation.type_info`, or `pannuke` for its shipped map), never
  by guess.
Contours made of pixel indices are rasterised with their boundary pixels (the inverse of findContours),
continuous polygons by pixel centres: both give the nucleus its own area.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dirl.errors import DirlError

log = logging.getLogger(__name__)

# HoVer-Net's shipped type_info.json (PanNuke), its names spelled out; 0 = no label
PANNUKE = {0: "unlabelled", 1: "neoplastic", 2: "inflammatory", 3: "connective", 4: "dead", 5: "epithelial"}
NOT_NUCLEI = {"tile", "tmacore", "tma_core", "root"}  # QuPath objects that are never nuclei
UNCLASSIFIED = "unclassified"


@dataclass
class Nuclei:
    """Polygons in level-0 (x, y), packed: vertices of nucleus i are `xy[offsets[i]:offsets[i + 1]]`
    (float32: a million nuclei of ~30 vertices take ~250 MB, not the gigabytes of parsed JSON), their
    bounding boxes (x0, y0, x1, y1), type names, and whether the vertices are boundary-pixel centres."""

    names: list[str] = field(default_factory=list)
    _parts: list[np.ndarray] = field(default_factory=list)
    _centres: list[bool] = field(default_factory=list)

    def add(self, ring: Any, name: str, centres: bool = False) -> None:
        xy = np.asarray(ring, dtype=np.float32).reshape(-1, 2)
        if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
            xy = xy[:-1]  # GeoJSON rings repeat their first vertex
        if len(xy) < 3:
            raise ValueError(f"a nucleus of {len(xy)} vertices: polygons need 3 or more")
        if not np.isfinite(xy).all():
            raise ValueError("a nucleus with a non-finite coordinate")
        self._parts.append(xy)
        self.names.append(name)
        self._centres.append(centres)

    def pack(self) -> Nuclei:
        sizes = [len(p) for p in self._parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.xy = np.concatenate(self._parts) if self._parts else np.zeros((0, 2), np.float32)
        self.boxes = np.array([[*p.min(0), *p.max(0)] for p in self._parts], np.float64).reshape(-1, 4)
        self.centres = np.asarray(self._centres, bool)
        self._parts, self._centres = [], []
        return self

    def __len__(self) -> int:
        return len(self.names)

    def polygon(self, i: int) -> np.ndarray:
        return self.xy[self.offsets[i] : self.offsets[i + 1]]


@dataclass
class Points:
    """Typed points in level-0 (x, y): what QuPath's Points tool exports."""

    xy: list[tuple[float, float]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def add(self, coords: Any, name: str) -> None:
        for x, y in np.asarray(coords, dtype=np.float64).reshape(-1, 2).tolist():
            self.xy.append((x, y))
            self.names.append(name)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class Contents:
    """What one file holds, and what was done to read it (logged, and recorded in the cells store)."""

    nuclei: Nuclei
    points: Points
    format: str
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def read_file(
    path: str | Path,
    *,
    slide_mpp: float | None,
    magnification: float | None = None,
    type_info: str | None = None,
    max_nucleus_um2: float = 400.0,
) -> Contents:
    """Everything a nuclei file holds (nuclei and typed points), in level-0 pixels of the slide of
    `slide_mpp` µm/px and objective `magnification` (its `openslide.objective-power`; None: the standard
    magnification nearest 10 µm/px over `slide_mpp`). Every way it can be wrong is a DirlError naming
    the file."""
    import ijson

    from dirl import jsonsafe

    path = Path(path)
    if not path.exists():
        raise DirlError(f"nuclei file {path} does not exist")
    if not path.is_file():
        raise DirlError(f"nuclei file {path} is not a regular file (a directory, FIFO or device?)")
    if path.suffix == ".snappy":
        raise DirlError(
            f"nuclei file {path} is snappy-compressed (CellViT++ --compression): decompress it to "
            f"{path.with_suffix('')} first (python-snappy: snappy.decompress of the whole file)"
        )
    try:
        jsonsafe.check(path)
        kind = _kind(path)
        reader = {
            "hovernet": _hovernet,
            "cellvit": _cellvit_json,
            "features": _geojson,
            "list": _geojson,
            "feature": _geojson,
        }
        if kind not in reader:
            raise DirlError(
                f"nuclei file {path}: neither GeoJSON (QuPath, CellViT cells.geojson), CellViT's cells.json "
                "nor HoVer-Net's JSON (a 'nuc' object)"
            )
        out = reader[kind](
            path,
            kind,
            slide_mpp=slide_mpp,
            magnification=magnification,
            type_info=type_info,
            max_nucleus_um2=max_nucleus_um2,
        )
    except ijson.JSONError as e:
        raise DirlError(f"nuclei file {path} is not JSON ({e})") from e
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise DirlError(f"nuclei file {path} is malformed: {e!r}") from e
    out.nuclei.pack()
    return out


# --------------------------------------------------------------------------------------------------
def _stream(path: Path):
    """The file's bytes, gunzipped if need be, with QuPath 0.4's bare NaN / Infinity measurements made
    JSON nulls (0.4 wrote them so; no JSON parser takes them)."""
    from dirl.jsonsafe import open_json

    return _BareNaN(open_json(path))


class _BareNaN:
    """A read-only byte stream that turns bare NaN / Infinity / -Infinity tokens into null. Pieces end at
    a delimiter (a token never spans one), and the delimiter before a piece decides its first token."""

    TOKEN = re.compile(rb"(?<=[\[:,\s])-?(?:NaN|Infinity)(?=[\s,\]\}])")

    def __init__(self, f):
        self.f, self.tail, self.prev = f, b"", b""

    def read(self, n: int = -1) -> bytes:
        if n == 0:  # ijson probes read(0) for the stream's type
            return b""
        while True:
            chunk = self.f.read(1 << 20)
            data = self.tail + chunk
            if not chunk:
                self.tail = b""
                return self._sub(data)
            cut = max(data.rfind(b","), data.rfind(b"]"), data.rfind(b"}"))
            if cut < 0:
                self.tail = data
                continue
            piece, self.tail = data[: cut + 1], data[cut + 1 :]
            return self._sub(piece)

    def _sub(self, piece: bytes) -> bytes:
        fixed = self.TOKEN.sub(b"null", self.prev + piece)[len(self.prev) :]
        self.prev = piece[-1:] or self.prev
        return fixed

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _kind(path: Path) -> str:
    """What the top level holds, from its first keys: hovernet ('nuc'), cellvit ('cells'), features
    (a FeatureCollection), feature (one Feature), list (a bare list of features)."""
    import ijson

    with _stream(path) as f:
        for prefix, event, value in ijson.parse(f):
            if prefix == "" and event == "start_array":
                return "list"
            if prefix == "" and event == "map_key":
                kind = {"nuc": "hovernet", "cells": "cellvit", "features": "features", "geometry": "feature"}.get(value)
                if kind:
                    return kind
            if prefix == "" and event == "end_map":
                break
    return "unknown"


# --------------------------------------------------------------------------------------------------
# GeoJSON: QuPath, CellViT cells.geojson
def _class_name(c: Any) -> str:
    if isinstance(c, str):
        return c or UNCLASSIFIED
    if isinstance(c, dict):
        if c.get("names"):  # QuPath's derived classes
            return ": ".join(str(n) for n in c["names"])
        if c.get("name"):
            return str(c["name"])
    return UNCLASSIFIED


def _geojson(path: Path, kind: str, *, slide_mpp: float | None, max_nucleus_um2: float, **_: Any) -> Contents:
    import ijson

    nuclei, points = Nuclei(), Points()
    skipped: dict[str, int] = {}
    annotation_nuclei = 0
    max_px2 = max_nucleus_um2 / slide_mpp**2 if slide_mpp else float("inf")
    with _stream(path) as f:
        feats = (
            [json.load(f)]
            if kind == "feature"
            else ijson.items(f, "features.item" if kind == "features" else "item", use_float=True)
        )
        for feat in feats:
            if not isinstance(feat, dict):
                raise ValueError(f"a feature that is not a JSON object: {str(feat)[:80]}")
            props = feat.get("properties") or {}
            if not isinstance(props, dict):
                raise ValueError(f"feature properties that are not a JSON object: {str(props)[:80]}")
            otype = str(props.get("objectType", props.get("object_type", props.get("type", "detection")))).lower()
            if otype in NOT_NUCLEI:
                skipped[otype] = skipped.get(otype, 0) + 1
                continue
            name = _class_name(props.get("classification"))
            geom = feat.get("nucleusGeometry") or props.get("nucleusGeometry") or feat.get("geometry")
            if not isinstance(geom, dict):
                raise ValueError(f"a {otype} without a geometry")
            gtype = geom.get("type")
            if gtype in ("Point", "MultiPoint"):
                if otype == "annotation" and name != UNCLASSIFIED:
                    points.add(geom["coordinates"], name)
                else:
                    skipped[f"{otype} points"] = skipped.get(f"{otype} points", 0) + 1
                continue
            if gtype not in ("Polygon", "MultiPolygon"):
                skipped[f"{otype} {gtype}"] = skipped.get(f"{otype} {gtype}", 0) + 1
                continue
            parts = [geom["coordinates"]] if gtype == "Polygon" else geom["coordinates"]
            for poly in parts:
                ring = poly[0]
                if otype == "annotation":  # CellViT's nuclei (pixel-index rings); QuPath's regions are larger
                    if _area(ring) > max_px2:
                        skipped["annotation regions"] = skipped.get("annotation regions", 0) + 1
                        continue
                    nuclei.add(ring, name, centres=True)
                    annotation_nuclei += 1
                else:
                    nuclei.add(ring, name)
    fmt = "GeoJSON (CellViT cells.geojson layout)" if annotation_nuclei else "GeoJSON (QuPath)"
    notes = []
    if annotation_nuclei:
        notes.append(
            f"{annotation_nuclei} nuclei from annotation polygons of nucleus size (≤ {max_nucleus_um2:g} µm², "
            "as CellViT writes them): read as contours of boundary-pixel centres"
        )
    return Contents(nuclei, points, fmt, notes, skipped)


def _area(ring: list) -> float:
    a = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    x, y = a[:, 0], a[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# --------------------------------------------------------------------------------------------------
# CellViT / CellViT++ cells.json
def _cellvit_json(path: Path, kind: str, **_: Any) -> Contents:
    import ijson

    with _stream(path) as f:
        head = {}
        for key, value in ijson.kvitems(f, "", use_float=True):
            if key == "cells":
                break
            head[key] = value
    type_map = head.get("type_map") or {}
    if type_map and all(isinstance(v, (int, float)) for v in type_map.values()):
        names = {int(v): str(k) for k, v in type_map.items()}  # CellViT: name -> id
    else:
        names = {int(k): str(v) for k, v in type_map.items()}  # CellViT++: id -> name
    meta = head.get("wsi_metadata") or {}
    notes = []
    if "processed_patches" in head and float(meta.get("downsampling", 1) or 1) != 1:
        raise DirlError(
            f"nuclei file {path}: CellViT wrote it with downsampling {meta.get('downsampling')}, where its coordinates "
            "are neither level-0 nor processing-level pixels (TIO-IKIM/CellViT issues 34 and 55): run CellViT at "
            "the slide's base magnification, or CellViT++, which rescales to level 0"
        )
    nuclei = Nuclei()
    with _stream(path) as f:
        for cell in ijson.items(f, "cells.item", use_float=True):
            t = cell.get("type")
            name = names.get(int(t), f"type {int(t)}") if t is not None else UNCLASSIFIED
            nuclei.add(np.asarray(cell["contour"], np.float64) + 0.5, name, centres=True)
    notes.append("CellViT contours are boundary-pixel indices: shifted by half a pixel, rasterised with their boundary")
    return Contents(
        nuclei, Points(), "CellViT cells.json" + ("" if "processed_patches" in head else " (CellViT++)"), notes
    )


# --------------------------------------------------------------------------------------------------
# HoVer-Net
def hovernet_type_names(type_info: str | None, path: Path) -> dict[int, str] | None:
    """Type id -> name from a HoVer-Net type_info.json (`{"0": ["nolabe", [0,0,0]], ...}`), `pannuke`, or
    None when no map is given."""
    if type_info is None:
        return None
    if type_info.lower() == "pannuke":
        return PANNUKE
    p = Path(type_info)
    if not p.is_file():
        raise DirlError(f"segmentation.type_info {type_info}: no such type_info.json (HoVer-Net's type map)")
    try:
        raw = json.loads(p.read_text())
        return {int(k): str(v[0] if isinstance(v, (list, tuple)) else v) for k, v in raw.items()}
    except (ValueError, TypeError, IndexError) as e:
        raise DirlError(f"segmentation.type_info {p}: not a HoVer-Net type_info.json ({e})") from e


STANDARD_MAGNIFICATIONS = (2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0)


def level0_magnification(slide_mpp: float, objective_power: float | None = None) -> float:
    """The slide's objective magnification as HoVer-Net reads it (`openslide.objective-power`), else the
    standard magnification nearest 10 µm/px over its µm/px (0.2456 µm/px: 40x)."""
    if objective_power:
        return float(objective_power)
    return min(STANDARD_MAGNIFICATIONS, key=lambda m: abs(np.log(m * slide_mpp / 10.0)))


def _hovernet(
    path: Path, kind: str, *, slide_mpp: float | None, magnification: float | None, type_info: str | None, **_: Any
) -> Contents:
    import ijson

    with _stream(path) as f:
        mag = next((v for k, v in ijson.kvitems(f, "", use_float=True) if k == "mag"), None)
    type_names = hovernet_type_names(type_info, path)
    notes = []
    if mag is None:
        factor = 1.0
        notes.append("HoVer-Net mag null (tile mode): coordinates read as level-0 pixels")
    else:
        if not slide_mpp:
            raise DirlError(f"nuclei file {path}: HoVer-Net's mag {mag} needs the slide's µm/px to reach level 0")
        base = level0_magnification(slide_mpp, magnification)
        factor = base / float(mag)  # HoVer-Net: processing shape = level-0 shape * mag / objective power
        notes.append(
            f"HoVer-Net processed at {mag:g}x, the slide's level 0 is {base:g}x ({slide_mpp:.4g} µm/px): "
            f"coordinates scaled by {factor:.4g}"
        )
    notes.append("contour points are pixel indices: shifted by half a pixel, rasterised with their boundary pixels")
    nuclei = Nuclei()
    seen: set[int] = set()
    with _stream(path) as f:
        for _, v in ijson.kvitems(f, "nuc", use_float=True):
            t = v.get("type")
            if t is None:
                name = "nucleus"
            else:
                seen.add(int(t))
                if type_names is None:
                    raise DirlError(
                        f"nuclei file {path}: HoVer-Net type ids with no names: give its type_info.json as "
                        "segmentation.type_info (or `pannuke` for the PanNuke map HoVer-Net ships); a CoNSeP or "
                        "MoNuSAC checkpoint's ids mean other types"
                    )
                name = type_names.get(int(t), f"type {int(t)}")
            nuclei.add((np.asarray(v["contour"], np.float64) + 0.5) * factor, name, centres=True)
    return Contents(nuclei, Points(), f"HoVer-Net JSON (mag {mag})", notes)


def iter_summary(c: Contents) -> Iterator[str]:
    yield f"{c.format}: {len(c.nuclei)} nuclei, {len(c.points)} typed points"
    yield from c.notes
    if c.skipped:
        yield "left out: " + ", ".join(f"{n} {k}" for k, n in sorted(c.skipped.items()))
