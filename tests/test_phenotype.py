"""`dirl phenotype`: cohort-level nucleus classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_segment import nuclei_around, synth_tiles

from dirl import store
from dirl.cli import main as cli
from dirl.errors import DirlError
from dirl.segment import phenotype
from dirl.segment.phenotype import PhenotypeModel


def _two_population_slides(tmp_path):
    """Two synthetic slides with small dark round (lymphocyte) and large pale elongated (tumour)
    nuclei, segmented by the watershed backend; each nucleus gets the population of the ground-truth
    nucleus it overlaps most."""
    from dirl import synth

    pops = (synth.POPULATIONS["lymphocyte"], synth.POPULATIONS["tumour"])
    cells, tiles, truth = [], [], []
    for s in range(2):
        path, gt, nuclei = synth_tiles(tmp_path / f"t{s}.zarr", pops, grid=3, seed=10 + s, slide_id=f"syn{s}")
        out = tmp_path / f"c{s}.zarr"
        assert cli(["segment", str(path), str(out), "--threads", "2"]) == 0
        from dirl import store

        lab = np.asarray(store.open_map(out, "labels")[:])
        t = store.read_nuclei(out, ["tile", "label"])
        pop = np.array([n.population for n in nuclei])
        rows = []
        for tile, label in zip(t["tile"], t["label"], strict=True):
            ids = gt[tile][lab[tile] == label]
            ids = ids[ids > 0]
            rows.append(pop[np.bincount(ids).argmax() - 1] if len(ids) else -1)
        cells.append(out)
        tiles.append(path)
        truth.append(np.array(rows))
    return cells, tiles, truth


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return _two_population_slides(tmp_path_factory.mktemp("pheno"))


def test_two_populations_are_separated(slides, tmp_path):
    cells, tiles, truth = slides
    out = tmp_path / "model.json"
    assert (
        cli(
            [
                "phenotype",
                *map(str, cells),
                "--tiles",
                *map(str, tiles),
                "--out",
                str(out),
                "--k",
                "2",
                "--gallery",
                str(tmp_path / "g.png"),
            ]
        )
        == 0
    )
    model = PhenotypeModel.load(out)
    assert model.k == 2 and model.centroids.shape == (2, len(phenotype.FEATURES))
    with pytest.raises(DirlError, match="use predict_tiles"):  # the table alone lacks what surrounds a nucleus
        model.predict(store.read_nuclei(cells[0]))
    pred = np.concatenate([model.predict(nuclei_around(t, c)) for t, c in zip(tiles, cells)])
    pop = np.concatenate(truth)
    ok = pop >= 0
    # class 0 is the smaller nuclei: lymphocytes; class 1 the tumour nuclei
    agree = (pred[ok] == pop[ok]).mean()
    assert agree > 0.85, agree
    d = json.loads(out.read_text())
    assert d["classes"][0]["mean"]["area_um2"] < d["classes"][1]["mean"]["area_um2"]
    assert d["classes"][0]["mean"]["h_od"] > d["classes"][1]["mean"]["h_od"]  # darker
    assert d["classes"][0]["mean"]["eccentricity"] < d["classes"][1]["mean"]["eccentricity"]  # rounder
    assert d["classes"][0]["description"].startswith("small") and d["prior_values"]["2"].startswith("class 0")
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] > 300


def test_k4_classes_are_pure(slides):
    cells, tiles, truth = slides
    model, tab, src, cls = phenotype.fit(cells, tiles, k=4, seed=0)
    pred = np.concatenate(
        [
            PhenotypeModel(
                4,
                model["features"],
                np.array(model["mean"]),
                np.array(model["std"]),
                np.array(model["centroids"]),
                model,
            ).predict(nuclei_around(t, c))
            for t, c in zip(tiles, cells)
        ]
    )
    pop = np.concatenate(truth)
    ok = pop >= 0
    # every class is mostly one population
    for c in range(4):
        sel = ok & (pred == c)
        if sel.sum() >= 10:
            share = np.bincount(pop[sel], minlength=2).max() / sel.sum()
            assert share > 0.8, (c, share)
    areas = [c["mean"]["area_um2"] for c in model["classes"]]
    assert areas == sorted(areas)


def test_deterministic_for_a_seed_and_bounded_sample(slides):
    cells, _, _ = slides
    a, *_ = phenotype.fit(cells, k=3, sample=150, seed=7)
    b, *_ = phenotype.fit(cells, k=3, sample=150, seed=7)
    c, *_ = phenotype.fit(cells, k=3, sample=150, seed=8)
    assert json.dumps(a) == json.dumps(b)
    assert a["sample"]["used"] == 150 and a["sample"]["total_nuclei"] > 150
    assert a["mean"] != c["mean"]  # another seed draws another sample
    # predict() on the fitted sample reproduces the fit's assignment
    model, tab, src, cls = phenotype.fit(cells, k=3, sample=150, seed=7)
    m = PhenotypeModel(
        3, model["features"], np.array(model["mean"]), np.array(model["std"]), np.array(model["centroids"]), model
    )
    assert (m.predict(tab) == cls).mean() > 0.99


def test_too_few_nuclei_is_a_clear_error(tmp_path):
    from helpers_segment import write_tiles

    empty = write_tiles(
        tmp_path / "e.zarr", np.full((1, 64, 64, 3), 240, np.uint8), np.zeros((1, 2), np.int64), mpp=0.5
    )
    assert cli(["segment", str(empty), str(tmp_path / "c.zarr")]) == 0
    with pytest.raises(DirlError, match="fewer than phenotypes.k"):
        phenotype.fit([tmp_path / "c.zarr"], k=4)
    assert cli(["phenotype", str(tmp_path / "c.zarr"), "--out", str(tmp_path / "m.json")]) == 1
    assert not (tmp_path / "m.json").exists()
