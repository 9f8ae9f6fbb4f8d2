"""The nuclei around a nucleus, for the trained classifier: cell types cluster (glands of epithelium, sheets
of lymphocytes, strands of fibroblasts), so a nucleus's class is read from its own class probabilities *and*
the mean probabilities of the nuclei within RADIUS_UM of it, by a class-balanced logistic regression fitted on
the validation's out-of-fold probabilities (dirl.segment.trained). Like the neighbouring ensemble predictor of
Sirinukunwattana et al. 2016, it costs next to nothing once the crops are classified.

Neighbours are looked for within the nucleus's own tile, when the model is fitted and when it is applied
alike. Offline on crc-typed-train (validated by image, 5 folds, the 24 µm CNN's out-of-fold probabilities,
labelled neighbours only): balanced accuracy 0.734 without; radius 10/15/20/30/45/60 µm: 0.733/0.739/0.745/
0.748/0.745/0.739. In the pipeline (every segmented neighbour, bench/classify_crc.json): 0.744 against 0.734
in the same run. Tried on the pipeline's out-of-fold probabilities of another run, none kept: the means
within 15 and 30 µm together 0.745 against 0.742 for 30 µm alone (even/odd images 0.759/0.728 against
0.757/0.726), the 31 nucleus features added 0.744, a gradient-boosted model in place of the logistic
regression 0.723. The logistic regression's features already describe the neighbourhood: there it lost
(0.635 -> 0.627), so only the CNN uses it.
"""

from __future__ import annotations

import numpy as np

RADIUS_UM = 30.0  # the best radius offline (above); a gland's or a lymphoid aggregate's scale
EPS = 1e-4  # floor of a probability before its log


def features(probs: np.ndarray, x_um: np.ndarray, y_um: np.ndarray, radius_um: float = RADIUS_UM) -> np.ndarray:
    """(n, 2k + 1) context features of one tile's n nuclei from their (n, k) class probabilities and centres
    (µm): log of the nucleus's own probabilities, log of the mean of its neighbours' (its own where it has
    none), log(1 + number of neighbours)."""
    from scipy.spatial import cKDTree

    probs = np.asarray(probs, np.float64)
    n = len(probs)
    pairs = cKDTree(np.c_[x_um, y_um]).query_pairs(radius_um, output_type="ndarray") if n > 1 else np.zeros((0, 2), int)
    i, j = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
    count = np.bincount(i, minlength=n).astype(np.float64)
    sums = np.zeros_like(probs)
    np.add.at(sums, i, probs[j])
    mean = np.where(count[:, None] > 0, sums / np.maximum(count, 1)[:, None], probs)
    return np.c_[np.log(probs + EPS), np.log(mean + EPS), np.log1p(count)]


def by_tile(probs: np.ndarray, tile: np.ndarray, x_um: np.ndarray, y_um: np.ndarray, radius_um: float) -> np.ndarray:
    """`features` of nuclei from many tiles (`tile`: any key of a nucleus's tile), neighbours within a tile."""
    out = np.zeros((len(probs), 2 * probs.shape[1] + 1))
    order = np.argsort(tile, kind="stable")
    bounds = np.flatnonzero(np.diff(tile[order])) + 1
    for sel in np.split(order, bounds) if len(order) else []:
        out[sel] = features(probs[sel], x_um[sel], y_um[sel], radius_um)
    return out
