"""Masks as polygons QuPath takes: outlines traced along pixel edges, valid by construction.

A ring through boundary-pixel centres (cv2.findContours) covers ~0.8 of the mask's area (each boundary
pixel half outside) and can touch itself; QuPath 0.6+ rejects a whole file for one self-intersecting
polygon. `pixel_outline` walks the cracks between inside and outside pixels instead: the polygon's
area is the pixel count exactly, and a nucleus (its largest 4-connected part, holes filled, diagonal
pinches closed) is one simple ring. `valid_rings` checks rings with a geometry library (shapely) and
repairs the odd one, so what is written is checked, not hoped.
"""

from __future__ import annotations

import cv2
import numpy as np

# directed crack edges with the inside on the right, in (x, y) pixel-corner coordinates (pixel (r, c) spans
# [c, c+1] x [r, r+1]): top edge left to right, right edge downwards, bottom right to left, left upwards
_DIRS = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])


def simple_mask(mask: np.ndarray) -> np.ndarray:
    """The mask's largest 4-connected part with its holes filled and its diagonal pinches closed (a
    2 x 2 window holding only a diagonal pair gets one more pixel): a region whose boundary is one
    simple ring. OpenCV, ~15 µs for a nucleus (scipy's labelling and hole filling take ten times that)."""
    mask = np.asarray(mask)
    m = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)  # np.pad costs 10x this
    m[1:-1, 1:-1] = mask
    n, lab = cv2.connectedComponents(m, connectivity=4)
    if n > 2:
        m = (lab == int(np.argmax(np.bincount(lab.ravel())[1:])) + 1).astype(np.uint8)
    for _ in range(8):  # closing a pinch can make another (or a hole), rarely
        outside = m.copy()
        cv2.floodFill(outside, None, (0, 0), 2)  # the padding is outside: what it cannot reach is a hole
        m = (outside != 2).astype(np.uint8)
        a, b, c, d = m[:-1, :-1], m[:-1, 1:], m[1:, :-1], m[1:, 1:]
        main = (a & d) & ~(b | c) & 1  # [[1, 0], [0, 1]]
        anti = (b & c) & ~(a | d) & 1  # [[0, 1], [1, 0]]
        if not (main.any() or anti.any()):
            break
        m[:-1, 1:] |= main  # fill the top-right of a main-diagonal pair
        m[:-1, :-1] |= anti  # the top-left of an anti-diagonal pair
    return m[1:-1, 1:-1].view(bool)


def pixel_outline(mask: np.ndarray) -> np.ndarray:
    """(K, 2) x, y vertices, in pixel-corner coordinates, of the ring around `simple_mask(mask)`: its
    corners only (collinear crack points dropped), not closed, clockwise on screen."""
    inner = simple_mask(mask)
    if not inner.any():
        return np.zeros((0, 2))
    m = np.zeros((inner.shape[0] + 2, inner.shape[1] + 2), bool)
    m[1:-1, 1:-1] = inner
    h, w = m.shape
    stride = w + 1  # corners (x, y) numbered y * stride + x
    starts, ends, dirs = [], [], []
    inside_above_outside = (
        (m[1:-1, 1:-1] & ~m[:-2, 1:-1], 0, 0, 1, 0),  # top edges: (c, r) -> (c + 1, r)
        (m[1:-1, 1:-1] & ~m[1:-1, 2:], 1, 0, 1, 1),  # right edges: (c + 1, r) -> (c + 1, r + 1)
        (m[1:-1, 1:-1] & ~m[2:, 1:-1], 1, 1, 0, 1),  # bottom edges: (c + 1, r + 1) -> (c, r + 1)
        (m[1:-1, 1:-1] & ~m[1:-1, :-2], 0, 1, 0, 0),  # left edges: (c, r + 1) -> (c, r)
    )
    for d, (sel, sx, sy, ex, ey) in enumerate(inside_above_outside):
        ys, xs = np.nonzero(sel)
        starts.append((ys + sy) * stride + xs + sx)
        ends.append((ys + ey) * stride + xs + ex)
        dirs.append(np.full(len(xs), d))
    start_all, end_all, dir_all = np.concatenate(starts), np.concatenate(ends), np.concatenate(dirs)
    nxt = np.full((h + 1) * stride, -1, np.int64)
    nxt[start_all] = end_all
    direction = np.full((h + 1) * stride, -1, np.int64)
    direction[start_all] = dir_all
    nxt_l = nxt.tolist()
    first = int(start_all.min())  # the top-left corner: always a vertex
    chain = [first]
    k = nxt_l[first]
    while k != first:
        chain.append(k)
        k = nxt_l[k]
    chain = np.asarray(chain)
    d = direction[chain]
    corner = np.empty(len(d), bool)  # a vertex where the direction changes
    corner[0] = d[0] != d[-1]
    np.not_equal(d[1:], d[:-1], out=corner[1:])
    v = chain[corner]
    out = np.empty((len(v), 2))
    out[:, 0], out[:, 1] = v % stride, v // stride
    return out


def ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def valid_rings(rings: list[np.ndarray]) -> list[np.ndarray]:
    """Each ring as a valid simple polygon's exterior: kept when shapely says it is valid, else repaired
    (shapely.make_valid, its largest polygon's exterior)."""
    import shapely

    if not rings:
        return []
    lengths = [len(r) for r in rings]
    flat = np.concatenate([np.asarray(r, np.float64).reshape(-1, 2) for r in rings])
    polys = shapely.polygons(shapely.linearrings(flat, indices=np.repeat(np.arange(len(rings)), lengths)))
    ok = shapely.is_valid(polys)
    out = list(rings)
    for i in np.flatnonzero(~ok):
        fixed = shapely.make_valid(polys[i])
        parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type == "Polygon"]
        if parts:
            best = max(parts, key=lambda g: g.area)
            out[i] = np.asarray(best.exterior.coords)[:-1]
    return out


def tile_outlines(labels: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    """`pixel_outline` of every label in `ids` of one label map, traced together: the crack edges of all
    labels found in four array operations, each label's ring followed from its top-left corner. A label
    whose pixels do not make one simple ring (two parts, a hole, a diagonal pinch) is traced alone on its
    `simple_mask`. ~20 µs a nucleus instead of ~150."""
    lab = np.zeros((labels.shape[0] + 2, labels.shape[1] + 2), np.int64)
    lab[1:-1, 1:-1] = labels
    w = lab.shape[1] - 1  # corners (x, y) of the unpadded map numbered y * stride + x, padded coordinates
    stride = w + 1
    core = lab[1:-1, 1:-1]
    keys, ends, dirs, owners = [], [], [], []
    for d, (other, sx, sy, ex, ey) in enumerate(
        (
            (lab[:-2, 1:-1], 0, 0, 1, 0),  # top edges
            (lab[1:-1, 2:], 1, 0, 1, 1),  # right edges
            (lab[2:, 1:-1], 1, 1, 0, 1),  # bottom edges
            (lab[1:-1, :-2], 0, 1, 0, 0),  # left edges
        )
    ):
        ys, xs = np.nonzero((core > 0) & (core != other))
        keys.append((ys + sy) * stride + xs + sx)
        ends.append((ys + ey) * stride + xs + ex)
        dirs.append(np.full(len(xs), d))
        owners.append(core[ys, xs])
    corner, end, direction, owner = (np.concatenate(v) for v in (keys, ends, dirs, owners))
    # labels with a diagonal pinch: their corner would have two out-edges
    a, b, c, dd = lab[:-1, :-1], lab[:-1, 1:], lab[1:, :-1], lab[1:, 1:]
    pinched = set(
        np.unique(
            np.concatenate([a[(a == dd) & (a > 0) & (b != a) & (c != a)], b[(b == c) & (b > 0) & (a != b) & (dd != b)]])
        ).tolist()
    )
    n_corners = (lab.shape[0] + 1) * stride
    key = owner * n_corners + corner
    order = np.argsort(key, kind="stable")
    key_s, end_s = key[order], end[order]
    edge_count = dict(zip(*np.unique(owner, return_counts=True)))
    first_of = {}
    for o, k in zip(owner[order].tolist(), key_s.tolist()):
        first_of.setdefault(o, k % n_corners)  # the smallest corner of each label: its top-left vertex
    lookup = dict(zip(key_s.tolist(), end_s.tolist()))
    dir_of = dict(zip(key_s.tolist(), direction[order].tolist()))
    out = []
    for i in np.asarray(ids).tolist():
        if i in pinched or i not in first_of:
            out.append(_alone(labels, i))
            continue
        base = i * n_corners
        start = first_of[i]
        chain, ds = [start], [dir_of[base + start]]
        k = lookup[base + start]
        while k != start:
            chain.append(k)
            ds.append(dir_of[base + k])
            k = lookup[base + k]
        if len(chain) != edge_count[i]:  # another ring of this label: a second part or a hole
            out.append(_alone(labels, i))
            continue
        ring = [(v % stride, v // stride) for v, dv, dp in zip(chain, ds, [ds[-1], *ds[:-1]]) if dv != dp]
        out.append(np.asarray(ring, np.float64))
    return out


def _alone(labels: np.ndarray, i: int) -> np.ndarray:
    ys, xs = np.nonzero(labels == i)
    if not len(ys):
        return np.zeros((0, 2))
    y0, x0 = ys.min(), xs.min()
    ring = pixel_outline(labels[y0 : ys.max() + 1, x0 : xs.max() + 1] == i)
    return ring + (x0, y0)
