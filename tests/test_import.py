"""The `import` segmentation backend: typed nuclei from QuPath/CellViT GeoJSON and HoVer-Net JSON,
checked against a synthetic slide's ground truth, round-tripped through `dirl export`, and bad files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers_segment import match_iou, synth_tiles

from dirl import store, synth
from dirl.cli import main as cli
from dirl.export import outline

GRID, T = 3, 224
NAMES = {0: "lymphocyte", 1: "tumour"}  # population index -> the type name the files carry
PANNUKE = {0: 2, 1: 1}  # -> HoVer-Net type id: inflammatory, neoplastic


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> dict:
    """A 3 x 3 tile slide of lymphocytes and tumour cells; each nucleus' polygon traced on the whole
    ground-truth label image, in level-0 px (tiles at level 0: scale 1)."""
    d = tmp_path_factory.mktemp("import")
    pops = (synth.POPULATIONS["lymphocyte"], synth.POPULATIONS["tumour"])
    tiles, gt, nuclei = synth_tiles(d / "t.zarr", pops, grid=GRID, seed=5)
    full = gt.reshape(GRID, GRID, T, T).transpose(0, 2, 1, 3).reshape(GRID * T, GRID * T)
    polys = {}
    for i in np.unique(full[full > 0]).tolist():
        ring = outline(full == i) + 0.5  # pixel centres -> level-0 coordinates of those centres
        polys[i] = [*ring.tolist(), ring[0].tolist()]
    return {"dir": d, "tiles": tiles, "gt": gt, "nuclei": nuclei, "polys": polys}


def _import(truth: dict, doc, name: str) -> Path:
    f = truth["dir"] / name
    f.write_text(json.dumps(doc))
    out = truth["dir"] / f"{name}.zarr"
    assert (
        cli(["segment", str(truth["tiles"]), str(out), "--settings", '{"backend": "import"}', "--nuclei", str(f)]) == 0
    )
    return out


def _check(truth: dict, cells: Path, type_of) -> None:
    labels = np.asarray(store.open_map(cells, "labels")[:])
    tp = n = 0
    for g, p in zip(truth["gt"], labels):
        a, b, _ = match_iou(g, p, 0.8)
        tp, n = tp + a, n + b
    assert n > 30 and tp / n > 0.95  # the same nuclei, drawn back within a pixel at their borders
    # every imported nucleus carries the type of the ground-truth nucleus it covers
    tab = store.read_nuclei(cells, ["tile", "label", "type"])
    names = store.map_attrs(cells, "labels")["type_names"]
    wrong = 0
    for t, lab, ty in zip(tab["tile"], tab["label"], tab["type"]):
        ids = truth["gt"][t][labels[t] == lab]
        ids = ids[ids > 0]
        wrong += names[ty] != type_of(truth["nuclei"][np.bincount(ids).argmax() - 1].population)
    assert len(tab["tile"]) > 30 and wrong == 0


def test_qupath_geojson(truth):
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": NAMES[truth["nuclei"][i - 1].population]},
            },
        }
        for i, ring in truth["polys"].items()
    ]
    tissue = [[0, 0], [GRID * T, 0], [GRID * T, GRID * T], [0, 0]]  # an annotation is not a nucleus
    feats.append(
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [tissue]},
            "properties": {"objectType": "annotation"},
        }
    )
    cells = _import(truth, {"type": "FeatureCollection", "features": feats}, "qupath.geojson")
    _check(truth, cells, NAMES.get)


def test_cellvit_multipolygons(truth):
    by_type: dict[str, list] = {}
    for i, ring in truth["polys"].items():
        by_type.setdefault(NAMES[truth["nuclei"][i - 1].population], []).append([ring])
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": polys},
            "properties": {"classification": {"name": n}},
        }
        for n, polys in by_type.items()
    ]
    _check(truth, _import(truth, feats, "cellvit.geojson"), NAMES.get)


def _hovernet(truth: dict) -> Path:
    nuc = {
        str(i): {"contour": ring[:-1], "type": PANNUKE[truth["nuclei"][i - 1].population], "type_prob": 0.9}
        for i, ring in truth["polys"].items()
    }
    return _import(truth, {"mag": 40, "nuc": nuc}, "hovernet.json")


def test_hovernet_json(truth):
    cells = _hovernet(truth)
    _check(truth, cells, {0: "inflammatory", 1: "neoplastic"}.get)
    # and back out for QuPath, classified by the imported types
    out = truth["dir"] / "hovernet-export.geojson"
    assert cli(["export", str(truth["tiles"]), "--cells", str(cells), "--out", str(out)]) == 0
    feats = json.loads(out.read_text())["features"]
    names = [f["properties"]["classification"]["name"] for f in feats if f["properties"]["objectType"] == "detection"]
    tab = store.read_nuclei(cells, ["type"])
    assert names == [["inflammatory", "neoplastic"][t] for t in tab["type"]]


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


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ("{not json", "is not JSON"),
        ({"type": "FeatureCollection", "features": [{"geometry": {"type": "Point", "coordinates": [1, 2]}}]}, "Point"),
        ({"nuc": {"1": {"contour": [[5000, 10], [5010, 10], [5005, 20]], "type": 1}}}, "lie outside slide 's'"),
        ({"hello": 1}, "neither GeoJSON"),
    ],
)
def test_bad_nuclei_files_name_the_file(tmp_path, caplog, content, message):
    slide, tiles = tmp_path / "s.svs", tmp_path / "t.zarr"
    assert cli(["synth", str(slide), "--width", "512", "--height", "512", "--mpp", "0.5", "--seed", "1"]) == 0
    assert cli(["tile", str(slide), str(tiles), "--tile-px", "128"]) == 0
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
