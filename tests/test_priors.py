"""`dirl priors`: per-pixel prior maps aligned with the tiles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_segment import REAL_SLIDE, nuclei_around, real_tiles, synth_tiles, write_tiles

from dirl import store
from dirl.cli import main as cli
from dirl.errors import StoreError
from dirl.segment.phenotype import PhenotypeModel
from dirl.segment.priors import PriorSettings, glass_mask, paint

CONTRACT = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "contract.py"


def test_glass_mask():
    glass = np.full((32, 32, 3), 240, np.uint8)
    glass[:, 16:] = (205, 205, 208)  # darker, still grey glass
    assert glass_mask(glass, 0.5).all()
    stroma = np.full((32, 32, 3), (235, 200, 225), np.uint8)  # pale pink stroma
    assert not glass_mask(stroma, 0.5).any()
    debris = np.full((32, 32, 3), 90, np.uint8)  # dark unsaturated: not glass
    assert not glass_mask(debris, 0.5).any()


def test_paint_classes_dilation_and_glass():
    rgb = np.full((40, 40, 3), 240, np.uint8)  # all glass
    rgb[:, 20:] = (200, 120, 170)  # right half tissue
    lab = np.zeros((40, 40), np.uint32)
    lab[10:14, 10:14] = 1  # a nucleus on glass (still painted)
    lab[10:14, 17:21] = 2  # a neighbour 3 px away
    lut = np.array([1, 2, 5], np.uint8)
    out = paint(rgb, lab, lut, 0.5, PriorSettings(dilate_um=0.0))
    assert out.dtype == np.uint8
    assert (out[lab == 1] == 2).all() and (out[lab == 2] == 5).all()
    assert (out[30:, :15] == 0).all() and (out[30:, 25:] == 1).all()
    grown = paint(rgb, lab, lut, 0.5, PriorSettings(dilate_um=1.0))  # 2 px
    assert (grown == 2).sum() > (out == 2).sum() and (grown[lab == 2] == 5).all()
    assert (grown[lab == 1] == 2).all()  # growth never overwrites a nucleus
    assert grown[12, 15] in (2, 5) and grown[12, 8] == 2 and grown[12, 7] == 0


def _stage_chain(tmp_path, tiles):
    cells = tmp_path / "cells" / "s.zarr"
    assert cli(["segment", str(tiles), str(cells), "--threads", "2"]) == 0
    model = tmp_path / "phenotypes" / "model.json"
    assert cli(["phenotype", str(cells), "--tiles", str(tiles), "--out", str(model), "--k", "3"]) == 0
    pri = tmp_path / "priors" / "s.zarr"
    assert (
        cli(
            [
                "priors",
                str(tiles),
                str(cells),
                str(model),
                str(pri),
                "--overlay",
                str(tmp_path / "overlay.png"),
                "--dilate-um",
                "1.0",
            ]
        )
        == 0
    )
    return cells, model, pri


def test_priors_end_to_end_synthetic(tmp_path):
    from dirl import synth

    (tmp_path / "tiles").mkdir()
    tiles, gt, _ = synth_tiles(
        tmp_path / "tiles" / "s.zarr",
        (synth.POPULATIONS["lymphocyte"], synth.POPULATIONS["tumour"]),
        grid=4,
        tile_px=128,
        tissue="blobs",
        seed=3,
    )
    cells, model_path, pri = _stage_chain(tmp_path, tiles)
    ts = store.open_tiles(tiles)
    p = np.asarray(store.open_map(pri, "priors", len(ts))[:])
    lab = np.asarray(store.open_map(cells, "labels", len(ts))[:])
    assert p.shape == (len(ts), 128, 128) and p.dtype == np.uint8
    assert p.max() <= 3 + 1
    # every nucleus pixel carries its class; classes come from the model
    model = PhenotypeModel.load(model_path)
    t = nuclei_around(tiles, cells)
    cls = model.predict(t) + 2
    for r in range(0, len(t["tile"]), max(1, len(t["tile"]) // 30)):
        m = lab[t["tile"][r]] == t["label"][r]
        assert (p[t["tile"][r]][m] == cls[r]).all()
    # glass is background, and the blobs' tissue is not
    images = ts.read(0, len(ts))
    white = images.min(-1) > 225
    assert (p[white & (lab == 0)] == 0).mean() > 0.9
    assert 0.02 < (p == 0).mean() < 0.98 and (p == 1).mean() > 0.05
    assert (tmp_path / "overlay.png").stat().st_size > 1000
    if CONTRACT.exists():
        r = subprocess.run([sys.executable, str(CONTRACT), str(tmp_path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    # a slide with no tiles (N = 0) still gets an (empty) aligned prior store
    empty = write_tiles(tmp_path / "e.zarr", np.zeros((0, 128, 128, 3), np.uint8), np.zeros((0, 2), np.int64), mpp=0.5)
    assert cli(["segment", str(empty), str(tmp_path / "ce.zarr")]) == 0
    assert (
        cli(
            [
                "priors",
                str(empty),
                str(tmp_path / "ce.zarr"),
                str(model_path),
                str(tmp_path / "pe.zarr"),
                "--overlay",
                str(tmp_path / "oe.png"),
            ]
        )
        == 0
    )
    assert store.open_map(tmp_path / "pe.zarr", "priors", 0).shape == (0, 128, 128)
    # a prior store whose tiles were re-cut is refused
    other = write_tiles(tmp_path / "o.zarr", images[:3], ts.coords[:3], mpp=0.5)
    assert cli(["priors", str(other), str(cells), str(model_path), str(tmp_path / "bad.zarr")]) == 1
    with pytest.raises(StoreError, match="rows but the tile store has"):
        store.open_map(cells, "labels", 3)


@pytest.mark.skipif(not REAL_SLIDE.exists(), reason="demo slide not available")
def test_priors_real_slide(tmp_path):
    (tmp_path / "tiles").mkdir()
    tiles = real_tiles(tmp_path / "tiles" / "s.zarr", tile_px=224, every=3, min_tissue=0.3)
    cells, model_path, pri = _stage_chain(tmp_path, tiles)
    p = np.asarray(store.open_map(pri, "priors")[:])
    frac = np.bincount(p.ravel(), minlength=5) / p.size
    # tiles with at least 30 % tissue: some glass, mostly tissue, nuclei a minority of pixels
    assert 0.01 < frac[0] < 0.7 and frac[1] > 0.2 and 0.03 < frac[2:].sum() < 0.5, frac
