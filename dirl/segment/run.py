"""`dirl segment`: nuclei of every tile of a slide, tiles store -> cells store.

Reads `tiles/{slide}.zarr` one shard (store.SHARD_TILES tiles) at a time, segments it with the chosen
backend (dirl.segment.base), measures every nucleus (dirl.segment.features) and writes
`cells/{slide}.zarr`: `labels` uint32 (N, T, T) row-aligned with the tiles, and the `cells` table.
The next shard is read while the current one is segmented; memory is one or two shards whatever the
slide size. The store is written atomically (a temporary sibling renamed at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
import typing
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dirl import store
from dirl.segment import base, features
from dirl.settings import Settings, comments

log = logging.getLogger(__name__)


def _blocks(tiles: Any, rows: np.ndarray, step: int, pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """The tiles of `rows` in blocks of `step`, the next block read in the background."""
    chunks = store.rows_by_shard(rows, step)  # a block never shares a shard with the next
    if not chunks:
        return
    nxt = pool.submit(tiles.take, chunks[0])
    for i in range(len(chunks)):
        block = nxt.result()
        if i + 1 < len(chunks):
            nxt = pool.submit(tiles.take, chunks[i + 1])
        yield block


def segment_store(
    tiles_path: str | Path,
    out: str | Path,
    backend: base.Backend,
    *,
    threads: int = 2,
    block: int | None = None,
    tiles_per_slide: int = 0,
    nuclei: str | Path | None = None,
) -> dict[str, Any]:
    """Segment the tiles of `tiles_path` into the cells store `out`: every tile, or with `tiles_per_slide`
    only the subset pretraining and the attention diagnostics use (`store.tile_subset`; the other rows get
    empty label maps, and the store's `rows` attr lists the segmented ones). `nuclei`: the slide's file of
    typed nuclei for the import backend. Returns a summary."""
    from tqdm import tqdm

    from dirl import store

    t0 = time.perf_counter()
    tiles = store.open_tiles(tiles_path)
    n, tp, mpp = len(tiles), tiles.tile_px, tiles.mpp
    scale = float(tiles.attrs["tile_px_level0"]) / tp if n else 1.0  # a failed slide's store has none
    step = block or store.SHARD_TILES
    rows = store.tile_subset(n, tiles_per_slide, tiles.slide_id)
    subset = len(rows) < n
    backend.bind(nuclei, tiles, rows)
    attrs = {
        **backend.describe(),
        "slide_id": tiles.slide_id,
        "mpp": mpp,
        "tile_px": tp,
        "tiles": str(Path(tiles_path)),
        "tile_px_level0": tiles.attrs["tile_px_level0"],
        **({"failed": tiles.failed} if tiles.failed else {}),
        **({"rows": rows.tolist(), "tiles_per_slide": tiles_per_slide} if subset else {}),
        **({"type_names": backend.type_names} if backend.type_names is not None else {}),
    }
    n_nuc = 0
    oom = getattr(backend, "net_batch", None)  # dirl.oom.HalvingBatch of GPU backends: name the slide
    if oom is not None:
        oom.slide = tiles.slide_id
    with (
        store.map_store_writer(out, "labels", n=n, tile_px=tp, dtype="uint32", attrs=attrs) as (root, arr),
        ThreadPoolExecutor(max(1, threads)) as pool,
        ThreadPoolExecutor(1) as reader,
        tqdm(total=len(rows), unit="tile", desc=f"segment {tiles.slide_id}", disable=None, mininterval=2) as bar,
    ):
        table = store.NucleusTableWriter(
            root, features.COLUMNS, {"mpp": mpp, "units": {"x": "level-0 px", "y": "level-0 px", "area_um2": "µm²"}}
        )
        start = 0
        for labels, images in _zip_stream(backend, _blocks(tiles, rows, step, reader), mpp):
            m = len(labels)
            idx = rows[start : start + m]
            if subset:
                store.write_rows(arr, idx, labels)
            else:
                arr[start : start + m] = labels

            def feats(
                i: int, idx: np.ndarray = idx, labels: np.ndarray = labels, images: np.ndarray = images, at: int = start
            ) -> Mapping[str, np.ndarray]:
                x0, y0 = tiles.coords[idx[i]]
                return features.tile_features(
                    images[i],
                    labels[i],
                    mpp,
                    tile=int(idx[i]),
                    origin=(float(x0), float(y0)),
                    scale=scale,
                    types=backend.types_of(at + i),
                )

            parts = list(pool.map(feats, range(m)))
            cols = features.concat(parts)
            table.append(cols)
            n_nuc += len(cols["tile"])
            start += m
            bar.update(m)
        if start != len(rows):
            raise RuntimeError(f"backend returned {start} label tiles for {len(rows)} tiles")
        table.close()
        root.attrs.update({"n_nuclei": n_nuc})
    dt = time.perf_counter() - t0
    log.info(
        "slide %r: %d nuclei in %d%s tiles (%s) in %.1f s (%.1f tiles/s)",
        tiles.slide_id,
        n_nuc,
        len(rows),
        f" of {n} (pretrain.tiles_per_slide)" if subset else "",
        backend.name,
        dt,
        len(rows) / max(dt, 1e-9),
    )
    return {"tiles": len(rows), "nuclei": n_nuc, "seconds": dt}


class _Tee:
    """Remember the image blocks a backend consumes, to pair them with the label blocks it yields
    (in the same order; a pipelining backend runs ahead by a block or two)."""

    def __init__(self, it: Iterator[np.ndarray]):
        self.it, self.seen = it, deque()

    def __iter__(self) -> Iterator[np.ndarray]:
        for b in self.it:
            self.seen.append(b)
            yield b


def _zip_stream(
    backend: base.Backend, blocks: Iterator[np.ndarray], mpp: float
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    tee = _Tee(blocks)
    for labels in backend.stream(iter(tee), mpp):
        images = tee.seen.popleft()
        if len(images) != len(labels):
            raise RuntimeError("backend returned a block of a different size")
        yield labels, images


# --------------------------------------------------------------------------------------------------
def _segment_settings() -> type[Settings]:
    """The `segmentation` section: `backend` and one flat namespace of every built-in backend's
    parameters (their Params dataclasses hold the defaults; a backend takes the fields it has)."""
    from dirl.segment.cellpose_backend import CellposeParams
    from dirl.segment.imported import ImportParams
    from dirl.segment.unet import UNetParams
    from dirl.segment.watershed import WatershedParams

    fields: dict[str, tuple] = {
        "backend": (
            "backend",
            str,
            dataclasses.field(
                default="watershed", metadata={"help": f"{' | '.join(base.BACKENDS)} | package.module:Class"}
            ),
        )
    }
    for params in (WatershedParams, UNetParams, CellposeParams, ImportParams):
        hints = typing.get_type_hints(params)
        for f in dataclasses.fields(params):
            if f.name == "threads":  # the job's CPUs: `--threads`, not a setting
                continue
            if f.name in fields and fields[f.name][2].default != f.default:
                raise TypeError(f"segmentation.{f.name}: backends disagree on the default")
            fields.setdefault(
                f.name,
                (
                    f.name,
                    hints[f.name],
                    dataclasses.field(
                        default=f.default,
                        metadata={**f.metadata, "help": f"{params.__name__}: {comments(params).get(f.name, '')}"},
                    ),
                ),
            )
    return dataclasses.make_dataclass("SegmentSettings", list(fields.values()), bases=(Settings,), frozen=True)


SegmentSettings = _segment_settings()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tiles", help="tile store, results/<cohort>/tiles/{slide}.zarr")
    p.add_argument("out", help="cells store to write, results/<cohort>/cells/{slide}.zarr")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (tiles, features, mask post-processing)")
    p.add_argument(
        "--tiles-per-slide",
        type=int,
        default=0,
        help="segment only the subset of tiles pretraining uses (pretrain.tiles_per_slide; 0: every tile)",
    )
    p.add_argument("--nuclei", help="the slide's typed nuclei (GeoJSON or HoVer-Net JSON) for backend import")
    SegmentSettings.add_arguments(p.add_argument_group("settings (segment backends' Params)"))


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [args.out], [args.tiles, args.nuclei]


def main(args: argparse.Namespace) -> None:
    s = SegmentSettings.from_args(args)
    with base.create(s.backend, {**s.to_dict(), "threads": args.threads}) as backend:
        segment_store(
            args.tiles,
            args.out,
            backend,
            threads=args.threads,
            tiles_per_slide=args.tiles_per_slide,
            nuclei=args.nuclei,
        )
