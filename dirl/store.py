"""On-disk layouts: the Zarr tile, cell and prior stores and the HDF5 feature file.

This is the only module that knows paths inside the stores (the README's outputs table describes them),
so it holds every artefact's reader and writer and is long on purpose: one place to look for a layout.
Every writer builds its output under a temporary sibling name and renames it into place when complete,
guarded by a lock against concurrent writers (`atomic_path`), so an interrupted job never leaves a store
that looks finished. Readers check the attributes they rely on and fail with a message naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from dirl import __version__
from dirl.atomic import atomic_path, check_replaceable, claim, leftovers  # noqa: F401  (re-exported)
from dirl.errors import StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileAttrs:
    """What every tile store records about its tiles (readers rely on these; writers may add more).

    `without_slide` fills it for stores made from arrays rather than read from a slide (tests,
    benchmarks, synthetic cohorts): tiles taken at level 0 of a slide of `slide_mpp`."""

    slide_id: str
    source: str
    mpp: float  # µm/px of the tiles
    slide_mpp: float  # µm/px of the slide's level 0
    tile_px: int
    tile_px_level0: int
    read_level: int
    level0_width: int
    level0_height: int

    @classmethod
    def without_slide(
        cls,
        slide_id: str,
        tile_px: int,
        *,
        mpp: float = 0.5,
        slide_mpp: float | None = None,
        width: int = 10**6,
        height: int = 10**6,
        source: str = "synthetic",
    ) -> TileAttrs:
        slide_mpp = mpp if slide_mpp is None else slide_mpp
        return cls(slide_id, source, mpp, slide_mpp, tile_px, round(tile_px * mpp / slide_mpp), 0, width, height)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TILE_ATTRS = tuple(f.name for f in dataclasses.fields(TileAttrs))
SHARD_TILES = 256  # tiles per shard file: a 50 000-tile slide is ~200 files
ZSTD_LEVEL = 1  # twice the speed of level 3 on H&E tiles for ~8 % more bytes (measured)


def _open_group(path: str | os.PathLike, what: str) -> zarr.Group:
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{what} store {path} does not exist: run the stage that writes it first")
    try:
        g = zarr.open_group(str(path), mode="r")
        # before any member is looked up: that parses the arrays' metadata, codecs included (installed
        # dirl also registers the codec as a zarr entry point, for readers that never import dirl)
        if g.attrs.get("images_codec") == "jpeg":
            import dirl.jpeg_codec  # noqa: F401
        return g
    except Exception as e:  # zarr raises several types for a damaged store
        raise StoreError(f"{what} store {path} cannot be opened ({e}); delete it and rerun") from e


def _images_codec(codec: str, quality: int) -> dict[str, Any]:
    if codec == "zstd":
        return {"compressors": ZstdCodec(level=ZSTD_LEVEL)}
    if codec == "jpeg":
        from dirl.jpeg_codec import JpegCodec

        return {"serializer": JpegCodec(level=quality), "compressors": None}
    raise ValueError(f"unknown images codec {codec!r}: use 'zstd' (lossless) or 'jpeg'")


def _written() -> dict[str, str]:
    """Attributes every store gets: dirl's version, and a write id new with each write, so that a reader
    that must know whether a store is the one it saw before (a pretraining checkpoint resumed over tiles
    and priors) can tell, without reading the pixels."""
    return {"dirl_version": __version__, WRITE_ID: uuid.uuid4().hex}


WRITE_ID = "write_id"


def write_id(path: str | os.PathLike, what: str) -> str | None:
    """The write id of a store (None for stores written before dirl recorded one)."""
    return _open_group(path, what).attrs.get(WRITE_ID)


# --------------------------------------------------------------------------------------------------
# tiles/{slide}.zarr
class TileWriter:
    """Write tiles shard by shard; the number of tiles is known up front (from the tissue mask).

    Two ways in: `write(start, block)` through zarr, or, for the zstd codec, `encode(tile)` in any
    thread (zstd releases the GIL, so reader threads compress in parallel) and then
    `write_encoded(shard, chunks)`, which assembles the shard file itself: zarr's per-chunk overhead
    otherwise costs as much CPU as reading the tile from the slide. The file is byte-for-byte what
    zarr's sharding codec reads (inner chunks, then the index of (offset, nbytes) little-endian uint64
    pairs and its crc32c); tests read every tile back through zarr.
    """

    def __init__(self, root: zarr.Group, path: Path, n: int, tile_px: int, codec: str = "zstd", quality: int = 90):
        self.n, self.tile_px, self.path = n, tile_px, path
        shard = max(1, min(SHARD_TILES, n))
        self.images = root.create_array(
            "images",
            shape=(n, tile_px, tile_px, 3),
            dtype="uint8",
            chunks=(1, tile_px, tile_px, 3),
            shards=(shard, tile_px, tile_px, 3),
            **_images_codec(codec, quality),
        )
        self.shard = shard
        self.direct = codec == "zstd"

    def write(self, start: int, block: np.ndarray) -> None:
        """Write tiles [start, start + len(block)); whole shards at a time is fastest."""
        self.images[start : start + len(block)] = block

    @staticmethod
    def encode(tile: np.ndarray) -> bytes:
        import imagecodecs

        return imagecodecs.zstd_encode(np.ascontiguousarray(tile), level=ZSTD_LEVEL)

    def write_encoded(self, shard: int, chunks: list[bytes]) -> None:
        """Write shard number `shard` from its tiles' `encode` outputs, in row order."""
        import google_crc32c

        index = np.full((self.shard, 2), 2**64 - 1, dtype="<u8")  # missing chunks: all ones
        sizes = np.array([len(c) for c in chunks], dtype="<u8")
        index[: len(chunks), 0] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype("<u8")
        index[: len(chunks), 1] = sizes
        crc = np.uint32(google_crc32c.value(index.tobytes())).astype("<u4").tobytes()
        out = self.path / "images" / "c" / str(shard) / "0" / "0" / "0"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as f:
            f.writelines([*chunks, index.tobytes(), crc])  # no joined copy of the ~40 MB shard


@contextlib.contextmanager
def tile_store_writer(
    path: str | os.PathLike,
    *,
    coords: np.ndarray,
    tissue: np.ndarray,
    tile_px: int,
    attrs: TileAttrs | Mapping[str, Any],
    codec: str = "zstd",
    quality: int = 90,
    columns: Mapping[str, np.ndarray] | None = None,
) -> Iterator[TileWriter]:
    """Create `tiles/{slide}.zarr` atomically; the caller fills `writer.write(start, block)`. `attrs`: a
    TileAttrs, or a mapping holding at least its fields (the tile stage adds how it read the slide).
    `columns`: more per-tile 1-D arrays (a probe store's labels)."""
    attrs = attrs.to_dict() if isinstance(attrs, TileAttrs) else dict(attrs)
    missing = [k for k in TILE_ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"tile store attrs missing: {missing}")
    with atomic_path(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        n = len(coords)
        root.create_array(
            "coords", data=np.asarray(coords, dtype=np.int64).reshape(n, 2), chunks=(max(1, min(n, 65536)), 2)
        )
        root.create_array(
            "tissue", data=np.asarray(tissue, dtype=np.float32).reshape(n), chunks=(max(1, min(n, 65536)),)
        )
        for name, values in (columns or {}).items():
            root.create_array(name, data=np.asarray(values).reshape(n), chunks=(max(1, min(n, 65536)),))
        writer = TileWriter(root, Path(tmp), n, tile_px, codec, quality)
        yield writer
        root.attrs.update({**attrs, "n_tiles": n, "images_codec": codec, **_written()})


@dataclass
class TileStore:
    """Read access to `tiles/{slide}.zarr`. Cheap to open; pixels are read on demand."""

    path: Path
    images: zarr.Array
    coords: np.ndarray
    tissue: np.ndarray
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])

    @property
    def tile_px(self) -> int:
        return int(self.attrs["tile_px"])

    @property
    def mpp(self) -> float:
        return float(self.attrs["mpp"])

    @property
    def failed(self) -> str | None:
        """Why the slide could not be tiled (an empty store written under allow_failed_slides), or None."""
        return self.attrs.get("failed")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tiles [start, stop) as uint8 (n, T, T, 3)."""
        try:
            return np.asarray(self.images[start:stop])
        except (ValueError, RuntimeError, OSError) as e:  # checksum mismatch, corrupt zstd/JPEG data
            raise StoreError(
                f"tile store {self.path} (slide {self.slide_id}): tiles {start}-{stop - 1} cannot be "
                f"read ({e}); the store is damaged: delete it and rerun the tile stage for this "
                "slide"
            ) from e

    def tile(self, i: int) -> np.ndarray:
        """Tile `i` as uint8 (T, T, 3)."""
        return self.read(i, i + 1)[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The tiles of `rows` (sorted) as uint8 (len(rows), T, T, 3)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # contiguous: one slice
            return self.read(int(rows[0]), int(rows[-1]) + 1)
        try:
            return read_rows(self.images, rows)
        except (ValueError, RuntimeError, OSError) as e:
            raise StoreError(
                f"tile store {self.path} (slide {self.slide_id}): tiles {rows[:3].tolist()}... "
                f"cannot be read ({e}); the store is damaged: delete it and rerun the tile stage "
                "for this slide"
            ) from e


def open_tiles(path: str | os.PathLike) -> TileStore:
    g = _open_group(path, "tile")
    missing = [k for k in TILE_ATTRS if k not in g.attrs]
    if missing or "images" not in g or "coords" not in g:
        raise StoreError(
            f"tile store {path} is incomplete (missing {missing or 'arrays'}); delete it and rerun the tile stage"
        )
    return TileStore(Path(path), g["images"], np.asarray(g["coords"][:]), np.asarray(g["tissue"][:]), dict(g.attrs))


# --------------------------------------------------------------------------------------------------
# probe/{dataset}/tiles.zarr: a tile store of labelled tiles (dirl.probe) with one label, group and split
# per tile; attrs `class_names`, `group_names`, `images` (source image or slide per tile's `image` index)
PROBE_SPLITS = ("train", "val", "test")


@dataclass
class ProbeStore:
    tiles: TileStore
    label: np.ndarray  # int, index into class_names
    group: np.ndarray  # int, index into group_names
    split: np.ndarray  # int, index into PROBE_SPLITS
    class_names: list[str]
    group_names: list[str]


def probe_columns(label, group, split, image) -> dict[str, np.ndarray]:
    """The per-tile columns of a probe store, typed, for `tile_store_writer(columns=...)`."""
    return {
        "label": np.asarray(label, np.int16),
        "group": np.asarray(group, np.int32),
        "split": np.asarray(split, np.int8),
        "image": np.asarray(image, np.int32),
    }


def open_probe(path: str | os.PathLike) -> ProbeStore:
    tiles = open_tiles(path)
    g = _open_group(path, "probe")
    if any(k not in g for k in ("label", "group", "split")) or "class_names" not in g.attrs:
        raise StoreError(f"{path} is a tile store but not a probe store (no labels): rerun `dirl probe-tiles`")
    return ProbeStore(
        tiles,
        np.asarray(g["label"][:], np.int64),
        np.asarray(g["group"][:], np.int64),
        np.asarray(g["split"][:], np.int64),
        list(g.attrs["class_names"]),
        list(g.attrs["group_names"]),
    )


def read_rows(arr: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (sorted) of an array whose first axis is the tile."""
    return np.asarray(arr.get_orthogonal_selection((np.asarray(rows),) + (slice(None),) * (arr.ndim - 1)))


def write_rows(arr: zarr.Array, rows: np.ndarray, block: np.ndarray) -> None:
    """Write rows `rows` (sorted) of a new map array, the other rows zero. Whole shards at a time: zarr
    3.1 cannot write an integer-array selection into a sharded array, and a shard written whole is
    written once."""
    rows = np.asarray(rows, dtype=np.int64)
    shard = (arr.shards or arr.chunks)[0]
    for s0 in np.unique(rows // shard) * shard:
        s1 = min(arr.shape[0], s0 + shard)
        inside = (rows >= s0) & (rows < s1)
        full = np.zeros((s1 - s0, *arr.shape[1:]), dtype=arr.dtype)
        full[rows[inside] - s0] = block[inside]
        arr[s0:s1] = full


def rows_by_shard(rows: np.ndarray, shard: int = SHARD_TILES) -> list[np.ndarray]:
    """`rows` (sorted) cut where a new shard starts: blocks that `write_rows` writes whole, once each."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return []
    cuts = np.flatnonzero(np.diff(rows // shard)) + 1
    return np.split(rows, cuts)


def tile_subset(n: int, cap: int, slide_id: str) -> np.ndarray:
    """The rows of a slide's tiles that segmentation, priors, pretraining and the attention diagnostics
    use when `pretrain.tiles_per_slide` caps them: all rows when `cap` is 0 or n <= cap, else a fixed
    random subset of `cap` rows, sorted, seeded by the slide id (the same for every seed and stage)."""
    if not cap or n <= cap:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(zlib.crc32(slide_id.encode()))
    return np.sort(rng.choice(n, cap, replace=False)).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# priors/{slide}.zarr values: 0 glass, 1 non-nuclear tissue, 2.. the cell classes (class c -> 2 + c)
PRIOR_GLASS, PRIOR_TISSUE, FIRST_CELL_PRIOR = 0, 1, 2


def prior_value(cell_class: int | np.ndarray) -> int | np.ndarray:
    return cell_class + FIRST_CELL_PRIOR


def prior_class_names(descriptions: list[str]) -> list[str]:
    """Names of the prior values, as the phenotype gallery numbers the classes."""
    return ["glass", "tissue"] + [f"class {c}: {d}" for c, d in enumerate(descriptions)]


# --------------------------------------------------------------------------------------------------
# per-tile maps aligned with the tile store: cells/{slide}.zarr `labels`, priors/{slide}.zarr `priors`
@contextlib.contextmanager
def map_store_writer(
    path: str | os.PathLike, name: str, *, n: int, tile_px: int, dtype: str, attrs: Mapping[str, Any]
) -> Iterator[tuple[zarr.Group, zarr.Array]]:
    """Create a store holding one (N, T, T) map per tile, row-aligned with a tile store."""
    with atomic_path(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        shard = max(1, min(SHARD_TILES, n))
        arr = root.create_array(
            name,
            shape=(n, tile_px, tile_px),
            dtype=dtype,
            chunks=(1, tile_px, tile_px),
            shards=(shard, tile_px, tile_px),
            compressors=ZstdCodec(level=3),
        )
        yield root, arr
        root.attrs.update({**attrs, "n_tiles": n, **_written()})


# priors/{slide}.zarr group `cells`: the cell class of every nucleus, row-aligned with the cells store's table
# (-1: none, a dropped type painted as tissue), class names in its attrs. The classes exist once the cohort's
# phenotype model does, after segmentation: the priors, which paint them, keep them for every reader.
CLASSES = "cells"


def write_nucleus_classes(root: zarr.Group, classes: np.ndarray, names: list[str]) -> None:
    g = root.create_group(CLASSES)
    values = np.asarray(classes, np.int16)
    g.create_array("class", data=values, chunks=(max(1, min(len(values), 65536)),))
    g.attrs.update({"class_names": list(names), "n": int(len(values))})


def read_nucleus_classes(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """(class per row of the cells table, class names) from a priors store."""
    g = _open_group(path, "priors")
    if CLASSES not in g:
        raise StoreError(f"priors store {path} has no nucleus classes (written by an older dirl?): rerun `dirl priors`")
    return np.asarray(g[CLASSES]["class"][:], np.int64), list(g[CLASSES].attrs["class_names"])


def map_attrs(path: str | os.PathLike, name: str) -> dict[str, Any]:
    """The attributes of a map store (cells, priors)."""
    return dict(_open_group(path, name).attrs)


def open_map(path: str | os.PathLike, name: str, n_tiles: int | None = None) -> zarr.Array:
    """Open the (N, T, T) map `name` and check it is row-aligned with a tile store of `n_tiles`."""
    g = _open_group(path, name)
    if name not in g:
        raise StoreError(f"store {path} has no array {name!r}; delete it and rerun its stage")
    arr = g[name]
    if n_tiles is not None and arr.shape[0] != n_tiles:
        raise StoreError(
            f"{path}: {arr.shape[0]} rows but the tile store has {n_tiles}; the tiles were "
            "re-cut after this store was written: rerun its stage"
        )
    return arr


# cells/{slide}.zarr: the nucleus table, group `cells` with one 1-D array per column
NUCLEI = "cells"


class NucleusTableWriter:
    """Append rows to the column arrays of a cells store's table, block by block (dirl.segment.features
    defines the columns and their dtypes)."""

    CHUNK = 65536

    def __init__(self, root: zarr.Group, columns: Mapping[str, str], attrs: Mapping[str, Any] | None = None):
        self.columns = dict(columns)
        self.group = root.create_group(NUCLEI)
        self.arrays = {
            k: self.group.create_array(k, shape=(0,), dtype=v, chunks=(self.CHUNK,)) for k, v in self.columns.items()
        }
        self.n = 0
        self.group.attrs.update({"columns": list(self.columns), **(attrs or {})})

    def append(self, cols: Mapping[str, np.ndarray]) -> None:
        m = len(next(iter(cols.values()))) if cols else 0
        if m == 0:
            return
        for k, a in self.arrays.items():
            a.resize((self.n + m,))
            a[self.n :] = np.asarray(cols[k], dtype=self.columns[k])
        self.n += m

    def close(self) -> None:
        self.group.attrs["n"] = self.n


def read_nuclei(path: str | os.PathLike, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Columns of the nucleus table of a cells store (all it has by default)."""
    g = _open_group(path, "cells")
    if NUCLEI not in g:
        raise StoreError(f"cells store {path} has no {NUCLEI!r} table; delete it and rerun `dirl segment`")
    t = g[NUCLEI]
    want = list(t.attrs.get("columns", [])) if columns is None else columns
    missing = [c for c in want if c not in t]
    if missing:
        raise StoreError(
            f"cells store {path} lacks columns {missing} (written by an older dirl?); rerun `dirl segment`"
        )
    return {c: np.asarray(t[c][:]) for c in want}


def nucleus_count(path: str | os.PathLike) -> int:
    g = _open_group(path, "cells")
    return int(g[NUCLEI].attrs.get("n", g[NUCLEI]["tile"].shape[0]))


# --------------------------------------------------------------------------------------------------
# features/{method}/{slide}.h5
def feature_coord_attrs(tiles: TileStore) -> dict[str, Any]:
    """CLAM/TRIDENT attributes of `coords`, from the tile store's attrs.

    Magnifications follow the usual 10 µm/px-per-objective convention (0.5 µm/px = 20x), as TRIDENT
    does; `patch_size` is the tile side in pixels at `patch_level` (the slide level the tiles were read
    from), `patch_size_level0` its side in level-0 pixels. A slide that could not be read (`failed`) has
    no geometry: -1 stands for it, and zero rows follow."""
    a = tiles.attrs
    if tiles.failed:
        keys = ("patch_level", "patch_size_level0", "level0_magnification", "level0_width", "level0_height")
        return {
            "patch_size": int(a["tile_px"]),
            **dict.fromkeys(keys, -1),
            "target_magnification": int(round(10.0 / float(a["mpp"]))),
            "overlap": 0,
            "name": str(a["slide_id"]),
            "failed": str(tiles.failed),
        }
    slide_mpp, mpp = float(a["slide_mpp"]), float(a["mpp"])
    return {
        "patch_size": int(a["tile_px"]),
        "patch_level": int(a["read_level"]),
        "patch_size_level0": int(a["tile_px_level0"]),
        "level0_magnification": int(round(10.0 / slide_mpp)),
        "target_magnification": int(round(10.0 / mpp)),
        "level0_width": int(a["level0_width"]),
        "level0_height": int(a["level0_height"]),
        "overlap": 0,
        "name": str(a["slide_id"]),
        "mpp": mpp,
        "slide_mpp": slide_mpp,
    }


FEATURE_CHUNK_ROWS = 256


class FeatureWriter:
    """The streaming writer of `features/{source}/{slide}.h5`: rows written block by block into a
    temporary file; `feature_writer` renames it into place when every row is there."""

    def __init__(self, h5: Any, n: int, dim: int):
        self.n, self.dim, self.written = n, dim, 0
        self.features = h5["features"]

    def write(self, start: int, block: np.ndarray) -> None:
        self.features[start : start + len(block)] = block
        self.written += len(block)


@contextlib.contextmanager
def feature_writer(path: str | os.PathLike, tiles: TileStore, dim: int, encoder: str) -> Iterator[FeatureWriter]:
    """Create the CLAM/TRIDENT-readable feature file of a tile store (its coords in the same row order)."""
    import h5py

    n = len(tiles)
    coords = np.asarray(tiles.coords, dtype=np.int64).reshape(n, 2)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h:
        rows = max(1, min(FEATURE_CHUNK_ROWS, n))
        f = h.create_dataset("features", shape=(n, dim), dtype="float32", chunks=(rows, dim) if n else None)
        f.attrs["encoder"] = encoder
        c = h.create_dataset("coords", data=coords, chunks=(rows, 2) if n else None)
        c.attrs.update(feature_coord_attrs(tiles))
        w = FeatureWriter(h, n, dim)
        yield w
        if w.written != n:
            raise StoreError(f"{path}: {w.written} of {n} feature rows written")


def feature_shape(path: str | os.PathLike) -> tuple[int, int, str | None]:
    """(rows, dimension, encoder) of a feature file, without reading the features."""
    import h5py

    if not Path(path).exists():
        raise StoreError(f"feature file {path} does not exist: run the extract stage first")
    with h5py.File(path, "r") as h:
        if "features" not in h or "coords" not in h:
            raise StoreError(f"feature file {path} lacks features/coords; delete it and rerun extract")
        shape = h["features"].shape
        return int(shape[0]), int(shape[1]), h["features"].attrs.get("encoder")


def read_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    import h5py

    if not Path(path).exists():
        raise StoreError(f"feature file {path} does not exist: run the extract stage first")
    with h5py.File(path, "r") as h:
        if "features" not in h or "coords" not in h:
            raise StoreError(f"feature file {path} lacks features/coords; delete it and rerun extract")
        return h["features"][:], h["coords"][:], {**h["coords"].attrs, "encoder": h["features"].attrs.get("encoder")}


# --------------------------------------------------------------------------------------------------
# mil/{source}/{model}/attention.npz: out-of-fold MIL attention, one float32 array per slide (tile rows)
def write_tile_scores(path: str | os.PathLike, scores: Mapping[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no suffix
        np.savez_compressed(f, **{s: np.asarray(v, np.float32) for s, v in scores.items()})


def read_tile_scores(path: str | os.PathLike, slides: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of `slides` (all by default) that the file has: each is read only when asked for."""
    if not Path(path).exists():
        raise StoreError(f"{path} does not exist: run `dirl mil` first")
    with np.load(path) as z:
        return {s: z[s] for s in (z.files if slides is None else slides) if s in z.files}
