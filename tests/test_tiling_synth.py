"""Tiling of synthetic slides: other resolutions, formats and the awkward inputs users have."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dirl import store, synth
from dirl.cli import main as cli
from dirl.errors import SlideError
from dirl.slide import Slide
from dirl.tiling import RUN_TILES, TileSettings, plan, tile_slide

SMALL = TileSettings(tile_px=64)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slides")
    return {
        # 0.25 µm/px (a 40x scan) with a pyramid: level 1 is at 0.5 µm/px
        "svs_025": synth.write_slide(d / "s025.svs", 2048, 2048, mpp=0.25, fmt="svs", seed=1),
        "tiff_025": synth.write_slide(d / "t025.tiff", 2048, 2048, mpp=0.25, fmt="tiff", seed=2),
        "one_level": synth.write_slide(d / "one.svs", 1024, 1024, mpp=0.25, levels=1, seed=3),
        "nompp": synth.write_slide(d / "nompp.tiff", 512, 512, fmt="tiff", write_mpp=False, seed=4),
        "glass": synth.write_slide(d / "glass.svs", 1024, 1024, mpp=0.5, tissue="none", seed=5),
        "tiny": synth.write_slide(d / "tiny.svs", 300, 300, mpp=0.5, tissue="full", seed=6),
        "unicode": synth.write_slide(
            d / "dossier avec espaces é" / "lame n°1.svs", 1024, 1024, mpp=0.5, tissue="full", seed=7
        ),
    }


@pytest.mark.parametrize("key", ["svs_025", "tiff_025"])
def test_pyramid_level_is_used(slides: dict[str, Path], key: str, tmp_path: Path) -> None:
    """0.25 µm/px slide tiled at 0.5 reads level 1 (at 0.5) without resizing."""
    with Slide.open(slides[key]) as s:
        assert s.mpp == pytest.approx(0.25, rel=1e-3)
        assert len(s.level_downsamples) >= 2
        g = plan(s, SMALL)
        assert g.level == 1 and g.read_px == 64 and g.tile_px_level0 == 128
        n = tile_slide(s, tmp_path / "t.zarr", SMALL)
        t = store.open_tiles(tmp_path / "t.zarr")
        assert len(t) == n > 0
        x, y = t.coords[n // 2]
        np.testing.assert_array_equal(t.read(n // 2, n // 2 + 1)[0], s.read(x, y, 1, 64, 64))


def test_every_tile_equals_its_direct_read_in_band_order(slides: dict[str, Path], tmp_path: Path) -> None:
    """Tiles are stored in column bands RUN_TILES wide, top to bottom in each band, read as row runs
    of one band row: every tile still equals a read_region of its own coordinates."""
    settings = TileSettings(tile_px=32, min_tissue=0.0)
    with Slide.open(slides["unicode"]) as s:
        n = tile_slide(s, tmp_path / "t.zarr", settings)
        t = store.open_tiles(tmp_path / "t.zarr")
        assert n == len(t) == (1024 // 32) ** 2 == len(np.unique(t.coords, axis=0))
        images = t.read(0, n)
        for i, (x, y) in enumerate(t.coords):
            np.testing.assert_array_equal(images[i], s.read(x, y, 0, 32, 32))
    band = t.coords[:, 0] // (RUN_TILES * 32)
    assert (np.diff(band) >= 0).all() and band.max() == 1
    first = t.coords[band == 0]
    assert (first[:RUN_TILES, 1] == 0).all() and (np.diff(first[:RUN_TILES, 0]) == 32).all()
    assert (np.diff(first[:, 1]) >= 0).all()


def test_pixels_outside_the_scan_read_as_glass(slides: dict[str, Path]) -> None:
    """OpenSlide returns transparent pixels beyond the scanned area; they must come back white."""
    with Slide.open(slides["unicode"]) as s:
        edge = s.read(-16, -16, 0, 32, 32)
        assert (edge[:16] == 255).all() and (edge[:, :16] == 255).all()
        np.testing.assert_array_equal(edge[16:, 16:], s.read(0, 0, 0, 16, 16))


def test_single_level_slide_is_downsampled(slides: dict[str, Path], tmp_path: Path) -> None:
    """Only level 0 at 0.25 µm/px: tiles are read at 128 px and area-averaged to 64."""
    with Slide.open(slides["one_level"]) as s:
        assert len(s.level_downsamples) == 1
        n = tile_slide(s, tmp_path / "t.zarr", SMALL)
        t = store.open_tiles(tmp_path / "t.zarr")
        assert n > 0 and t.attrs["read_level"] == 0 and t.attrs["tile_px_level0"] == 128
        x, y = t.coords[0]
        full = s.read(x, y, 0, 128, 128).astype(np.float32)
        expected = full.reshape(64, 2, 64, 2, 3).mean((1, 3))
        assert np.abs(t.read(0, 1)[0] - expected).max() <= 1.0


def test_missing_resolution_names_the_fix(slides: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="`mpp` column"):
        Slide.open(slides["nompp"], slide_id="S9")
    with Slide.open(slides["nompp"], mpp=0.5) as s:  # the sample sheet's value rescues it
        assert s.mpp == 0.5 and s.mpp_source == "sample sheet"
    assert cli(["tile", str(slides["nompp"]), str(tmp_path / "x.zarr")]) == 1
    assert not (tmp_path / "x.zarr").exists()


def test_absurd_resolution(slides: dict[str, Path]) -> None:
    with pytest.raises(SlideError, match="outside"):
        Slide.open(slides["nompp"], mpp=250.0)


def test_no_tissue_gives_a_valid_empty_store(slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "glass.zarr"
    assert cli(["tile", str(slides["glass"]), str(out), "--tile-px", "64"]) == 0
    t = store.open_tiles(out)
    assert len(t) == 0 and t.images.shape == (0, 64, 64, 3) and t.coords.shape == (0, 2)


def test_slide_smaller_than_a_tile(slides: dict[str, Path], tmp_path: Path) -> None:
    with Slide.open(slides["tiny"]) as s:
        assert tile_slide(s, tmp_path / "t.zarr", TileSettings(tile_px=512)) == 0
    assert len(store.open_tiles(tmp_path / "t.zarr")) == 0


def test_non_ascii_paths(slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sortie é" / "lame n°1.zarr"
    assert cli(["tile", str(slides["unicode"]), str(out), "--tile-px", "128"]) == 0
    assert len(store.open_tiles(out)) == 64  # 1024 px of full tissue in 128 px tiles: 8 x 8


def test_overlap_and_jpeg_codec(slides: dict[str, Path], tmp_path: Path) -> None:
    with Slide.open(slides["unicode"]) as s:
        n0 = tile_slide(s, tmp_path / "a.zarr", TileSettings(tile_px=128))
        n1 = tile_slide(s, tmp_path / "b.zarr", TileSettings(tile_px=128, overlap=0.5, codec="jpeg"))
    assert n0 == 64 and n1 == 225  # 15 x 15 positions at half-tile steps
    a, b = store.open_tiles(tmp_path / "a.zarr"), store.open_tiles(tmp_path / "b.zarr")
    i = int(np.flatnonzero((b.coords == a.coords[5]).all(1))[0])
    err = np.abs(a.read(5, 6).astype(int) - b.read(i, i + 1).astype(int)).mean()
    assert 0 < err < 4  # JPEG q90: lossy, but close


def test_region_that_fails_to_decode_midway(tmp_path: Path) -> None:
    """A slide that opens but has one damaged tile: the job fails naming the region, leaving nothing."""
    import tifffile

    src = synth.write_slide(tmp_path / "ok.svs", 1024, 1024, mpp=0.5, tissue="full", seed=8)
    data = bytearray(src.read_bytes())
    page = tifffile.TiffFile(src).pages[0]
    i = len(page.dataoffsets) // 2  # a level-0 tile in the middle
    data[page.dataoffsets[i] : page.dataoffsets[i] + page.databytecounts[i]] = bytes(page.databytecounts[i])
    bad = tmp_path / "damaged.svs"
    bad.write_bytes(bytes(data))
    with Slide.open(bad) as s:  # opens: the damage is past the probe
        with pytest.raises(SlideError, match="damaged"):
            tile_slide(s, tmp_path / "out.zarr", TileSettings(tile_px=128))
    assert not (tmp_path / "out.zarr").exists()
    assert cli(["tile", str(bad), str(tmp_path / "cli.zarr"), "--tile-px", "128"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["damaged.svs", "ok.svs"]


def test_unsupported_compression(tmp_path: Path) -> None:
    import tifffile

    path = tmp_path / "webp.tiff"
    tifffile.imwrite(
        path,
        np.full((512, 512, 3), 200, np.uint8),
        tile=(256, 256),
        compression="webp",
        resolution=(20000, 20000),
        resolutionunit="CENTIMETER",
        photometric="rgb",
    )
    with pytest.raises(SlideError, match="compression OpenSlide cannot decode.*convert"):
        Slide.open(path)


def test_jpeg_store_reopens_in_another_process(slides: dict[str, Path], tmp_path: Path) -> None:
    """`tiling.codec: jpeg` (the TCGA template's): the store is written by `dirl tile` and read by the next
    stage's process. Every later stage used to fail with "Unknown codec: 'dirl.jpeg'"; a plain zarr reader
    of the environment opens it too (dirl registers the codec as a zarr entry point)."""
    import subprocess
    import sys

    out = tmp_path / "j.zarr"
    assert cli(["tile", str(slides["unicode"]), str(out), "--tile-px", "128", "--codec", "jpeg"]) == 0
    for code in (
        f"from dirl import store; print(store.open_tiles({str(out)!r}).read(0, 64).mean())",
        f"import zarr; print(zarr.open_group({str(out)!r}, mode='r')['images'][:64].mean())",
    ):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert 50 < float(proc.stdout) < 250
