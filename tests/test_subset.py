"""pretrain.tiles_per_slide: segmentation, priors, pretraining and the attention sample use one fixed
subset of each slide's tiles (seeded by the slide id), and say so; the other rows are left empty."""

from __future__ import annotations

import numpy as np
import pytest

from dirl import store, synth
from dirl.cli import main as cli
from dirl.errors import StoreError


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("subset")
    slide = synth.write_slide(d / "s.svs", 1280, 1024, mpp=0.5, tissue="full", seed=5)
    tiles = d / "tiles" / "s.zarr"
    assert cli(["tile", str(slide), str(tiles), "--tile-px", "64", "--min-tissue", "0", "--threads", "1"]) == 0
    cells = d / "cells" / "s.zarr"  # 320 tiles in two shards: the subset spans both
    assert cli(["segment", str(tiles), str(cells), "--threads", "1", "--tiles-per-slide", "40"]) == 0
    model = d / "model.json"
    assert cli(["phenotype", str(cells), "--tiles", str(tiles), "--out", str(model), "--k", "2"]) == 0
    priors = d / "priors" / "s.zarr"
    assert (
        cli(
            ["priors", str(tiles), str(cells), str(model), str(priors), "--overlay", str(d / "p.png"), "--threads", "1"]
        )
        == 0
    )
    return tiles, cells, priors


def test_one_subset_for_every_stage(cohort):
    tiles, cells, priors = cohort
    n = len(store.open_tiles(tiles))
    rows = store.tile_subset(n, 40, "s")
    assert n == 320 and len(rows) == 40 and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, store.tile_subset(n, 40, "s"))  # fixed: no seed involved
    assert not np.array_equal(rows, store.tile_subset(n, 40, "other"))
    assert store.map_attrs(cells, "cells")["rows"] == rows.tolist()
    assert store.map_attrs(priors, "priors")["rows"] == rows.tolist()
    labels = np.asarray(store.open_map(cells, "labels", n)[:])
    others = np.setdiff1d(np.arange(n), rows)
    assert labels[others].max() == 0 and labels[rows].max() > 0  # segmented there only
    assert set(np.unique(store.read_nuclei(cells, ["tile"])["tile"])) <= set(rows.tolist())
    pm = np.asarray(store.open_map(priors, "priors", n)[:])
    assert pm[others].max() == 0 and pm[rows].max() >= 2
    assert (pm[rows].reshape(len(rows), -1).max(1) >= 1).all()  # every subset row painted, in both shards
    assert rows.min() < 256 <= rows.max()


def test_pretraining_and_attention_use_the_subset(cohort):
    from dirl.analysis.attention import load_sample
    from dirl.ssl.data import CohortDataset, ViewConfig

    tiles, _, priors = cohort
    rows = store.tile_subset(320, 40, "s")
    ds = CohortDataset([tiles], [priors], None, 16, ViewConfig(global_size=32), seed=3, tiles_per_slide=40)
    assert np.array_equal(ds.rows[:, 1], rows)
    with pytest.raises(StoreError, match="holds priors for 40 of 320 tiles, not the 320"):
        CohortDataset([tiles], [priors], None, 16, ViewConfig(global_size=32))
    sample = load_sample([str(tiles)], [str(priors)], n_tiles=16, seed=0)
    assert {r for _, r in sample.ids} <= set(rows.tolist()) and len(sample.ids) == 16
