"""The tile stage on the real slide, on bad input, and the pieces it is made of."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from dirl import store
from dirl.errors import SlideError, StoreError
from dirl.imaging import otsu
from dirl.slide import Slide
from dirl.tiling import TileSettings, tile_slide
from dirl.tissue import fraction_in_boxes, ink_mask, tissue_mask


@pytest.fixture(scope="module")
def cmu_tiles(cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiles") / "cmu.zarr"
    with Slide.open(cmu_slide) as slide:
        n = tile_slide(slide, out, TileSettings(), threads=2, qc_png=out.with_suffix(".png"))
    assert n > 0
    return out


def test_resolution_from_metadata(cmu_slide: Path) -> None:
    with Slide.open(cmu_slide) as s:
        assert s.mpp == pytest.approx(0.499)
        assert s.mpp_source == "openslide.mpp"
        assert s.dimensions == (2220, 2967)


def test_real_slide_tiles_match_direct_reads(cmu_slide: Path, cmu_tiles: Path) -> None:
    import openslide

    t = store.open_tiles(cmu_tiles)
    n = len(t)
    # CMU-1-Small-Region is ~40 % tissue of 1.11 x 1.48 mm; 112 µm tiles: ~50 fully-tissue tiles
    assert 30 <= n <= 80
    assert t.images.shape == (n, 224, 224, 3) and t.images.dtype == np.uint8
    assert t.coords.dtype == np.int64 and t.coords.shape == (n, 2)
    assert t.attrs["read_level"] == 0 and t.attrs["tile_px_level0"] == 224  # 0.5/0.499 rounds to 224
    assert t.attrs["slide_mpp"] == pytest.approx(0.499)
    # inside the slide
    assert (t.coords >= 0).all()
    assert (t.coords[:, 0] + 224 <= 2220).all() and (t.coords[:, 1] + 224 <= 2967).all()
    # pixel content equals a direct read_region of the same place
    osr = openslide.OpenSlide(str(cmu_slide))
    for i in (0, n // 2, n - 1):
        x, y = t.coords[i]
        direct = np.asarray(osr.read_region((int(x), int(y)), 0, (224, 224)))[..., :3]
        np.testing.assert_array_equal(t.read(i, i + 1)[0], direct)
    # over tissue: stained, not glass
    imgs = t.read(0, n).astype(np.float32)
    sat = (imgs.max(-1) - imgs.min(-1)) / np.maximum(imgs.max(-1), 1)
    assert np.median(sat.reshape(n, -1).mean(1)) > 0.15
    assert (t.tissue >= 0.5).all()
    assert Path(str(cmu_tiles).replace(".zarr", ".png")).stat().st_size > 10_000


def test_tile_store_is_sharded(tmp_path: Path) -> None:
    n, T = 600, 32
    coords = np.arange(2 * n).reshape(n, 2)
    attrs = {k: 0 for k in store.TILE_ATTRS}
    with store.tile_store_writer(tmp_path / "s.zarr", coords=coords, tissue=np.ones(n), tile_px=T, attrs=attrs) as w:
        for a in range(0, n, w.shard):
            b = min(n, a + w.shard)
            w.write(a, np.full((b - a, T, T, 3), 7, np.uint8))
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert g["images"].shards == (store.SHARD_TILES, T, T, 3)
    shard_files = list((tmp_path / "s.zarr" / "images").rglob("c/*/0/0/0"))
    assert len(shard_files) == -(-n // store.SHARD_TILES)  # one file per shard, not per tile
    assert int(g["images"][599].mean()) == 7


def test_broken_slide_is_a_clear_error(broken_slide: Path, tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="not a slide OpenSlide can read"):
        Slide.open(broken_slide)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="file not found.*sample sheet"):
        Slide.open(tmp_path / "nope.svs", slide_id="S1")


def test_cli_failure_leaves_no_output(broken_slide: Path, tmp_path: Path) -> None:
    from dirl.cli import main

    out = tmp_path / "b.zarr"
    assert main(["tile", str(broken_slide), str(out)]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [".b.zarr.lock"]  # the writers' lock (dirl.atomic)


def test_atomic_path_interrupted(tmp_path: Path) -> None:
    final = tmp_path / "x.zarr"
    with pytest.raises(KeyboardInterrupt):
        with store.atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "zarr.json").write_text("{}")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == [".x.zarr.lock"]  # the writers' lock, nothing else
    with pytest.raises(StoreError, match="does not exist"):
        store.open_tiles(final)


def test_incomplete_store_is_rejected(tmp_path: Path) -> None:
    zarr.open_group(str(tmp_path / "half.zarr"), mode="w").create_array("images", shape=(1, 4, 4, 3), dtype="uint8")
    with pytest.raises(StoreError, match="incomplete"):
        store.open_tiles(tmp_path / "half.zarr")


def test_otsu_splits_two_modes() -> None:
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0.03, 0.01, 5000), rng.normal(0.4, 0.05, 5000)]).clip(0, 1)
    t = otsu(v)
    assert abs(int((v > t).sum()) - 5000) < 10  # the threshold falls between the modes


def test_tissue_mask_glass_tissue_pen_border() -> None:
    mpp = 2.0
    img = np.full((300, 300, 3), 240, np.uint8)  # glass
    img[100:200, 100:200] = (200, 120, 170)  # stained tissue 200 µm square
    img[:, :8] = 10  # dark scanner border
    img[20:40, 150:290] = (40, 60, 170)  # blue pen stroke
    img[250:253, 250:253] = (200, 120, 170)  # a 6 µm speck
    m = tissue_mask(img, mpp)
    assert m[110:190, 110:190].all()
    assert not m[:, :8].any() and not m[20:40, 150:290].any() and not m[250:253, 250:253].any()
    assert ink_mask(img, mpp)[30, 200] and not ink_mask(img, mpp)[150, 150]


def test_fraction_in_boxes() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:5] = True
    f = fraction_in_boxes(mask, np.array([[0, 0, 10, 10], [0, 0, 10, 5], [0, 5, 10, 10]], float))
    np.testing.assert_allclose(f, [0.5, 1.0, 0.0])


def test_allow_failed_slides_writes_a_marked_empty_store(broken_slide: Path, tmp_path: Path) -> None:
    from dirl.cli import main

    out = tmp_path / "b.zarr"
    assert main(["tile", str(broken_slide), str(out), "--on-error", "empty", "--qc", str(tmp_path / "b.png")]) == 0
    t = store.open_tiles(out)
    assert len(t) == 0 and "not a slide" in t.attrs["failed"]
    assert (tmp_path / "b.png").stat().st_size > 0


def test_directly_assembled_shards_read_back_through_zarr(tmp_path: Path) -> None:
    """write_encoded builds shard files itself; zarr must read every tile back exactly (full and
    partial shards, crc-checked index)."""
    n, T = 600, 16
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (n, T, T, 3), dtype=np.uint8)
    tiles[::7] = 200  # some very compressible
    attrs = {k: 0 for k in store.TILE_ATTRS}
    with store.tile_store_writer(
        tmp_path / "d.zarr", coords=np.zeros((n, 2)), tissue=np.ones(n), tile_px=T, attrs=attrs
    ) as w:
        assert w.direct
        for shard, a in enumerate(range(0, n, w.shard)):
            w.write_encoded(shard, [w.encode(t) for t in tiles[a : a + w.shard]])
    np.testing.assert_array_equal(store.open_tiles(tmp_path / "d.zarr").read(0, n), tiles)
