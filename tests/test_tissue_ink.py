"""Marker ink over real tissue: strokes of measured ink colours painted onto CMU-1-Small-Region the way
ink behaves (its optical density adds to the tissue's), then left out of the tissue mask, while
unpainted tissue, haematoxylin-dark tissue included, is kept."""

from __future__ import annotations

import numpy as np
import pytest

from dirl.slide import Slide
from dirl.tissue import TissueSettings, ink_mask, tissue_mask

# optical density (R, G, B) of ink over glass, measured on TCGA pen marks (histolab's test images
# tcga-red-pen.png, tcga-green-pen.png, wsi-blue-pen.png: median of the ink pixels where glass lies
# under the ink); black: a neutral density (a black marker absorbs evenly), 1.5 = 22 % transmitted
INKS = {"red": (0.25, 2.6, 2.45), "green": (1.1, 0.45, 0.49), "blue": (1.0, 0.58, 0.18), "black": (1.5, 1.5, 1.5)}
MPP = 2.0  # the tissue detector's default thumbnail resolution


@pytest.fixture(scope="module")
def thumb(cmu_slide) -> np.ndarray:
    with Slide.open(cmu_slide) as s:
        img, mpp = s.thumbnail(MPP)
    assert abs(mpp - MPP) < 0.2
    return img


def paint(img: np.ndarray, od: tuple[float, float, float], stroke: np.ndarray) -> np.ndarray:
    """Beer-Lambert: the ink's optical density adds to the tissue's where the stroke lies."""
    tissue_od = -np.log(np.maximum(img, 1) / 255.0)
    out = np.exp(-(tissue_od + stroke[..., None] * np.asarray(od))) * 255
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def stroke_mask(shape: tuple[int, int]) -> np.ndarray:
    """A 1 mm wide diagonal marker stroke (500 px at 2 µm/px would be wider than the slide: 60 µm
    here, still 4x the ink filter's opening) across the whole thumbnail."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    d = np.abs((yy - h * 0.2) - (xx - w * 0.1) * (h / w))
    return d < 15


@pytest.mark.parametrize("ink", sorted(INKS))
def test_ink_over_tissue_is_left_out(thumb, ink):
    stroke = stroke_mask(thumb.shape[:2])
    clean = tissue_mask(thumb, MPP)
    painted = paint(thumb, INKS[ink], stroke)
    detected = ink_mask(painted, MPP)
    over_tissue = stroke & clean
    assert over_tissue.sum() > 500  # the stroke crosses real tissue
    assert detected[stroke & ~clean].mean() > 0.95, ink  # over glass
    # over tissue: blue ink on eosin reads close to haematoxylin, the hardest case (measured 0.85)
    assert detected[over_tissue].mean() > (0.8 if ink == "blue" else 0.95), ink
    masked = tissue_mask(painted, MPP)
    assert masked[over_tissue].mean() < (0.2 if ink == "blue" else 0.05), ink
    away = clean & ~np.pad(stroke, 0)  # tissue away from the stroke is kept
    far = away & ~_dilate(stroke, 20)
    assert masked[far].mean() > 0.99


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    import cv2

    return cv2.dilate(m.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)).astype(bool)


def test_no_ink_on_clean_or_haematoxylin_dark_tissue(thumb):
    from dirl.tissue import _hsv

    clean = tissue_mask(thumb, MPP, TissueSettings(pen=False))
    found = ink_mask(thumb, MPP)
    # CMU-1 carries no marker, only a little teal tissue-marking dye on its right margin
    assert found.sum() < 0.01 * clean.sum()
    hue = _hsv(thumb)[0]
    assert np.median(hue[found]) < 245 and found[:, : thumb.shape[1] // 2].sum() == 0
    # the same tissue with twice the haematoxylin (Ruifrok & Johnston vector): dark nuclei, dense
    # lymphocyte aggregates
    h = np.array([0.65, 0.70, 0.29])
    h /= np.linalg.norm(h)
    od = -np.log(np.maximum(thumb, 1) / 255.0)
    amount = np.clip(od @ h, 0, None)
    dark = np.clip(np.round(np.exp(-(od + amount[..., None] * h)) * 255), 0, 255).astype(np.uint8)
    # the dye's patches grow; one small false patch appears where the doubled stain turns nearly black
    assert (ink_mask(dark, MPP) & ~found).sum() < 0.005 * clean.sum()  # measured 0.35 %
