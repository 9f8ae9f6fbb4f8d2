"""`dirl tile`: tissue detection, a tile grid at a target µm/px, and the tile store.

The grid and each tile's tissue fraction come from the low-resolution mask, so the number of kept
tiles is known before any full-resolution pixel is read. Tiles are then read in parallel from the
pyramid level closest to (and not coarser than) the target resolution, resized only when that level
is not exactly at the target, and written shard by shard: memory stays flat in slide size.

Where the time goes (20 000 px slide, 2 cores): OpenSlide's JPEG decoding is two thirds of the CPU,
zstd a fifth. So reads fetch row runs of 16 tiles in column-band order (each slide JPEG tile decoded
once), conversions use OpenCV, compression runs in the reading threads with shard files assembled
directly, and the QC image and zarr's import overlap the work.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dirl.settings import Settings, bounded
from dirl.slide import Slide
from dirl.tissue import TissueSettings, fraction_in_boxes, ink_mask, outline, tissue_mask

log = logging.getLogger(__name__)


RUN_TILES = 16  # tiles of one grid row read with a single read_region call (and the band width)


@dataclass(frozen=True)
class TileSettings(Settings):
    mpp: float = bounded(0.5, gt=0)  # µm/px of the tiles
    tile_px: int = bounded(224, ge=16)  # tile side in pixels at `mpp`
    overlap: float = bounded(0.0, ge=0, lt=1)  # fraction of a tile shared with its neighbour
    min_tissue: float = bounded(0.5, ge=0, le=1)  # keep tiles with at least this tissue fraction
    codec: str = field(
        default="zstd",
        metadata={"choices": ("zstd", "jpeg"), "help": "images codec: zstd (lossless) or jpeg (~11x smaller)"},
    )
    quality: int = bounded(90, ge=1, le=100)  # JPEG quality when codec is jpeg
    tissue: TissueSettings = field(default_factory=TissueSettings)


@dataclass(frozen=True)
class Grid:
    """The kept tiles of one slide and how to read them."""

    coords: np.ndarray  # (N, 2) int64 level-0 top-left x, y
    tissue: np.ndarray  # (N,) float32
    level: int  # pyramid level read
    read_px: int  # tile side at that level (== tile_px when no resize is needed)
    tile_px_level0: int
    mask: np.ndarray  # the tissue mask, for the QC image
    ink: np.ndarray  # marker ink left out of it (all False when tissue.pen is off)
    mask_mpp: float
    thumb: np.ndarray


def plan(slide: Slide, s: TileSettings, threads: int = 2) -> Grid:
    """Tissue mask and the grid of kept tiles, from a thumbnail only."""
    thumb, thumb_mpp = slide.thumbnail(s.tissue.mpp, threads=threads)
    ink = ink_mask(thumb, thumb_mpp) if s.tissue.pen else np.zeros(thumb.shape[:2], bool)
    mask = tissue_mask(thumb, thumb_mpp, s.tissue, ink)
    ds = s.mpp / slide.mpp  # level-0 px per tile px
    tile0 = round(s.tile_px * ds)
    step0 = max(1, round(tile0 * (1 - s.overlap)))
    w0, h0 = slide.dimensions
    xs, ys = np.arange(0, w0 - tile0 + 1, step0), np.arange(0, h0 - tile0 + 1, step0)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    # Tile order: column bands RUN_TILES tiles wide, top to bottom within a band. A row run then
    # shares the slide's JPEG tiles with the run just above it, still in OpenSlide's small cache
    # however wide the slide (row-major order decodes most slide tiles twice on a wide slide), and a
    # shard holds a compact block of tissue.
    band = coords[:, 0] // (RUN_TILES * step0)
    coords = coords[np.lexsort((coords[:, 0], coords[:, 1], band))]
    scale = slide.mpp / thumb_mpp  # thumbnail px per level-0 px
    boxes = np.concatenate([coords, coords + tile0], axis=1) * scale
    frac = fraction_in_boxes(mask, boxes)
    keep = frac >= s.min_tissue
    level = slide.best_level(ds)
    read_px = round(tile0 / slide.level_downsamples[level])
    return Grid(coords[keep], frac[keep], level, read_px, tile0, mask, ink, thumb_mpp, thumb)


def runs(coords: np.ndarray, g: Grid, shard: int, slide: Slide) -> list[tuple[int, int]]:
    """Split the kept tiles (in band order) into (start, length) runs of neighbours in one grid row that
    one read_region call can fetch: 2-3x faster than a call per tile (fewer calls, each slide JPEG
    tile decoded once). A run never crosses a shard, and its tiles must start on whole pixels of the
    level read."""
    ds = slide.level_downsamples[g.level]
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(coords) + 1):
        if i < len(coords):
            dx = (coords[i, 0] - coords[start, 0]) / ds
            same = (
                coords[i, 1] == coords[i - 1, 1]
                and coords[i, 0] > coords[i - 1, 0]
                and coords[i, 0] - coords[i - 1, 0] <= g.tile_px_level0
                and abs(dx - round(dx)) < 1e-6
                and i - start < RUN_TILES
                and i // shard == start // shard
            )
            if same:
                continue
        out.append((start, i - start))
        start = i
    return out


def _read_run(slide: Slide, coords: np.ndarray, g: Grid, tile_px: int, encode: bool) -> list[np.ndarray | bytes]:
    """The tiles at `coords` (one row, left to right) from a single region read."""

    from dirl.store import TileWriter

    ds = slide.level_downsamples[g.level]
    offsets = [round((x - coords[0, 0]) / ds) for x in coords[:, 0]]
    region = slide.read(int(coords[0, 0]), int(coords[0, 1]), g.level, offsets[-1] + g.read_px, g.read_px)
    out: list[np.ndarray | bytes] = []
    for o in offsets:
        tile = resize_tile(region[:, o : o + g.read_px], tile_px)
        out.append(TileWriter.encode(tile) if encode else np.ascontiguousarray(tile))
    return out


def resize_tile(tile: np.ndarray, tile_px: int) -> np.ndarray:
    """A square RGB crop resized to `tile_px` as every tile is (slides here, probe images in dirl.probe):
    BOX (area average) when shrinking, like a scanner's own pyramid; bilinear when enlarging."""
    from PIL import Image

    if tile.shape[0] == tile_px and tile.shape[1] == tile_px:
        return tile
    method = Image.Resampling.BOX if tile.shape[0] > tile_px else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(tile)).resize((tile_px, tile_px), method))


def tile_slide(
    slide: Slide,
    out: str | Path,
    s: TileSettings = TileSettings(),
    threads: int = 2,
    qc_png: str | Path | None = None,
    source: str | None = None,
    grid: Grid | None = None,
) -> int:
    """Cut `slide` into `out` (a tile store). Returns the number of tiles. `grid`: a plan already made
    with the same settings (benchmarks time planning and reading separately)."""
    from tqdm import tqdm

    from dirl import store

    t0 = time.perf_counter()
    g = grid if grid is not None else plan(slide, s, threads)
    t_plan = time.perf_counter() - t0
    n = len(g.coords)
    if n == 0:
        if min(slide.dimensions) < g.tile_px_level0:
            log.warning(
                "slide %r (%d x %d px) is smaller than one tile (%d px at level 0): writing an "
                "empty store; lower tiling.tile_px or tiling.mpp to tile it",
                slide.slide_id,
                *slide.dimensions,
                g.tile_px_level0,
            )
        else:
            log.warning(
                "slide %r: no tissue found (no tile reaches min_tissue=%.2f): writing an empty "
                "store; check the QC image, or lower tiling.min_tissue / tiling.tissue.sat_min",
                slide.slide_id,
                s.min_tissue,
            )
    attrs = {
        "slide_id": slide.slide_id,
        "source": str(source or slide.path),
        "mpp": s.mpp,
        "slide_mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "tile_px": s.tile_px,
        "tile_px_level0": g.tile_px_level0,
        "read_level": g.level,
        "read_px": g.read_px,
        "level0_width": slide.dimensions[0],
        "level0_height": slide.dimensions[1],
        "overlap": s.overlap,
        "min_tissue": s.min_tissue,
        "vendor": slide.vendor,
        "objective_power": slide.objective_power,  # HoVer-Net's reference for its `mag` (nuclei import)
        "tissue_params": s.tissue.to_dict(),
        "tissue_outline": outline(g.mask, g.mask_mpp / slide.mpp),  # level-0 polygons (QuPath export)
    }
    with (
        store.tile_store_writer(
            out, coords=g.coords, tissue=g.tissue, tile_px=s.tile_px, attrs=attrs, codec=s.codec, quality=s.quality
        ) as writer,
        ThreadPoolExecutor(max_workers=max(1, threads)) as pool,
        ThreadPoolExecutor(max_workers=2) as compressor,
        tqdm(total=n, unit="tile", desc=slide.slide_id, disable=None, mininterval=2) as bar,
    ):
        qc = compressor.submit(write_qc, qc_png, g, slide, s) if qc_png else None  # needs only the plan
        # Row runs of tiles are read about a shard ahead, each tile compressed by the thread that read
        # it (zstd releases the GIL); whole shards are written by background threads. At most a few
        # shards (~40 MB each at 224 px) are in memory.
        todo = deque(runs(g.coords, g, writer.shard, slide))
        pending: deque[tuple[int, Future[list[np.ndarray | bytes]]]] = deque()
        written: deque[Future[None]] = deque()
        for shard, start in enumerate(range(0, n, writer.shard)):
            stop = min(n, start + writer.shard)
            while todo and todo[0][0] < stop + writer.shard:  # reads run about a shard ahead
                a, k = todo.popleft()
                pending.append((a, pool.submit(_read_run, slide, g.coords[a : a + k], g, s.tile_px, writer.direct)))
            items: list[np.ndarray | bytes] = []
            while pending and pending[0][0] < stop:
                items += pending.popleft()[1].result()
            if len(written) == 2:
                written.popleft().result()
            if writer.direct:
                written.append(compressor.submit(writer.write_encoded, shard, items))
            else:
                written.append(compressor.submit(writer.write, start, np.stack(items)))
            bar.update(stop - start)
        for w in written:
            w.result()
        if qc:
            qc.result()
    dt = time.perf_counter() - t0
    log.info(
        "slide %r: %d tiles of %d px at %.3g µm/px (level %d, %d px read) in %.1f s: tissue %.1f s, tiles %.0f/s",
        slide.slide_id,
        n,
        s.tile_px,
        s.mpp,
        g.level,
        g.read_px,
        dt,
        t_plan,
        n / max(dt - t_plan, 1e-9),
    )
    return n


def write_qc(path: str | Path, g: Grid, slide: Slide, s: TileSettings) -> None:
    """Thumbnail with the tissue contour (green), marker ink left out (magenta contour) and the kept
    tiles (blue boxes). PIL and OpenCV, not matplotlib, which would double the start-up time of a
    per-slide job."""
    import cv2
    from PIL import Image, ImageDraw

    from dirl.store import atomic_path

    img = g.thumb.copy()
    mask = g.mask.astype(np.uint8)
    edge = mask > cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=2, borderValue=0)
    img[edge] = (0, 220, 0)
    ink = g.ink.astype(np.uint8)
    img[ink > cv2.erode(ink, np.ones((3, 3), np.uint8), iterations=2, borderValue=0)] = (230, 0, 230)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    scale = slide.mpp / g.mask_mpp
    side = g.tile_px_level0 * scale
    for x, y in g.coords * scale:
        draw.rectangle((x, y, x + side, y + side), outline=(40, 80, 220))
    if max(pil.size) > 1600:  # a QC image is looked at, not measured: keep the PNG small and quick
        f = 1600 / max(pil.size)
        pil = pil.resize((round(pil.width * f), round(pil.height * f)), Image.Resampling.BOX)
    caption = (
        f"{slide.slide_id}: {len(g.coords)} tiles, {s.tile_px} px @ {s.mpp:g} um/px, "
        f"tissue {g.mask.mean() * 100:.0f}%" + (f", ink {g.ink.mean() * 100:.0f}% (magenta)" if g.ink.any() else "")
    )
    canvas = Image.new("RGB", (pil.width, pil.height + 16), "white")
    canvas.paste(pil, (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), caption, fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=1)  # fastest zlib level: QC images are looked at


# --------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", help="whole-slide image (any format OpenSlide reads)")
    p.add_argument("out", help="output tile store, e.g. results/demo/tiles/{slide}.zarr")
    p.add_argument("--slide-id", help="identifier stored in the tiles (default: file stem)")
    p.add_argument("--slide-mpp", type=float, help="µm/px for slides whose metadata lacks it")
    p.add_argument("--qc", help="QC thumbnail PNG to write")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--on-error",
        choices=["fail", "empty"],
        default="fail",
        help="empty: a slide that cannot be read gets an empty store marked `failed` (and "
        "the error in its QC image), so cohort-level stages go on without it",
    )
    TileSettings.add_arguments(p.add_argument_group("settings (TileSettings)"))


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [args.out, args.qc], [args.slide]


def main(args: argparse.Namespace) -> None:
    from dirl.errors import SlideError

    s = TileSettings.from_args(args)
    # zarr takes ~0.2 s to import: let it load while OpenSlide decodes the thumbnail (GIL released)
    threading.Thread(target=importlib.import_module, args=("dirl.store",), daemon=True).start()
    try:
        with Slide.open(args.slide, args.slide_id, args.slide_mpp) as slide:
            tile_slide(slide, args.out, s, threads=args.threads, qc_png=args.qc)
    except SlideError as e:
        if args.on_error == "fail":
            raise
        log.error("%s -- writing an empty store marked failed (allow_failed_slides)", e)
        write_failed(args.out, args.qc, args.slide_id or Path(args.slide).stem, str(args.slide), s, str(e))


def write_failed(
    out: str | Path, qc_png: str | Path | None, slide_id: str, source: str, s: TileSettings, error: str
) -> None:
    """An empty tile store that records why the slide failed; downstream stages see N = 0."""
    from PIL import Image, ImageDraw

    from dirl import store

    attrs = {
        "slide_id": slide_id,
        "source": source,
        "mpp": s.mpp,
        "slide_mpp": None,
        "tile_px": s.tile_px,
        "tile_px_level0": None,
        "read_level": None,
        "level0_width": None,
        "level0_height": None,
        "failed": error,
    }
    with store.tile_store_writer(
        out,
        coords=np.zeros((0, 2)),
        tissue=np.zeros(0),
        tile_px=s.tile_px,
        attrs=attrs,
        codec=s.codec,
        quality=s.quality,
    ):
        pass
    if qc_png:
        img = Image.new("RGB", (640, 80), "white")
        ImageDraw.Draw(img).multiline_text((4, 4), f"FAILED: {slide_id}\n{error[:300]}", fill="red")
        with store.atomic_path(qc_png) as tmp:
            img.save(tmp, format="PNG")
