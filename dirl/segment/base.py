"""The segmentation-backend interface and registry.

A backend turns a block of RGB tiles into instance label images; everything else (size filters in µm²,
consecutive ids, the per-nucleus table, the store) is shared. A new backend is one file:

    class MyBackend(Backend):
        name = "mine"
        Params = MyParams            # a frozen dataclass; its fields become `parameters` in the store

        def predict(self, tiles, mpp):      # (B, T, T, 3) uint8 -> (B, T, T) ints, 0 = background
            ...

plus one line in `BACKENDS` below (or pass "package.module:Class" as the backend name). Backends that
can overlap work across blocks (a GPU network and CPU post-processing) override `stream`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import numpy as np

from dirl.errors import ConfigError
from dirl.settings import bounded

# name -> "module:Class"; imported only when chosen (the cellpose backend pulls torch).
BACKENDS: dict[str, str] = {
    "watershed": "dirl.segment.watershed:WatershedBackend",
    "unet": "dirl.segment.unet:UNetBackend",
    "cellpose": "dirl.segment.cellpose_backend:CellposeBackend",
    "import": "dirl.segment.imported:ImportBackend",
}


@dataclasses.dataclass(frozen=True)
class CommonParams:
    """Parameters every backend has. Areas are in µm² so the defaults mean the same at any
    resolution (QuPath's cell detection uses 10 and 400 µm²)."""

    min_area_um2: float = bounded(10.0, ge=0)
    max_area_um2: float = bounded(400.0, gt=0)
    threads: int = 2


class Backend:
    name: ClassVar[str] = ""
    Params: ClassVar[type] = CommonParams

    def __init__(self, params: Any):
        self.params = params

    # -- what a backend implements
    def predict(self, tiles: np.ndarray, mpp: float) -> np.ndarray:
        """Raw instance labels (B, T, T) for RGB uint8 tiles (B, T, T, 3) at `mpp` µm/px."""
        raise NotImplementedError

    # -- typed nuclei (the import backend); the others have no types and read no per-slide file
    type_names: list[str] | None = None

    def bind(self, nuclei: Any, tiles: Any, rows: np.ndarray) -> None:
        """Take the slide's own input before its tiles stream in: `nuclei` (a file of typed nuclei), the tile
        store and the rows to be segmented. Only the import backend reads a nuclei file."""
        if nuclei is not None:
            raise ConfigError(f"--nuclei {nuclei}: only segmentation.backend import reads a nuclei file")

    def types_of(self, position: int) -> np.ndarray | None:
        """The type (index into `type_names`) of each label of the `position`-th tile streamed, or None."""
        return None

    @property
    def model(self) -> str:
        """What produced the masks (weights path, or the algorithm), recorded in the store."""
        return self.name

    # -- shared
    def stream(self, blocks: Iterable[np.ndarray], mpp: float) -> Iterator[np.ndarray]:
        """Clean labels for each block, in order. Override to overlap work across blocks."""
        for block in blocks:
            yield self.finish(self.predict(block, mpp), mpp)

    def segment(self, tiles: np.ndarray, mpp: float) -> np.ndarray:
        """Clean uint32 labels (B, T, T): ids 1..n per tile, objects outside the area range removed."""
        return next(iter(self.stream([tiles], mpp)))

    def finish(self, labels: np.ndarray, mpp: float) -> np.ndarray:
        out = np.empty(labels.shape, dtype=np.uint32)
        for i in range(len(labels)):
            out[i] = filter_relabel(labels[i], mpp, self.params.min_area_um2, self.params.max_area_um2)
        return out

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model, "parameters": dataclasses.asdict(self.params)}

    def close(self) -> None:
        pass

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def filter_relabel(labels: np.ndarray, mpp: float, min_area_um2: float, max_area_um2: float) -> np.ndarray:
    """Drop objects whose area is outside [min, max] µm²; renumber the rest 1..n in raster order of
    their first pixel. Returns uint32."""
    lab = np.asarray(labels)
    if lab.size == 0 or lab.max() == 0:
        return np.zeros(lab.shape, dtype=np.uint32)
    flat = lab.ravel().astype(np.int64, copy=False)
    ids, first, counts = np.unique(flat, return_index=True, return_counts=True)
    area = counts * mpp * mpp
    keep = (ids > 0) & (area >= min_area_um2) & (area <= max_area_um2)
    kept, kept_first = ids[keep], first[keep]
    order = np.argsort(kept_first, kind="stable")
    new = np.zeros(len(ids), dtype=np.uint32)
    ranks = np.empty(len(kept), dtype=np.uint32)
    ranks[order] = np.arange(1, len(kept) + 1, dtype=np.uint32)
    new[keep] = ranks
    return new[np.searchsorted(ids, flat)].reshape(lab.shape)


def backend_class(name: str) -> type[Backend]:
    target = BACKENDS.get(name, name if ":" in name else None)
    if target is None:
        raise ConfigError(
            f"unknown segmentation.backend {name!r}: choose one of {sorted(BACKENDS)} or give 'package.module:Class'"
        )
    mod, _, cls = target.partition(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"segmentation backend {name!r} ({target}) cannot be loaded: {e}") from e


def create(name: str, options: Mapping[str, Any] | None = None) -> Backend:
    """Instantiate backend `name` from a flat options mapping; options that belong to other backends
    are ignored (one flat CLI/config namespace serves every backend)."""
    cls = backend_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    opts = {k: v for k, v in (options or {}).items() if k in fields and v is not None}
    return cls(cls.Params(**opts))
