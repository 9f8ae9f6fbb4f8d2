"""dirl.synth: synthetic H&E-like slides (determinism, seamlessness, statistics, file formats, CLI)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openslide
import pytest

from dirl import synth
from dirl.cli import main as cli

LYMPH, TUMOUR = synth.POPULATIONS["lymphocyte"], synth.POPULATIONS["tumour"]
MIXED = (LYMPH, TUMOUR)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("synth")
    return {
        "svs": synth.write_slide(d / "a.svs", 2048, 1536, mpp=0.5, fmt="svs", seed=1),
        "tiff": synth.write_slide(d / "b.tiff", 1600, 1100, mpp=0.25, fmt="tiff", seed=2, pen=True, levels=3),
        "svs_nompp": synth.write_slide(d / "c.svs", 512, 384, fmt="svs", write_mpp=False, seed=3),
        "tiff_nompp": synth.write_slide(d / "d.tif", 512, 384, fmt="tiff", write_mpp=False, seed=3),
        "glass": synth.write_slide(d / "e.svs", 1024, 1024, tissue="none", seed=4),
    }


def _read(s: openslide.OpenSlide, level: int = 0) -> np.ndarray:
    w, h = s.level_dimensions[level]
    return np.asarray(s.read_region((0, 0), level, (w, h)).convert("RGB"))


# --------------------------------------------------------------------------------------------------
# files
@pytest.mark.parametrize(
    "key, vendor, mpp, dims",
    [
        ("svs", "aperio", 0.5, ((2048, 1536), (1024, 768), (512, 384))),
        ("tiff", "generic-tiff", 0.25, ((1600, 1100), (800, 550), (400, 275))),
    ],
)
def test_slide_opens_with_levels_and_mpp(
    slides: dict[str, Path], key: str, vendor: str, mpp: float, dims: tuple
) -> None:
    with openslide.OpenSlide(slides[key]) as s:
        assert s.properties["openslide.vendor"] == vendor
        assert s.level_count == len(dims)
        assert s.level_dimensions == dims
        assert s.level_downsamples == pytest.approx([1, 2, 4], rel=1e-3)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(mpp)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(mpp)
        if key == "svs":
            assert s.properties["aperio.AppMag"] == "20"
            assert s.properties["tiff.ImageDescription"].startswith("Aperio")
            thumb = np.asarray(s.associated_images["thumbnail"].convert("RGB")).astype(np.float32)
            assert thumb.shape == (768, 1024, 3)
            assert np.abs(thumb - _read(s, 1)).mean() < 3
    # other readers (tifffile, tiffslide) see the same pyramid: the SVS thumbnail is page 1
    import tifffile

    with tifffile.TiffFile(slides[key]) as t:
        assert [lv.shape[:2][::-1] for lv in t.series[0].levels] == list(dims)


def test_pixels_are_the_render_and_levels_its_area_average(slides: dict[str, Path]) -> None:
    x, y, w, h = 512, 512, 1024, 512
    with openslide.OpenSlide(slides["svs"]) as s:
        l0 = np.asarray(s.read_region((x, y), 0, (w, h)).convert("RGB")).astype(np.float32)
        l1 = np.asarray(s.read_region((x, y), 1, (w // 2, h // 2)).convert("RGB")).astype(np.float32)
    ref, _, _ = synth.render(x, y, w, h, mpp=0.5, populations=MIXED, seed=1, slide_size=(2048, 1536))
    assert ref.std() > 20  # tissue there
    assert np.abs(l0 - ref).mean() < 3.0  # JPEG q90
    avg = ref.reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3))
    err = np.abs(l1 - avg).mean()
    assert err < 5.0 and err < 0.8 * np.abs(l1 - ref[::2, ::2]).mean()  # an average, not a subsample


@pytest.mark.parametrize("key", ["svs_nompp", "tiff_nompp"])
def test_no_mpp_records_no_resolution(slides: dict[str, Path], key: str) -> None:
    with openslide.OpenSlide(slides[key]) as s:
        p = s.properties
        assert "openslide.mpp-x" not in p and "openslide.mpp-y" not in p
        assert "aperio.MPP" not in p and "aperio.AppMag" not in p and "openslide.objective-power" not in p
        # tifffile always writes X/YResolution; without a unit (NONE) they carry no physical size
        assert p.get("tiff.ResolutionUnit", "none") == "none"


def test_glass_slide_is_white(slides: dict[str, Path]) -> None:
    with openslide.OpenSlide(slides["glass"]) as s:
        img = _read(s, 0).astype(np.float32)
    assert 235 <= img.mean() <= 245 and img.min() >= 220 and img.max() <= 255
    assert img.std() < 3


def test_blobs_cover_part_of_the_slide(slides: dict[str, Path]) -> None:
    with openslide.OpenSlide(slides["svs"]) as s:
        img = _read(s, 2).astype(np.int16)
    tissue = (img.max(axis=2) - img.min(axis=2)) > 25  # stained pixels are far from grey
    assert 0.25 <= tissue.mean() <= 0.55
    assert tissue[:, 0].mean() < 0.9 and tissue[:, -1].mean() < 0.9  # glass around it


def test_pen_stroke(slides: dict[str, Path], tmp_path: Path) -> None:
    def blue(img: np.ndarray) -> float:
        r, g, b = (img[..., i].astype(np.int16) for i in range(3))
        return float(((b - r > 60) & (b - g > 40)).mean())

    with openslide.OpenSlide(slides["tiff"]) as s:
        with_pen = blue(_read(s, 1))
    plain = synth.write_slide(tmp_path / "nopen.tiff", 1600, 1100, mpp=0.25, fmt="tiff", seed=2, levels=2)
    with openslide.OpenSlide(plain) as s:
        without = blue(_read(s, 1))
    assert with_pen > 0.01 and without < 0.001


def test_levels_argument_and_odd_sizes(tmp_path: Path) -> None:
    assert synth._level_dims(2048, 1536, None) == [(2048, 1536), (1024, 768), (512, 384)]
    assert synth._level_dims(999, 500, None) == [(999, 500)]
    assert synth._level_dims(1001, 333, 3) == [(1001, 333), (501, 167), (251, 84)]
    p = synth.write_slide(tmp_path / "odd.svs", 1001, 333, levels=3, tile=128, tissue="full")
    with openslide.OpenSlide(p) as s:
        assert s.level_dimensions == ((1001, 333), (501, 167), (251, 84))
        assert s.properties["openslide.level[0].tile-width"] == "128"
        edge = _read(s, 1)[:, -1].astype(np.float32)  # the odd last column is real content
        assert 60 < edge.mean() < 250
    assert [q.name for q in tmp_path.iterdir() if q.suffix != ".lock"] == ["odd.svs"]  # no scratch or temporary


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fmt"):
        synth.write_slide(tmp_path / "x.svs", 64, 64, fmt="png")
    with pytest.raises(ValueError, match="tissue"):
        synth.render(0, 0, 8, 8, mpp=0.5, populations=MIXED, tissue="some")
    with pytest.raises(ValueError, match="mpp"):
        synth.render(0, 0, 8, 8, mpp=0, populations=MIXED)
    with pytest.raises(ValueError, match="tile"):
        synth.write_slide(tmp_path / "x.svs", 64, 64, tile=100)
    assert not [q for q in tmp_path.iterdir() if q.suffix != ".lock"]


# --------------------------------------------------------------------------------------------------
# render
KW = dict(mpp=0.5, populations=MIXED, seed=7, tissue="blobs", slide_size=(2048, 2048))


def _assemble(x0: int, y0: int, xs: list[int], ys: list[int], kw: dict, ids: dict) -> tuple[np.ndarray, np.ndarray]:
    """Render the region cut at xs/ys and paste it together, labels mapped to `ids` (nucleus -> id)."""
    w, h = xs[-1], ys[-1]
    rgb, lab = np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.int64)
    for ya, yb in zip(ys[:-1], ys[1:]):
        for xa, xb in zip(xs[:-1], xs[1:]):
            r, labels, nuc = synth.render(x0 + xa, y0 + ya, xb - xa, yb - ya, **kw)
            rgb[ya:yb, xa:xb] = r
            lab[ya:yb, xa:xb] = np.array([0] + [ids.setdefault(n, len(ids) + 1) for n in nuc])[labels]
    return rgb, lab


def test_render_is_deterministic_and_seeded() -> None:
    a, la, na = synth.render(900, 800, 300, 200, **KW)
    b, lb, nb = synth.render(900, 800, 300, 200, **KW)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and na == nb
    assert a.dtype == np.uint8 and a.shape == (200, 300, 3)
    assert la.dtype == np.int32 and la.shape == (200, 300)
    c, _, nc = synth.render(900, 800, 300, 200, **{**KW, "seed": 8})
    assert not np.array_equal(a, c) and nc != na


@pytest.mark.parametrize(
    "kw, x0, y0",
    [
        (KW, 700, 650),  # crosses a tissue border of this slide
        (dict(mpp=0.25, populations=tuple(synth.POPULATIONS.values()), seed=3, tissue="full"), -40, 1021),
    ],
    ids=["blobs", "full-0.25"],
)
def test_render_is_seamless(kw: dict, x0: int, y0: int) -> None:
    """A region rendered whole equals the same region assembled from pieces, pixels and labels."""
    rgb, lab, nuc = synth.render(x0, y0, 613, 517, **kw)
    assert len(nuc) > 50 and (lab > 0).mean() > 0.02 and (lab == 0).mean() > 0.3
    assert sorted(np.unique(lab))[-1] == len(nuc)
    ids = {n: i + 1 for i, n in enumerate(nuc)}
    prgb, plab = _assemble(x0, y0, [0, 200, 201, 613], [0, 1, 333, 517], kw, ids)
    assert np.array_equal(prgb, rgb)
    assert np.array_equal(plab, lab)
    assert len(ids) == len(nuc)  # no nucleus the whole render did not list


def test_large_render_in_strips_is_seamless(monkeypatch: pytest.MonkeyPatch) -> None:
    kw = {**KW, "tissue": "full"}
    rgb, lab, nuc = synth.render(100, 200, 300, 250, **kw)
    monkeypatch.setattr(synth, "MAX_REGION_PX", 300 * 37)  # strips of 37 rows
    srgb, slab, snuc = synth.render(100, 200, 300, 250, **kw)
    assert np.array_equal(srgb, rgb) and np.array_equal(slab, lab) and snuc == nuc


def test_nucleus_list_matches_labels() -> None:
    _, lab, nuc = synth.render(0, 0, 400, 400, **{**KW, "tissue": "full"})
    for i in np.unique(lab)[1:][::7]:
        n = nuc[i - 1]
        ys, xs = np.nonzero(lab == i)
        # every pixel of a nucleus lies in its ellipse
        dx, dy = xs + 0.5 - n.x, ys + 0.5 - n.y
        c, s = math.cos(n.theta), math.sin(n.theta)
        rho2 = ((dx * c + dy * s) / n.a) ** 2 + ((dy * c - dx * s) / n.b) ** 2
        assert rho2.max() <= 1 + 1e-6


def test_nucleus_count_matches_density() -> None:
    w = h = 1536  # 0.59 mm² at 0.5 µm/px
    _, _, nuc = synth.render(4096, 4096, w, h, mpp=0.5, populations=MIXED, seed=11, tissue="full")
    area_mm2 = w * h * 0.5**2 / 1e6
    for k, pop in enumerate(MIXED):
        n = sum(1 for q in nuc if q.population == k and 4096 <= q.x < 4096 + w and 4096 <= q.y < 4096 + h)
        lam = pop.density_per_mm2 * area_mm2
        assert abs(n - lam) < 4 * math.sqrt(lam), (pop.name, n, lam)


@pytest.mark.parametrize("pop", [LYMPH, TUMOUR], ids=lambda p: p.name)
def test_population_sizes_from_labels(pop: synth.Population) -> None:
    mpp = 0.5
    _, lab, nuc = synth.render(0, 0, 768, 768, mpp=mpp, populations=(pop,), seed=5, tissue="full")
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    areas = np.bincount(lab.ravel())[1:]
    keep = np.setdiff1d(np.flatnonzero(areas) + 1, border)
    assert len(keep) > 40
    expected = math.pi * pop.radius_um**2 / mpp**2
    assert areas[keep - 1].mean() == pytest.approx(expected, rel=0.25)
    # the semi-axes follow the population's elongation
    ratio = np.median([nuc[i - 1].a / nuc[i - 1].b for i in keep])
    assert ratio == pytest.approx(pop.elongation, rel=0.15)


def test_lymphocytes_are_smaller_and_darker_than_tumour_nuclei() -> None:
    rgb, lab, nuc = synth.render(0, 0, 768, 768, mpp=0.5, populations=MIXED, seed=6, tissue="full")
    pop = np.array([0] + [n.population for n in nuc])[lab]
    grey = rgb.astype(np.float32).mean(axis=2)
    lym, tum = (lab > 0) & (pop == 0), (lab > 0) & (pop == 1)
    assert grey[lym].mean() < grey[tum].mean() - 20 < grey[lab == 0].mean() - 40
    # H&E colours: stroma pink (red and blue over green), nuclei blue-purple (blue highest)
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    stroma = lab == 0
    assert r[stroma].mean() > g[stroma].mean() + 30 and b[stroma].mean() > g[stroma].mean() + 20
    assert b[lym].mean() > r[lym].mean() and b[lym].mean() > g[lym].mean()


def test_no_tissue_is_glass_only() -> None:
    rgb, lab, nuc = synth.render(0, 0, 256, 256, mpp=0.5, populations=MIXED, tissue="none")
    assert not nuc and not lab.any()
    assert 235 <= rgb.mean() <= 245 and rgb.min() >= 220
    assert 0.5 < rgb.astype(np.float32).std() < 3  # slight sensor noise


def test_no_populations_is_stroma_only() -> None:
    rgb, lab, nuc = synth.render(0, 0, 128, 128, mpp=0.5, populations=(), tissue="full")
    assert not nuc and not lab.any() and rgb.mean() < 225


# --------------------------------------------------------------------------------------------------
# CLI
def test_cli_writes_a_slide(tmp_path: Path) -> None:
    out = tmp_path / "cli.tif"
    assert (
        cli(
            [
                "synth",
                str(out),
                "--width",
                "600",
                "--height",
                "400",
                "--mpp",
                "0.25",
                "--population",
                "lymphocyte",
                "--population",
                "tumour",
                "--seed",
                "3",
                "--tissue",
                "full",
                "--pen",
            ]
        )
        == 0
    )
    with openslide.OpenSlide(out) as s:  # the format follows the suffix
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.dimensions == (600, 400)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    out2 = tmp_path / "nompp.svs"
    assert (
        cli(
            [
                "synth",
                str(out2),
                "--width",
                "300",
                "--height",
                "300",
                "--no-mpp",
                "--population",
                "mixed",
                "--tissue",
                "none",
            ]
        )
        == 0
    )
    with openslide.OpenSlide(out2) as s:
        assert s.properties["openslide.vendor"] == "aperio" and "openslide.mpp-x" not in s.properties
    assert cli(["synth", str(tmp_path / "bad.svs"), "--width", "0"]) == 1
    assert not (tmp_path / "bad.svs").exists()


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = synth._render_model

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(synth, "_render_model", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        synth.write_slide(tmp_path / "x.svs", 1024, 1024, tile=128)
    assert not [q for q in tmp_path.iterdir() if q.suffix != ".lock"]  # but the writers' lock
