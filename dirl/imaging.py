"""What several stages share about H&E images: the stain vectors and Otsu's threshold, defined once.

Stain vectors: Ruifrok & Johnston (2001), as QuPath's "H&E default" (scikit-image rounds them to two
decimals); optical density per RGB channel of one unit of stain.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEMATOXYLIN = (0.650, 0.704, 0.286)
EOSIN = (0.072, 0.990, 0.105)
DAB = (0.268, 0.570, 0.776)  # the third direction of a colour deconvolution (the residual for H&E)


def unit(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def otsu(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Otsu's threshold: the histogram split (bin centre) that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=value_range)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s = np.cumsum(hist * centres)
    m0 = s / np.maximum(w0, 1)
    m1 = (s[-1] - s) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])
