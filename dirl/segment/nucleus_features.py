"""What the nucleus classifier (`phenotypes.source: trained`) sees of each nucleus: its table row's shape and
stain, and what a pathologist reads around it — the stain of the rings 3 and 8 µm outside it (cytoplasm,
stroma), the spread of its chromatin (hematoxylin percentiles, edge strength), and its neighbourhood (how
many nuclei within 15 and 30 µm, how far the nearest ones, how large its neighbours). All in µm, so the
same at any resolution; one tile at a time, vectorised over its nuclei.

On the real colorectal nuclei of ../shared/data/crc-typed-train (four expert types, validated by image):
logistic regression on the six k-means features reaches balanced accuracy 0.50, on these 31 0.64.
"""

from __future__ import annotations

import numpy as np

TABLE = (
    "area_um2",
    "perimeter_um",
    "major_um",
    "minor_um",
    "eccentricity",
    "solidity",
    "circularity",
    "h_od",
    "e_od",
    "h_od_std",
    "h_od_ring",
)
RINGS_UM = (3.0, 8.0)
NEIGHBOURS_UM = (15.0, 30.0)
CONTEXT = (
    *(f"ring{r:g}_{c}" for r in RINGS_UM for c in ("h", "e", "r", "g", "b")),
    "h_p10",
    "h_p50",
    "h_p90",
    "e_std",
    "h_edge",
    *(f"neighbours{r:g}" for r in NEIGHBOURS_UM),
    "nearest_um",
    "third_nearest_um",
    "neighbour_area_um2",
)
NAMES = TABLE + CONTEXT


def context(image: np.ndarray, labels: np.ndarray, mpp: float, table: dict[str, np.ndarray]) -> np.ndarray:
    """(n, len(CONTEXT)) features of the labels 1..n of one tile (`table`: that tile's rows, label i at
    row i - 1, as `dirl.segment.features.tile_features` returns them)."""
    import cv2
    from scipy import ndimage
    from scipy.spatial import cKDTree

    from dirl.segment.features import stain_od

    lab = np.asarray(labels, np.int32)
    n = int(lab.max()) if lab.size else 0
    if n == 0:
        return np.zeros((0, len(CONTEXT)), np.float32)
    h, e = stain_od(image)
    channels = (
        h,
        e,
        image[..., 0].astype(np.float32),
        image[..., 1].astype(np.float32),
        image[..., 2].astype(np.float32),
    )
    cols = []
    # rings: every pixel outside the nuclei belongs to its nearest nucleus, up to r µm away (one distance
    # transform for both radii; a dilation per radius costs ten times more at 8 µm)
    outside = (lab == 0).astype(np.uint8)
    dist, nearest = cv2.distanceTransformWithLabels(outside, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    inside = lab > 0
    owner_of = np.zeros(int(nearest.max()) + 1, np.int64)
    owner_of[nearest[inside]] = lab[inside]
    owner = owner_of[nearest]
    for r_um in RINGS_UM:
        ring = (dist > 0) & (dist <= r_um / mpp)
        rid = owner[ring]
        cnt = np.maximum(np.bincount(rid, minlength=n + 1)[1:], 1)
        cols += [np.bincount(rid, weights=c[ring], minlength=n + 1)[1:] / cnt for c in channels]
    fg = lab > 0
    ids, hv, ev = lab[fg], h[fg].astype(np.float64), e[fg].astype(np.float64)
    order = np.lexsort((hv, ids))  # each nucleus' pixels by hematoxylin: percentiles by position
    ids_s, hv_s = ids[order], hv[order]
    start = np.searchsorted(ids_s, np.arange(1, n + 1))
    size = np.bincount(ids, minlength=n + 1)[1:]
    for q in (0.1, 0.5, 0.9):
        at = start + np.minimum((q * np.maximum(size - 1, 0)).round().astype(np.int64), np.maximum(size - 1, 0))
        cols.append(np.where(size > 0, hv_s[np.minimum(at, len(hv_s) - 1)], 0.0))
    safe = np.maximum(size, 1)
    e_mean = np.bincount(ids, weights=ev, minlength=n + 1)[1:] / safe
    cols.append(np.sqrt(np.maximum(np.bincount(ids, weights=ev * ev, minlength=n + 1)[1:] / safe - e_mean**2, 0)))
    hs = ndimage.gaussian_filter(h, max(0.5, 0.5 / mpp))
    gy, gx = np.gradient(hs)
    cols.append(np.bincount(ids, weights=np.hypot(gx, gy)[fg], minlength=n + 1)[1:] / safe)
    xy = np.stack([table["cx"], table["cy"]], 1).astype(np.float64) * mpp  # µm
    tree = cKDTree(xy)
    area = np.asarray(table["area_um2"], np.float64)
    m = len(xy)
    for r_um in NEIGHBOURS_UM:  # pairs closer than r, both ways: counts (and, at the last radius, areas)
        pairs = tree.query_pairs(r_um, output_type="ndarray")
        ends = np.concatenate([pairs[:, 0], pairs[:, 1]]) if len(pairs) else np.zeros(0, np.int64)
        others = np.concatenate([pairs[:, 1], pairs[:, 0]]) if len(pairs) else np.zeros(0, np.int64)
        count = np.bincount(ends, minlength=m).astype(np.float64)
        cols.append(count)
    d, _ = tree.query(xy, k=4)
    d = np.where(np.isfinite(d), d, 50.0)  # fewer than three neighbours in the tile: far
    cols += [d[:, 1], d[:, 3]]
    near_area = np.bincount(ends, weights=area[others], minlength=m)
    cols.append(np.where(count > 0, near_area / np.maximum(count, 1), area))
    return np.stack(cols, 1).astype(np.float32)


def matrix(image: np.ndarray, labels: np.ndarray, mpp: float, table: dict[str, np.ndarray]) -> np.ndarray:
    """(n, len(NAMES)): the table's columns, then `context`."""
    base = np.stack([np.asarray(table[c], np.float64) for c in TABLE], 1).astype(np.float32)
    return np.concatenate([base, context(image, labels, mpp, table)], 1)


def relabelled(lab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The label map with label ids[i] renumbered i + 1 (and ids not listed cleared)."""
    lut = np.zeros(int(max(lab.max(), ids.max(initial=0))) + 1, np.int32)
    lut[np.asarray(ids, np.int64)] = np.arange(1, len(ids) + 1)
    return lut[lab]


def of_rows(tiles, cells, rows: np.ndarray) -> np.ndarray:
    """`matrix` of the cells table's `rows` (a TileStore, a cells store), computed tile by tile."""
    from dirl import store

    tab = store.read_nuclei(cells)
    labels = store.open_map(cells, "labels", len(tiles))
    out = np.zeros((len(rows), len(NAMES)), np.float32)
    by_tile: dict[int, list[int]] = {}
    for j, r in enumerate(np.asarray(rows).tolist()):
        by_tile.setdefault(int(tab["tile"][r]), []).append(j)
    for t, js in by_tile.items():
        sel = np.flatnonzero(tab["tile"] == t)
        part = {k: v[sel] for k, v in tab.items()}
        order = np.argsort(part["label"])
        part = {k: v[order] for k, v in part.items()}
        lab = np.asarray(labels[t])
        f = matrix(tiles.tile(t), relabelled(lab, part["label"]), tiles.mpp, part)
        pos = {int(lab_id): i for i, lab_id in enumerate(part["label"])}
        for j in js:
            out[j] = f[pos[int(tab["label"][rows[j]])]]
    return out
