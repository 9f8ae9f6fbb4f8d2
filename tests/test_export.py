"""`dirl export`: GeoJSON for QuPath from a real tiling, segmentation and phenotype run of a synthetic slide
scanned at twice the tiles' resolution (so level-0 coordinates differ from tile pixels). Every geometry
is checked with a geometry library (shapely): valid, closed, non-empty, inside the slide; every class
has a colour and no ":" (QuPath reads "A: B" as a class derived from A); no measurement is NaN (QuPath
0.4 rejects the file). What QuPath's own reader makes of these files: README, "Checking in QuPath"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_segment import nuclei_around
from skimage.draw import polygon as fill_polygon

from dirl import store
from dirl.cli import main as cli
from dirl.segment.phenotype import PhenotypeModel


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("export")
    slide, tiles, cells, model = d / "s.svs", d / "t.zarr", d / "c.zarr", d / "model.json"
    assert cli(["synth", str(slide), "--width", "1024", "--height", "1024", "--mpp", "0.25", "--seed", "3"]) == 0
    assert cli(["tile", str(slide), str(tiles), "--mpp", "0.5", "--tile-px", "128"]) == 0
    assert cli(["segment", str(tiles), str(cells), "--threads", "2"]) == 0
    assert cli(["phenotype", str(cells), "--out", str(model), "--k", "2"]) == 0
    assert cli(["priors", str(tiles), str(cells), str(model), str(d / "p.zarr")]) == 0  # keeps each nucleus' class
    out, nuc = d / "export" / "s.geojson", d / "export" / "s.nuclei.geojson.gz"
    argv = ["export", str(tiles), "--cells", str(cells), "--priors", str(d / "p.zarr"), "--out", str(out)]
    assert cli([*argv, "--nuclei-out", str(nuc)]) == 0
    return {"tiles": tiles, "cells": cells, "model": model, "out": out, "nuclei": nuc}


def _features(path: Path, kind: str) -> list[dict]:
    import gzip

    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    doc = json.loads(text)
    assert doc["type"] == "FeatureCollection"
    return [f for f in doc["features"] if f["properties"]["objectType"] == kind]


def test_every_geometry_class_and_measurement_is_one_qupath_reads(run):
    import math

    import shapely
    from shapely.geometry import shape

    ts = store.open_tiles(run["tiles"])
    w, h = ts.attrs["level0_width"], ts.attrs["level0_height"]
    feats = [f for kind in ("annotation", "tile") for f in _features(run["out"], kind)]
    feats += _features(run["nuclei"], "detection")
    assert not _features(run["out"], "detection")  # the nuclei are in their own file
    for f in feats:
        g = f["geometry"]
        assert g["type"] == "Polygon"  # never a one-part MultiPolygon (QuPath 0.4/0.5 reject the file)
        ring = g["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
        poly = shape(g)
        assert poly.is_valid and not poly.is_empty, shapely.is_valid_reason(poly)
        x0, y0, x1, y1 = poly.bounds
        assert -1 <= x0 and -1 <= y0 and x1 <= w + 1 and y1 <= h + 1
        cls = f["properties"]["classification"]
        assert ":" not in cls["name"] and len(cls["color"]) == 3
        assert all(math.isfinite(v) for v in f["properties"].get("measurements", {}).values())


def _centroid(ring: np.ndarray) -> np.ndarray:
    """Area centroid of a closed polygon (shoelace)."""
    x, y = ring[:-1, 0], ring[:-1, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    a = cross.sum() / 2
    return np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * a)


def test_tiles_in_level0_pixels(run):
    ts = store.open_tiles(run["tiles"])
    side = ts.attrs["tile_px_level0"]
    assert side == 256  # 128 px at 0.5 µm/px from a 0.25 µm/px scan
    tiles = _features(run["out"], "tile")
    assert len(tiles) == len(ts) > 0
    for f, (x, y) in zip(tiles, ts.coords.tolist()):
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] == [x, y] and ring[2] == [x + side, y + side]
        assert 0 <= f["properties"]["measurements"]["Tissue fraction"] <= 1


def test_nuclei_outline_their_label_masks_with_their_class(run):
    ts = store.open_tiles(run["tiles"])
    scale = ts.attrs["tile_px_level0"] / ts.tile_px
    tab = nuclei_around(run["tiles"], run["cells"])
    labels = np.asarray(store.open_map(run["cells"], "labels")[:])
    nuclei = _features(run["nuclei"], "detection")
    assert len(nuclei) == len(tab["tile"]) == store.nucleus_count(run["cells"]) > 50
    # classes: the phenotype model's, named as in the priors (without QuPath's ":"), in its proportions
    model = PhenotypeModel.load(run["model"])
    names = [f"class {c['id']} ({c['description']})" for c in model.raw["classes"]]
    got = [f["properties"]["classification"]["name"] for f in nuclei]
    assert set(got) <= set(names)
    order = np.lexsort((tab["label"], tab["tile"]))
    tab = {k: v[order] for k, v in tab.items()}
    assert got == [names[c] for c in model.predict(tab)]
    # geometry: each polygon runs along its nucleus' pixel edges: drawn back by pixel centres it is exactly
    # the nucleus (bar the rare one with a hole or a second part), and its area is the measurement's
    exact, areas = 0, []
    for f, t, lab, x, y in zip(nuclei, tab["tile"], tab["label"], tab["x"], tab["y"], strict=True):
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert np.allclose(_centroid(ring), (x, y), atol=1.5 * scale)
        x0, y0 = ts.coords[t]
        px = (ring[:, 0] - x0) / scale - 0.5
        py = (ring[:, 1] - y0) / scale - 0.5
        drawn = np.zeros(labels.shape[1:], bool)
        rr, cc = fill_polygon(py, px, drawn.shape)
        drawn[rr, cc] = True
        truth = labels[t] == lab
        exact += np.array_equal(drawn, truth)
        shoelace = 0.5 * abs(np.dot(ring[:-1, 0], ring[1:, 1]) - np.dot(ring[:-1, 1], ring[1:, 0]))
        areas.append((shoelace * ts.attrs["slide_mpp"] ** 2, f["properties"]["measurements"]["Area µm^2"]))
    assert exact / len(nuclei) > 0.95
    qupath, measured = np.array(areas).T
    np.testing.assert_allclose(qupath, measured, rtol=1e-3)  # QuPath's area of the polygon = Area µm^2
    assert measured.min() >= 10  # the segmentation's own size filter, carried over


def test_without_phenotypes_every_nucleus_is_a_nucleus(run, tmp_path):
    out = tmp_path / "plain.geojson"
    assert cli(["export", str(run["tiles"]), "--cells", str(run["cells"]), "--out", str(out)]) == 0  # one file
    names = {f["properties"]["classification"]["name"] for f in _features(out, "detection")}
    assert names == {"nucleus"}
    assert cli(["export", str(run["tiles"]), "--out", str(tmp_path / "tiles.geojson")]) == 0
    assert not _features(tmp_path / "tiles.geojson", "detection")


def test_tiles_carry_the_mil_attention(run, tmp_path, caplog):
    import logging

    ts = store.open_tiles(run["tiles"])
    n = len(ts)
    att = np.random.default_rng(0).random(n).astype(np.float32)
    scores = tmp_path / "attention.npz"
    store.write_tile_scores(scores, {ts.slide_id: att, "another": np.ones(3)})
    out = tmp_path / "a.geojson"
    assert cli(["export", str(run["tiles"]), "--mil-attention", f"dirl/abmil={scores}", "--out", str(out)]) == 0
    m = [f["properties"]["measurements"] for f in _features(out, "tile")]
    assert np.allclose([x["MIL dirl/abmil attention"] for x in m], att)
    pct = np.array([x["MIL dirl/abmil attention percentile"] for x in m])
    assert pct[att.argmax()] == 100 and pct[att.argmin()] == 0 and np.array_equal(np.argsort(pct), np.argsort(att))
    store.write_tile_scores(scores, {ts.slide_id: att[:-1]})  # a stale file: wrong number of tiles
    with caplog.at_level(logging.ERROR, logger="dirl"):
        assert cli(["export", str(run["tiles"]), "--mil-attention", f"x={scores}", "--out", str(out)]) == 1
    assert f"{n - 1} attention values for slide" in caplog.text


def test_tissue_outline_surrounds_the_tissue_tiles(run):
    from matplotlib.path import Path as Polygon

    ts = store.open_tiles(run["tiles"])
    pieces = _features(run["out"], "annotation")  # one Polygon per piece of tissue
    assert len(pieces) == len(ts.attrs["tissue_outline"]) >= 1
    assert {p["properties"]["classification"]["name"] for p in pieces} == {"Tissue"}
    parts = [Polygon(np.asarray(p["geometry"]["coordinates"][0])) for p in pieces]
    side = ts.attrs["tile_px_level0"]
    centres = ts.coords + side / 2
    inside = np.array([any(p.contains_point(c) for p in parts) for c in centres])
    assert inside[ts.tissue >= 0.9].all()  # a tile mostly of tissue lies within


def test_sampled_tiles_carry_each_runs_attention_entropy(run, tmp_path):
    ts = store.open_tiles(run["tiles"])
    diag = {
        "tiles": [[ts.slide_id, 3], ["other", 0], [ts.slide_id, 5]],
        "runs": {r: {"per_image": {"head_entropy": [v, 0.5, v + 0.01]}} for r, v in (("dino", 0.8), ("dirl", 0.95))},
    }
    (tmp_path / "attention.json").write_text(json.dumps(diag))
    out = tmp_path / "d.geojson"
    assert cli(["export", str(run["tiles"]), "--attention", str(tmp_path / "attention.json"), "--out", str(out)]) == 0
    m = [f["properties"]["measurements"] for f in _features(out, "tile")]
    assert [i for i, x in enumerate(m) if "Attention entropy dirl" in x] == [3, 5]
    assert m[3]["Attention entropy dino"] == 0.8 and m[5]["Attention entropy dirl"] == 0.96
