"""The `import` segmentation backend on files laid out exactly as each tool writes them (rebuilt here from the
tools' own source code, cited per test, never from dirl's writer), checked against a synthetic slide's
ground truth: the same nuclei, their own area, their own type; and the files a tool can write that are not
nuclei, or not this slide's, refused in one line."""

from __future__ import annotations

import gzip
import json
import logging
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers_segment import match_iou, synth_tiles

from dirl import store, synth
from dirl.cli import main as cli
from dirl.polygons import pixel_outline

GRID, T = 3, 224
NAMES = {0: "Lymphocyte", 1: "Tumor"}  # population index -> the class the files carry
PANNUKE_ID = {0: 2, 1: 1}  # -> PanNuke type id: inflammatory, neoplastic (HoVer-Net type_info.json)
PANNUKE_TYPE_INFO = {  # hover_net@67e2ce5:type_info.json:1-8, verbatim layout
    "0": ["nolabe", [0, 0, 0]],
    "1": ["neopla", [255, 0, 0]],
    "2": ["inflam", [0, 255, 0]],
    "3": ["connec", [0, 0, 255]],
    "4": ["necros", [255, 255, 0]],
    "5": ["no-neo", [255, 165, 0]],
}
CELLVIT_TYPES = {"Background": 0, "Neoplastic": 1, "Inflammatory": 2, "Connective": 3, "Dead": 4, "Epithelial": 5}
CELLVIT_COLOURS = {
    1: [255, 0, 0],
    2: [34, 221, 77],
}  # CellViT@05097e1:cell_segmentation/inference/cell_detection.py:76-90


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> dict:
    """A 3 x 3 tile slide (0.5 µm/px, 20x) of lymphocytes and tumour cells, its ground-truth labels."""
    d = tmp_path_factory.mktemp("import")
    pops = (synth.POPULATIONS["lymphocyte"], synth.POPULATIONS["tumour"])
    tiles, gt, nuclei = synth_tiles(d / "t.zarr", pops, grid=GRID, seed=5)
    full = gt.reshape(GRID, GRID, T, T).transpose(0, 2, 1, 3).reshape(GRID * T, GRID * T)
    ids = np.unique(full[full > 0]).tolist()
    return {"dir": d, "tiles": tiles, "gt": gt, "full": full, "ids": ids, "nuclei": nuclei}


def population(truth: dict, i: int) -> int:
    return truth["nuclei"][i - 1].population


def findcontours(mask: np.ndarray) -> list[list[int]]:
    """The contour HoVer-Net and CellViT keep: `cv2.findContours(mask, RETR_TREE, CHAIN_APPROX_SIMPLE)[0][0]`,
    integer (x, y) indices of boundary pixels (hover_net@67e2ce5:models/hovernet/post_proc.py:133-143;
    CellViT@05097e1:cell_segmentation/utils/post_proc_cellvit.py:95-153)."""
    contours = cv2.findContours(mask.astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    return contours[0][:, 0, :].tolist()


def qupath_ring(mask: np.ndarray) -> list[list[float]]:
    """A nucleus as QuPath's own detections outline it: along pixel edges, closed (GeoJSON)."""
    ring = pixel_outline(mask).tolist()
    return [*ring, ring[0]]


def _import(truth: dict, path: Path, *settings: str) -> tuple[int, Path]:
    out = truth["dir"] / f"{path.name}.zarr"
    opts = json.dumps({"backend": "import", **dict(s.split("=", 1) for s in settings)})
    return cli(["segment", str(truth["tiles"]), str(out), "--settings", opts, "--nuclei", str(path)]), out


def _check(truth: dict, cells: Path, type_of) -> None:
    """The same nuclei (IoU > 0.8 with their ground truth), of their own area (not the cell's, not a
    pixel-centre ring's), each with the type of the nucleus it covers."""
    labels = np.asarray(store.open_map(cells, "labels")[:])
    tp = n = 0
    for g, p in zip(truth["gt"], labels):
        a, b, _ = match_iou(g, p, 0.8)
        tp, n = tp + a, n + b
    assert n > 30 and tp / n > 0.95
    assert abs((labels > 0).sum() / (truth["gt"] > 0).sum() - 1) < 0.03  # area: within 3 %
    tab = store.read_nuclei(cells, ["tile", "label", "type"])
    names = store.map_attrs(cells, "labels")["type_names"]
    wrong = 0
    for t, lab, ty in zip(tab["tile"], tab["label"], tab["type"]):
        ids = truth["gt"][t][labels[t] == lab]
        ids = ids[ids > 0]
        wrong += names[ty] != type_of(population(truth, int(np.bincount(ids).argmax())))
    assert len(tab["tile"]) > 30 and wrong == 0


# --------------------------------------------------------------------------------------------------
# QuPath
def qupath_cell(truth: dict, i: int, classification: dict, measurements: dict) -> dict:
    """A cell as QuPath 0.4-0.6 writes it: `nucleusGeometry` a member of the Feature beside `geometry` (the
    cell), `id` a UUID (qupath@v0.5.1:qupath-core/.../io/QuPathTypeAdapters.java:340-356)."""
    nucleus = truth["full"] == i
    cell = cv2.dilate(nucleus.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0  # the cell: 3 px around
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": {"type": "Polygon", "coordinates": [qupath_ring(cell)]},
        "nucleusGeometry": {"type": "Polygon", "coordinates": [qupath_ring(nucleus)]},
        "properties": {"objectType": "cell", "classification": classification, "measurements": measurements},
    }


def test_qupath_cells_with_derived_classes_nan_tiles_tma_cores_and_points(truth):
    """QuPath 0.5 cells (nucleus apart from the cell: read the nucleus, not the 2x larger cell), derived
    classes as `"names": [...]` (GsonTools.java 0.5.1:439-450), "NaN" as a string measurement (0.5+), and
    the objects a QuPath export also holds: a tile, a TMA core, a tissue annotation, typed points."""
    feats = [
        qupath_cell(
            truth,
            i,
            {"names": [NAMES[population(truth, i)], "Positive"], "color": [200, 50, 50]},
            {"Nucleus: Area": 41.57, "Cell: DAB OD std": "NaN"},
        )
        for i in truth["ids"]
    ]
    side = GRID * T
    square = [[0, 0], [side, 0], [side, side], [0, side], [0, 0]]
    feats += [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square]},
            "properties": {"objectType": "tile"},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square], "isEllipse": True},
            "properties": {"objectType": "tmaCore", "name": "A-1", "isMissing": False},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 160, 0]}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "MultiPoint", "coordinates": [[20, 250], [40, 260]]},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "Lymphocyte", "color": [196, 65, 127]},
            },
        },
    ]
    path = truth["dir"] / "qupath05.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}, indent=2))
    code, cells = _import(truth, path)
    assert code == 0
    _check(truth, cells, lambda p: f"{NAMES[p]}: Positive")
    notes = store.map_attrs(cells, "labels")["import_notes"]
    assert any("2 typed points" in n for n in notes) and any("1 tile" in n and "1 tmacore" in n for n in notes)


def test_qupath_04_bare_nan_and_gzip(truth):
    """QuPath 0.4 writes a NaN measurement as a bare `NaN` token (QuPathTypeAdapters.java 0.4.3:644 in a lenient
    Gson writer): not JSON, but QuPath's; and QuPath exports `.geojson.gz` (PathIO 0.5.1 exportObjectsAsGeoJSON)."""
    feats = [
        qupath_cell(truth, i, {"name": NAMES[population(truth, i)], "color": [1, 2, 3]}, {"Cell: DAB OD std": 0.0})
        for i in truth["ids"]
    ]
    text = json.dumps({"type": "FeatureCollection", "features": feats}).replace(
        '"Cell: DAB OD std": 0.0', '"Cell: DAB OD std": NaN'
    )
    assert "NaN" in text
    path = truth["dir"] / "qupath04.geojson.gz"
    path.write_bytes(gzip.compress(text.encode()))
    code, cells = _import(truth, path)
    assert code == 0
    _check(truth, cells, NAMES.get)


def test_qupath_03_object_type_and_measurement_lists(truth):
    """QuPath 0.3 (PathObjectTypeAdapters.java 0.3.2): `object_type`, classes with `colorRGB`, measurements as
    a list of {name, value}, TMA cores as `tma_core`, no ids; a bare list of features."""
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [qupath_ring(truth["full"] == i)]},
            "properties": {
                "object_type": "detection",
                "classification": {"name": NAMES[population(truth, i)], "colorRGB": -65536},
                "isLocked": False,
                "measurements": [{"name": "Area", "value": 40.0}],
            },
        }
        for i in truth["ids"]
    ]
    big = [[0, 0], [GRID * T, 0], [GRID * T, GRID * T], [0, 0]]
    feats.append(
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [big]},
            "properties": {"object_type": "tma_core"},
        }
    )
    path = truth["dir"] / "qupath03.json"
    path.write_text(json.dumps(feats))
    code, cells = _import(truth, path)
    assert code == 0
    _check(truth, cells, NAMES.get)  # the TMA core did not become one 2-Mpx nucleus


# --------------------------------------------------------------------------------------------------
# CellViT
def test_cellvit_cells_geojson_annotations_of_one_multipolygon_per_type(truth):
    """CellViT's cells.geojson (CellViT@05097e1:cell_segmentation/inference/cell_detection.py:538-597, templates
    cell_segmentation/utils/template_geojson.py:9-52): a top-level array, one Feature per type, objectType
    `annotation`, a MultiPolygon of the findContours rings closed by repeating their first point."""
    by_type: dict[int, list] = {}
    for i in truth["ids"]:
        ring = findcontours(truth["full"] == i)
        if len(ring) >= 3:
            by_type.setdefault(PANNUKE_ID[population(truth, i)], []).append([[*ring, ring[0]]])
    names = {v: k for k, v in CELLVIT_TYPES.items()}
    feats = [
        {
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": {"type": "MultiPolygon", "coordinates": polys},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": names[t], "color": CELLVIT_COLOURS[t]},
            },
        }
        for t, polys in sorted(by_type.items())
    ]
    path = truth["dir"] / "cells.geojson"
    path.write_text(json.dumps(feats, indent=2))
    code, cells = _import(truth, path)
    assert code == 0  # was: 0 nuclei, exit 0
    _check(truth, cells, {0: "Inflammatory", 1: "Neoplastic"}.get)


def cellvit_cells(truth: dict) -> list[dict]:
    """CellViT's per-cell records (CellViT@05097e1:cell_detection.py:360-391): level-0 contour (open ring),
    centroid (x, y), bbox (row, col), type id, and the bookkeeping keys."""
    out = []
    for i in truth["ids"]:
        m = truth["full"] == i
        ring = findcontours(m)
        if len(ring) < 3:
            continue
        ys, xs = np.nonzero(m)
        out.append(
            {
                "bbox": [[int(ys.min()), int(xs.min())], [int(ys.max()) + 1, int(xs.max()) + 1]],
                "centroid": [float(xs.mean()), float(ys.mean())],
                "contour": ring,
                "type_prob": 0.93,
                "type": PANNUKE_ID[population(truth, i)],
                "patch_coordinates": [0, 0],
                "cell_status": 0,
                "offset_global": [0, 0],
                "edge_position": False,
            }
        )
    return out


def test_cellvit_cells_json(truth):
    """cells.json, CellViT's default output (cell_detection.py:438-445): `type_map` name -> id."""
    meta = {"base_magnification": 20.0, "downsampling": 1, "patch_size": 1024, "base_mpp": 0.5, "level": 16}
    doc = {"wsi_metadata": meta, "processed_patches": ["0_0"], "type_map": CELLVIT_TYPES, "cells": cellvit_cells(truth)}
    path = truth["dir"] / "cells.json"
    path.write_text(json.dumps(doc, indent=2))
    code, cells = _import(truth, path)
    assert code == 0  # was refused: "neither GeoJSON nor HoVer-Net JSON"
    _check(truth, cells, {0: "Inflammatory", 1: "Neoplastic"}.get)


def test_cellvit_plus_plus_cells_json_and_cellvits_downsampling_bug(truth, caplog):
    """CellViT++ (CellViT-plus-plus@463c5c4:cellvit/inference/inference_memory.py:227-231, config.py:32-38):
    compact, no processed_patches, `type_map` id -> name. CellViT v1 run with downsampling 2 writes
    coordinates in no frame (TIO-IKIM/CellViT#34): refused, saying why."""
    doc = {"wsi_metadata": {"downsampling": 1, "base_mpp": 0.5}, "type_map": {"1": "Neoplastic", "2": "Inflammatory"}}
    path = truth["dir"] / "pp_cells.json"
    path.write_text(json.dumps({**doc, "cells": cellvit_cells(truth)}, separators=(",", ":")))
    code, cells = _import(truth, path)
    assert code == 0
    _check(truth, cells, {0: "Inflammatory", 1: "Neoplastic"}.get)
    v1 = {
        "wsi_metadata": {"downsampling": 2},
        "processed_patches": [],
        "type_map": CELLVIT_TYPES,
        "cells": cellvit_cells(truth),
    }
    bad = truth["dir"] / "v1_ds2.json"
    bad.write_text(json.dumps(v1))
    with caplog.at_level(logging.ERROR, logger="dirl"):
        assert _import(truth, bad)[0] == 1
    assert "downsampling 2" in caplog.text and "base magnification" in caplog.text


# --------------------------------------------------------------------------------------------------
# HoVer-Net
def hovernet_wsi(truth: dict, mag: int = 40, typed: bool = True) -> dict:
    """HoVer-Net's WSI JSON (hover_net@67e2ce5:infer/base.py:80-94): {"mag": proc_mag, "nuc": {id: record}},
    the record built at the processing magnification (models/hovernet/post_proc.py:121-181): here 40x on a
    20x slide, so every level-0 pixel is 2 x 2 processing pixels."""
    f = mag // 20
    nuc = {}
    for k, i in enumerate(truth["ids"], start=1):
        m = np.kron(truth["full"] == i, np.ones((f, f), np.uint8)).astype(bool)
        ring = findcontours(m)
        if len(ring) < 3:
            continue
        ys, xs = np.nonzero(m)
        nuc[str(k)] = {
            "bbox": [[int(ys.min()), int(xs.min())], [int(ys.max()) + 1, int(xs.max()) + 1]],
            "centroid": [float(xs.mean()), float(ys.mean())],
            "contour": ring,
            "type_prob": 0.9 if typed else None,
            "type": PANNUKE_ID[population(truth, i)] if typed else None,
        }
    return {"mag": mag, "nuc": nuc}


def test_hovernet_at_40x_on_a_20x_slide_with_its_type_info(truth, caplog):
    """Coordinates at `mag` 40 scaled to level 0 (was: refused as "outside the slide"), contours of pixel
    indices shifted by half a pixel and drawn with their boundary (was: -11 % area); type ids named by the
    checkpoint's type_info.json, never by guess (a CoNSeP checkpoint's ids are other types)."""
    path = truth["dir"] / "hovernet.json"
    path.write_text(json.dumps(hovernet_wsi(truth)))  # json.dump, default separators (base.py:93)
    info = truth["dir"] / "type_info.json"
    info.write_text(json.dumps(PANNUKE_TYPE_INFO, indent=4))
    with caplog.at_level(logging.ERROR, logger="dirl"):
        assert _import(truth, path)[0] == 1
    assert "type ids with no names" in caplog.text and "type_info" in caplog.text
    code, cells = _import(truth, path, f"type_info={info}")
    assert code == 0
    _check(truth, cells, {0: "inflam", 1: "neopla"}.get)
    notes = store.map_attrs(cells, "labels")["import_notes"]
    assert any("scaled by 0.5" in n for n in notes) and any("half a pixel" in n for n in notes)
    code, cells = _import(truth, path, "type_info=pannuke")
    assert code == 0
    _check(truth, cells, {0: "inflammatory", 1: "neoplastic"}.get)


def test_hovernet_segmentation_only_at_the_slides_magnification(truth):
    path = truth["dir"] / "hovernet20.json"
    path.write_text(json.dumps(hovernet_wsi(truth, mag=20, typed=False)))
    code, cells = _import(truth, path)
    assert code == 0
    _check(truth, cells, lambda p: "nucleus")


# --------------------------------------------------------------------------------------------------
def test_export_then_import_gives_the_same_labels(tmp_path):
    slide, tiles = tmp_path / "s.svs", tmp_path / "t.zarr"
    assert cli(["synth", str(slide), "--width", "1024", "--height", "1024", "--mpp", "0.25", "--seed", "3"]) == 0
    assert cli(["tile", str(slide), str(tiles), "--mpp", "0.5", "--tile-px", "128"]) == 0  # 2 level-0 px per tile px
    assert cli(["segment", str(tiles), str(tmp_path / "c.zarr")]) == 0
    assert cli(["export", str(tiles), "--cells", str(tmp_path / "c.zarr"), "--out", str(tmp_path / "e.geojson")]) == 0
    opts = ["--settings", '{"backend": "import"}', "--nuclei", str(tmp_path / "e.geojson")]
    assert cli(["segment", str(tiles), str(tmp_path / "i.zarr"), *opts]) == 0
    a = np.asarray(store.open_map(tmp_path / "c.zarr", "labels")[:])
    b = np.asarray(store.open_map(tmp_path / "i.zarr", "labels")[:])
    assert store.nucleus_count(tmp_path / "i.zarr") == store.nucleus_count(tmp_path / "c.zarr") > 50
    assert ((a > 0) == (b > 0)).mean() > 0.999


POINTS_ONLY = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "geometry": {"type": "MultiPoint", "coordinates": [[20, 250], [40, 260]]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [1, 2, 3]}},
        }
    ],
}


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ("{not json", "is not JSON"),
        (POINTS_ONLY, "holds 2 typed points (QuPath's Points tool), not nuclei"),
        (
            {"mag": None, "nuc": {"1": {"contour": [[5000, 10], [5010, 10], [5005, 20]], "type": None}}},
            "lie outside slide 's'",
        ),
        (
            {"mag": None, "nuc": {"1": {"contour": [[700, 700], [705, 700], [702, 705]], "type": None}}},
            "none inside the 9 tiles",  # in the slide, below and right of every tile
        ),
        ({"hello": 1}, "neither GeoJSON"),
    ],
)
def test_bad_nuclei_files_name_the_file(tmp_path, caplog, content, message):
    slide, tiles = tmp_path / "s.svs", tmp_path / "t.zarr"
    assert cli(["synth", str(slide), "--width", "768", "--height", "768", "--mpp", "0.5", "--seed", "1"]) == 0
    assert cli(["tile", str(slide), str(tiles), "--tile-px", "200", "--min-tissue", "0"]) == 0
    assert store.open_tiles(tiles).coords.max() + 200 < 700 and len(store.open_tiles(tiles)) == 9
    f = tmp_path / "n.json"
    if content is not None:
        f.write_text(content if isinstance(content, str) else json.dumps(content))
    with caplog.at_level(logging.ERROR, logger="dirl"):
        code = cli(
            ["segment", str(tiles), str(tmp_path / "c.zarr"), "--settings", '{"backend": "import"}', "--nuclei", str(f)]
        )
    assert code == 1 and not (tmp_path / "c.zarr").exists()
    assert message in caplog.text and str(f) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="dirl"):
        assert cli(["segment", str(tiles), str(tmp_path / "c.zarr"), "--nuclei", str(f)]) == 1
    assert "only segmentation.backend import" in caplog.text


# --------------------------------------------------------------------------------------------------
# imported types as the cell classes
def _hovernet(truth: dict) -> Path:
    path = truth["dir"] / "hovernet-classes.json"
    path.write_text(json.dumps(hovernet_wsi(truth)))
    code, cells = _import(truth, path, "type_info=pannuke")
    assert code == 0
    return cells


def _phenotype(truth: dict, cells: Path, out: Path, **settings) -> int:
    opts = json.dumps({"source": "imported", **settings})
    gallery = ["--gallery", str(out.with_suffix(".png")), "--tiles", str(truth["tiles"])]
    return cli(["phenotype", str(cells), "--out", str(out), *gallery, "--settings", opts])


def _prior_of_nuclei(truth: dict, cells: Path, model: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(the prior value most of each nucleus' pixels got, the nucleus' type) over the table."""
    assert cli(["priors", str(truth["tiles"]), str(cells), str(model), str(out)]) == 0
    pri = np.asarray(store.open_map(out, "priors")[:])
    labels = np.asarray(store.open_map(cells, "labels")[:])
    tab = store.read_nuclei(cells, ["tile", "label", "type"])
    got = [np.bincount(pri[t][labels[t] == lab]).argmax() for t, lab in zip(tab["tile"], tab["label"])]
    return np.array(got), tab["type"]


def test_imported_types_are_the_cell_classes_of_the_priors(truth):
    cells, d = _hovernet(truth), truth["dir"]
    assert _phenotype(truth, cells, d / "m.json") == 0
    model = json.loads((d / "m.json").read_text())
    assert model["method"] == "imported" and [c["description"] for c in model["classes"]] == [
        "inflammatory",
        "neoplastic",
    ]
    assert store.map_attrs(cells, "labels")["type_names"] == ["inflammatory", "neoplastic"]
    got, types = _prior_of_nuclei(truth, cells, d / "m.json", d / "p.zarr")
    assert (got == store.prior_value(types)).mean() > 0.95  # each nucleus painted with its type's class
    # merging and dropping: neoplastic nuclei become tissue, inflammatory ones the only class
    assert _phenotype(truth, cells, d / "m2.json", type_classes=["inflammatory=immune"]) == 1  # neoplastic unnamed
    assert _phenotype(truth, cells, d / "m2.json", type_classes=["inflammatory=immune", "neoplastic=-"]) == 0
    got, types = _prior_of_nuclei(truth, cells, d / "m2.json", d / "p2.zarr")
    assert (got[types == 0] == 2).mean() > 0.95 and (got[types == 1] == 1).mean() > 0.95
    classes = json.loads((d / "m2.json").read_text())["classes"]
    assert [(c["description"], c["types"]) for c in classes] == [("immune", ["inflammatory"])]


def test_imported_phenotypes_need_imported_nuclei(truth, tmp_path, caplog):
    cells = tmp_path / "ws.zarr"
    assert cli(["segment", str(truth["tiles"]), str(cells)]) == 0  # watershed: no types
    with caplog.at_level(logging.ERROR, logger="dirl"):
        assert _phenotype(truth, cells, tmp_path / "m.json") == 1
    assert "was not segmented by backend import" in caplog.text
