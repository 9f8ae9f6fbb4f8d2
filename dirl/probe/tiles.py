"""`dirl probe-tiles`: a probe dataset's labelled images as a tile store, cut exactly as slide tiles are.

From a manifest or ImageFolder (`--manifest`, images at `--image-mpp`): each image is read at its own
resolution in squares of `tile_px * tiling.mpp / image_mpp` pixels, a grid of as many whole squares as fit,
centred, every square resized to `tile_px` as `dirl tile` resizes (dirl.tiling.resize_tile): several tiles
per image, each with the image's label, group and split; no tissue filter (the labels say what a tile
is, glass included). From classified regions (`--regions SLIDE=GEOJSON` with the slide's `--tiles`): the
slide's own tiles that a class covers by at least `region_cover`, copied; a slide is a group.

Where the dataset gives no splits, groups are split here (seeded, stratified by each group's majority
label: `dirl.probe.protocols.make_splits`) and the assignment is written to `--splits` (splits.json).
Output: `probe/{dataset}/tiles.zarr`, a tile store with `label`, `group`, `split` and `image` per tile
(dirl.store.ProbeStore), which `dirl extract` reads like any tile store.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dirl.errors import ConfigError
from dirl.settings import Settings, bounded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSettings(Settings):
    """The `probe` section's settings (its `datasets` and `regions` are the workflow's: which data)."""

    region_cover: float = bounded(0.5, gt=0, le=1)  # a tile takes the region class covering this share of it
    k: int = bounded(20, ge=1)  # neighbours of the k-NN protocol
    bootstrap: int = bounded(1000, ge=10)  # group resamples of the test split for the intervals
    val_fraction: float = bounded(0.2, ge=0, lt=1)  # share of each label's groups in the made validation split
    test_fraction: float = bounded(0.3, gt=0, lt=1)  # ... and in the made test split
    max_tiles_per_image: int = bounded(0, ge=0)  # at most this many tiles per image (0: every whole tile)
    seed: int = 0  # of the made splits, the bootstrap and the per-image tile choice


def cut_image(rgb: np.ndarray, image_mpp: float, mpp: float, tile_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiles (n, T, T, 3) of an image and their top-left (x, y) in its pixels: a centred grid of squares of
    the side that `tile_px` at `mpp` covers at `image_mpp`, each resized as slide tiles are."""
    from dirl.tiling import resize_tile

    side = max(1, round(tile_px * mpp / image_mpp))
    h, w = rgb.shape[:2]
    nx, ny = w // side, h // side
    if not nx or not ny:
        return np.zeros((0, tile_px, tile_px, 3), np.uint8), np.zeros((0, 2), np.int64)
    ox, oy = (w - nx * side) // 2, (h - ny * side) // 2
    xy = [(ox + i * side, oy + j * side) for j in range(ny) for i in range(nx)]
    tiles = [resize_tile(rgb[y : y + side, x : x + side], tile_px) for x, y in xy]
    return np.stack(tiles), np.asarray(xy, np.int64)


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ConfigError(f"probe image {path} cannot be read ({e})") from e


def from_images(items, image_mpp: float, mpp: float, tile_px: int, cap: int, seed: int):
    """(tiles, coords, item index per tile) of every image of a dataset."""
    from tqdm import tqdm

    tiles, coords, owner = [], [], []
    rng = np.random.default_rng(seed)
    for i, it in enumerate(tqdm(items, unit="image", desc="probe images", disable=None, mininterval=2)):
        t, xy = cut_image(read_rgb(it.path), image_mpp, mpp, tile_px)
        if not len(t):
            side = round(tile_px * mpp / image_mpp)
            raise ConfigError(
                f"probe image {it.path} is smaller than one tile: {tile_px} px at {mpp:g} µm/px is {side} px at its "
                f"{image_mpp:g} µm/px (probe.datasets.<name>.mpp, tiling.mpp and tiling.tile_px)"
            )
        if cap and len(t) > cap:
            keep = np.sort(rng.choice(len(t), cap, replace=False))
            t, xy = t[keep], xy[keep]
        tiles.append(t)
        coords.append(xy)
        owner.append(np.full(len(t), i))
    return np.concatenate(tiles), np.concatenate(coords), np.concatenate(owner)


def from_regions(pairs: list[tuple[str, str]], tile_stores: list[str], cover: float):
    """(tiles, level-0 coords, slide index per tile, label per tile) of the slides' region-labelled tiles."""
    from dirl import store
    from dirl.probe.data import label_tiles, read_regions

    by_id = {}
    for t in tile_stores:
        ts = store.open_tiles(t)
        by_id[ts.slide_id] = ts
    tiles, coords, owner, labels = [], [], [], []
    for i, (slide, geojson) in enumerate(pairs):
        ts = by_id.get(slide)
        if ts is None:
            raise ConfigError(f"--regions {slide}={geojson}: no tile store of slide {slide!r} among --tiles")
        if ts.failed or not len(ts):
            log.warning("slide %s has no tiles (%s): its regions label nothing", slide, ts.failed or "empty")
            continue
        a = ts.attrs
        regions = read_regions(geojson, a.get("level0_width"), a.get("level0_height"))
        lab = label_tiles(regions, ts.coords, float(a["tile_px_level0"]), cover)
        rows = np.flatnonzero([x is not None for x in lab])
        log.info("slide %s: %d of %d tiles labelled by %d regions", slide, len(rows), len(ts), len(regions))
        if len(rows):
            tiles.append(ts.take(rows))
            coords.append(ts.coords[rows])
            owner.append(np.full(len(rows), i))
            labels += [lab[r] for r in rows]
    if not labels:
        raise ConfigError(f"no tile of {[s for s, _ in pairs]} is covered by a region (probe.region_cover = {cover})")
    return np.concatenate(tiles), np.concatenate(coords), np.concatenate(owner), labels


def write_probe(
    out: str,
    dataset: str,
    tiles: np.ndarray,
    coords: np.ndarray,
    labels: list[str],
    groups: list[str],
    splits: list[str | None],
    images: list[str],
    owner: np.ndarray,
    *,
    mpp: float,
    source_mpp: float,
    source: str,
    s: ProbeSettings,
    splits_json: str | None,
) -> dict:
    """Write the probe store (and the made splits); returns its summary (class counts per split)."""
    from dirl import store
    from dirl.probe.protocols import make_splits

    class_names = sorted(set(labels))
    group_names = sorted(set(groups))
    lab = np.array([class_names.index(x) for x in labels])
    grp = np.array([group_names.index(x) for x in groups])
    if any(x is None for x in splits):
        assignment = make_splits(lab, np.asarray(groups), s.seed, s.val_fraction, s.test_fraction)
        made = f"made here: groups split by label, val {s.val_fraction:g} / test {s.test_fraction:g}, seed {s.seed}"
        split_names = [assignment[g] for g in groups]
    else:
        assignment = {group_names[g]: sp for g, sp in zip(grp.tolist(), splits)}
        made = "given by the dataset"
        split_names = list(splits)
    split = np.array([store.PROBE_SPLITS.index(x) for x in split_names])
    counts = {
        sp: {c: int(((split == k) & (lab == j)).sum()) for j, c in enumerate(class_names)}
        for k, sp in enumerate(store.PROBE_SPLITS)
    }
    tile_px = tiles.shape[1]
    attrs = {
        **store.TileAttrs.without_slide(dataset, tile_px, mpp=mpp, slide_mpp=source_mpp, source=source).to_dict(),
        "class_names": class_names,
        "group_names": group_names,
        "images": images,
        "splits": made,
        "class_counts": counts,
    }
    columns = store.probe_columns(lab, grp, split, owner)
    with store.tile_store_writer(
        out, coords=coords, tissue=np.ones(len(tiles)), tile_px=tile_px, attrs=attrs, columns=columns
    ) as w:
        for start in range(0, len(tiles), w.shard):
            w.write(start, tiles[start : start + w.shard])
    if splits_json:
        with store.atomic_path(splits_json) as tmp:
            tmp.write_text(json.dumps({"splits": made, "groups": dict(sorted(assignment.items()))}, indent=1) + "\n")
    log.info(
        "%s: %d tiles of %d classes in %d groups; splits %s; %s",
        dataset,
        len(tiles),
        len(class_names),
        len(group_names),
        made,
        counts,
    )
    return counts


# --------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="probe tile store, results/<cohort>/probe/<dataset>/tiles.zarr")
    p.add_argument("--dataset", required=True, help="the dataset's name (probe.datasets key, or `regions`)")
    p.add_argument("--manifest", help="manifest TSV/CSV (path, label[, group, split]) or an ImageFolder directory")
    p.add_argument("--image-mpp", type=float, help="µm/px of the manifest's images")
    p.add_argument("--regions", nargs="+", metavar="SLIDE=GEOJSON", help="classified regions per slide")
    p.add_argument("--tiles", nargs="+", help="the slides' tile stores (with --regions)")
    p.add_argument("--mpp", type=float, required=True, help="tiling.mpp: µm/px of the tiles")
    p.add_argument("--tile-px", type=int, required=True, help="tiling.tile_px")
    p.add_argument("--splits", help="splits.json to write (the group of every split)")
    ProbeSettings.add_arguments(p.add_argument_group("settings (ProbeSettings)"))


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [args.out, args.splits], [args.manifest, *(args.tiles or [])]


def main(args: argparse.Namespace) -> None:
    from dirl.probe.data import read_dataset

    s = ProbeSettings.from_args(args)
    if bool(args.manifest) == bool(args.regions):
        raise ConfigError("dirl probe-tiles: give --manifest (with --image-mpp) or --regions (with --tiles)")
    if args.manifest:
        if not args.image_mpp or args.image_mpp <= 0:
            raise ConfigError(f"--image-mpp: the µm/px of {args.manifest}'s images is required")
        items = read_dataset(args.manifest)
        tiles, coords, owner = from_images(items, args.image_mpp, args.mpp, args.tile_px, s.max_tiles_per_image, s.seed)
        pick = [items[i] for i in owner.tolist()]
        write_probe(
            args.out,
            args.dataset,
            tiles,
            coords,
            [it.label for it in pick],
            [it.group for it in pick],
            [it.split for it in pick],
            [str(it.path) for it in items],
            owner,
            mpp=args.mpp,
            source_mpp=args.image_mpp,
            source=str(args.manifest),
            s=s,
            splits_json=args.splits,
        )
        return
    pairs = []
    for item in args.regions:
        slide, sep, path = item.partition("=")
        if not sep or not slide or not path:
            raise ConfigError(f"--regions {item!r}: write SLIDE=GEOJSON")
        pairs.append((slide, path))
    tiles, coords, owner, labels = from_regions(pairs, args.tiles or [], s.region_cover)
    from dirl import store

    slide_mpp = float(store.open_tiles(args.tiles[0]).attrs.get("slide_mpp") or args.mpp)
    write_probe(
        args.out,
        args.dataset,
        tiles,
        coords,
        labels,
        [pairs[i][0] for i in owner.tolist()],
        [None] * len(labels),
        [p for _, p in pairs],
        owner,
        mpp=args.mpp,
        source_mpp=slide_mpp,
        source="regions",
        s=s,
        splits_json=args.splits,
    )
