"""`dirl export`: GeoJSON for QuPath from a real tiling, segmentation and phenotype run of a synthetic slide
scanned at twice the tiles' resolution (so level-0 coordinates differ from tile pixels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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
    out = d / "export" / "s.geojson"
    assert cli(["export", str(tiles), "--cells", str(cells), "--phenotypes", str(model), "--out", str(out)]) == 0
    return {"tiles": tiles, "cells": cells, "model": model, "out": out}


def _features(path: Path, kind: str) -> list[dict]:
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    return [f for f in doc["features"] if f["properties"]["objectType"] == kind]


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
    tab = store.read_nuclei(run["cells"])
    labels = np.asarray(store.open_map(run["cells"], "labels")[:])
    nuclei = _features(run["out"], "detection")
    assert len(nuclei) == len(tab["tile"]) == store.nucleus_count(run["cells"]) > 50
    # classes: the phenotype model's, named as in the priors, in the model's proportions
    model = PhenotypeModel.load(run["model"])
    names = [f"class {c['id']}: {c['description']}" for c in model.raw["classes"]]
    got = [f["properties"]["classification"]["name"] for f in nuclei]
    assert set(got) <= set(names)
    order = np.lexsort((tab["label"], tab["tile"]))
    tab = {k: v[order] for k, v in tab.items()}
    assert got == [names[c] for c in model.predict(tab)]
    # geometry: each polygon, drawn back into its tile, covers its nucleus' pixels; centroids agree
    ious = []
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
        ious.append((drawn & truth).sum() / (drawn | truth).sum())
    assert np.median(ious) > 0.8 and np.min(ious) > 0.3
    area = {f["properties"]["measurements"]["Area µm^2"] for f in nuclei}
    assert min(area) >= 10  # the segmentation's own size filter, carried over


def test_without_phenotypes_every_nucleus_is_a_nucleus(run, tmp_path):
    out = tmp_path / "plain.geojson"
    assert cli(["export", str(run["tiles"]), "--cells", str(run["cells"]), "--out", str(out)]) == 0
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
    (tissue,) = _features(run["out"], "annotation")
    assert tissue["properties"]["classification"]["name"] == "Tissue"
    parts = [Polygon(np.asarray(p[0])) for p in tissue["geometry"]["coordinates"]]
    side = ts.attrs["tile_px_level0"]
    centres = ts.coords + side / 2
    inside = np.array([any(p.contains_point(c) for p in parts) for c in centres])
    assert inside[ts.tissue >= 0.9].all() and len(parts) >= 1  # a tile mostly of tissue lies within
    w, h = ts.attrs["level0_width"], ts.attrs["level0_height"]
    assert all(0 <= x <= w + 1 and 0 <= y <= h + 1 for p in tissue["geometry"]["coordinates"] for x, y in p[0])


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
