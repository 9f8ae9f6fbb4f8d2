"""The probe's labelled data: manifests, ImageFolder directories, and classified regions drawn on slides.

A **manifest** is a TSV (or CSV) with a header: `path`, `label`, and optionally `group` (patient, slide or
source image: the unit that never straddles two splits) and `split` (train / val / test). A relative path
is relative to the manifest. A **directory** in its place is an ImageFolder (`<class>/<image>`): each
image is its own group. **Regions** are QuPath GeoJSON files of classified annotation polygons drawn on
a slide (level-0 pixels, as QuPath exports them), named per slide in the sample sheet's `regions` column.

Everything here is checked at start-up by the workflow (a missing image, a label with fewer than two
groups, a group in two splits, a region outside its slide): each error is one line naming the file and
the row. Light on purpose (no torch, no zarr): the Snakefile imports it.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dirl.errors import ConfigError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Item:
    """One labelled image of a probe dataset."""

    path: Path
    label: str
    group: str
    split: str | None  # train | val | test, or None: the probe makes group-wise splits
    row: int  # line of the manifest (1 = header), 0 in an ImageFolder


def read_dataset(source: str | os.PathLike) -> list[Item]:
    """The items of a manifest file or an ImageFolder directory, checked (see `check_items`)."""
    source = Path(source)
    if source.is_dir():
        items = _image_folder(source)
    elif source.is_file():
        items = _manifest(source)
    else:
        raise ConfigError(f"probe dataset {source} does not exist (probe.datasets.<name>.manifest)")
    check_items(source, items)
    return items


def _manifest(path: Path) -> list[Item]:
    text = path.read_text(encoding="utf-8-sig")
    dialect = "excel-tab" if "\t" in text.splitlines()[0] else "excel"
    rows = list(csv.reader(text.splitlines(), dialect=dialect))
    if not rows:
        raise ConfigError(f"probe manifest {path} is empty: it needs a header (path, label[, group, split])")
    header = [c.strip() for c in rows[0]]
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise ConfigError(f"probe manifest {path}: missing column(s) {missing}; expected path, label[, group, split]")
    unknown = [c for c in header if c not in ("path", "label", "group", "split")]
    if unknown:
        raise ConfigError(f"probe manifest {path}: unknown column(s) {unknown}; known: path, label, group, split")
    col = {c: header.index(c) for c in header}
    items = []
    for i, row in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in row) or row[0].startswith("#"):
            continue
        rec = {c: row[j].strip() if j < len(row) else "" for c, j in col.items()}
        where = f"probe manifest {path}, line {i}"
        if not rec["path"] or not rec["label"]:
            raise ConfigError(f"{where}: empty {'path' if not rec['path'] else 'label'}")
        split = rec.get("split") or None
        if split is not None and split not in SPLITS:
            raise ConfigError(f"{where}: split {split!r}: use train, val or test (or leave the column out)")
        p = Path(rec["path"])
        p = p if p.is_absolute() else path.parent / p
        items.append(Item(p, rec["label"], rec.get("group") or str(p), split, i))
    return items


def _image_folder(root: Path) -> list[Item]:
    items = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                items.append(Item(f, d.name, str(f), None, 0))
    if not items:
        raise ConfigError(f"probe dataset {root}: no <class>/<image> files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return items


def check_items(source: Path, items: list[Item]) -> None:
    """Every image exists; a group lies in one split; each label has images of two groups or more (one
    to learn from, one to test on); splits, where given, are given for every row."""
    if not items:
        raise ConfigError(f"probe dataset {source} lists no images")

    def where(it: Item) -> str:
        return f"{source}, line {it.row}" if it.row else str(it.path)

    for it in items:
        if not it.path.is_file():
            raise ConfigError(f"probe dataset {where(it)}: image {it.path} does not exist")
    given = [it for it in items if it.split is not None]
    if given and len(given) != len(items):
        it = next(it for it in items if it.split is None)
        raise ConfigError(f"probe dataset {where(it)}: no split, but other rows have one: give it for every row")
    split_of: dict[str, Item] = {}
    for it in given:
        first = split_of.setdefault(it.group, it)
        if first.split != it.split:
            raise ConfigError(
                f"probe dataset {where(it)}: group {it.group!r} is in split {it.split!r} here and in "
                f"{first.split!r} on line {first.row}: a group (patient, slide, source image) must stay in one split"
            )
    groups: dict[str, set[str]] = defaultdict(set)
    for it in items:
        groups[it.label].add(it.group)
    few = {k: len(v) for k, v in sorted(groups.items()) if len(v) < 2}
    if few:
        raise ConfigError(
            f"probe dataset {source}: label(s) {few} have images of fewer than two groups: a probe needs one to "
            "learn from and another to test on"
        )


# --------------------------------------------------------------------------------------------------
# classified regions drawn on a slide (QuPath annotations)
@dataclass(frozen=True)
class Region:
    label: str
    polygon: Any  # shapely Polygon or MultiPolygon, level-0 pixels


def read_regions(path: str | os.PathLike, width: int | None = None, height: int | None = None) -> list[Region]:
    """The classified polygons of a QuPath GeoJSON (annotations; Polygon or MultiPolygon; unclassified
    ones and other geometries are left out). With the slide's level-0 size, a region that lies outside it
    is an error (another slide's file, or coordinates not in level-0 pixels)."""
    from shapely.geometry import shape

    from dirl.jsonsafe import check, open_json

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"regions file {path} does not exist (sample sheet column `regions`)")
    check(path)
    try:
        with open_json(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise ConfigError(f"regions file {path} is not JSON ({e})") from e
    feats = data.get("features", []) if isinstance(data, dict) else data
    if isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    out = []
    for i, f in enumerate(feats if isinstance(feats, list) else []):
        props = (f.get("properties") or {}) if isinstance(f, dict) else {}
        label = _class_name(props.get("classification"))
        geom = f.get("geometry") if isinstance(f, dict) else None
        if not label or not isinstance(geom, dict) or geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        try:
            poly = shape(geom)
        except (ValueError, TypeError, AttributeError, IndexError) as e:
            raise ConfigError(f"regions file {path}, feature {i}: not a polygon ({e})") from e
        if not poly.is_valid:
            from shapely import make_valid

            poly = make_valid(poly)
        if width and height:
            x0, y0, x1, y1 = poly.bounds
            if x0 < -1 or y0 < -1 or x1 > width + 1 or y1 > height + 1:
                raise ConfigError(
                    f"regions file {path}, feature {i} ({label}): its bounds {[round(v) for v in poly.bounds]} lie "
                    f"outside the slide ({width} x {height} level-0 px): is it this slide's file, in level-0 pixels?"
                )
        out.append(Region(label, poly))
    if not out:
        raise ConfigError(f"regions file {path} has no classified Polygon or MultiPolygon annotation")
    return out


def check_regions_file(path: str | os.PathLike, slide: str | os.PathLike) -> None:
    """Start-up check of a slide's regions file: it parses, classifies polygons, and lies inside the slide
    (its level-0 size read from the slide file; an unreadable slide fails its own tile job instead)."""
    width = height = None
    if os.path.isfile(slide):
        try:
            import openslide

            with openslide.OpenSlide(str(slide)) as s:
                width, height = s.dimensions
        except Exception:  # noqa: BLE001  (the slide's tile job names what is wrong with it)
            pass
    read_regions(path, width, height)


def _class_name(c: Any) -> str | None:
    """QuPath's classification: {"name": ...}, {"names": [...]} (a derived class) or a plain string."""
    if isinstance(c, str):
        return c or None
    if isinstance(c, dict):
        if c.get("names"):
            return ": ".join(str(n) for n in c["names"])
        return str(c["name"]) if c.get("name") else None
    return None


def label_tiles(regions: list[Region], coords, side: float, cover: float) -> list[str | None]:
    """Each tile's class: the region class covering at least `cover` of the tile's area (the most
    covering one when several do), or None. `coords` (N, 2) level-0 top-left, `side` level-0 pixels.
    Regions of one class are merged first, so overlapping drawings of a class are not counted twice."""
    from shapely import STRtree, box, unary_union

    labels = sorted({r.label for r in regions})
    merged = [unary_union([r.polygon for r in regions if r.label == name]) for name in labels]
    tree = STRtree(merged)
    out: list[str | None] = []
    for x, y in coords:
        b = box(float(x), float(y), float(x) + side, float(y) + side)
        fracs = {labels[int(k)]: merged[int(k)].intersection(b).area / b.area for k in tree.query(b)}
        best = max(fracs, key=fracs.get, default=None)
        out.append(best if best is not None and fracs[best] >= cover else None)
    return out
