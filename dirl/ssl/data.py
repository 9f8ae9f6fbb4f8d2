"""The pretraining dataset: every tile of a cohort's `tiles/{slide}.zarr`, with its row-aligned prior map
from `priors/{slide}.zarr`, read at random (one inner chunk per tile from the sharded arrays).

Nothing is loaded up front except per-slide tile counts; each DataLoader worker opens the stores it needs
once, lazily, and keeps the handles. Items are addressed by (epoch, index) so that the views of a tile
are a pure function of (seed, epoch, index) whatever worker or rank draws them (`EpochBatchSampler`
hands out those pairs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dirl import store
from dirl.errors import DirlError, StoreError
from dirl.ssl.augment import ViewSpec, make_view, overlap_occupancy, view_rng
from dirl.ssl.losses import token_occupancy


@dataclass(frozen=True)
class ViewConfig:
    """The views drawn per tile (DINO's recipe: view 1 always blurred, view 2 rarely blurred and
    optionally solarised; local crops half the time blurred). `color_jitter` scales DINO's colour
    jitter strengths (brightness and contrast 0.4, saturation 0.2, hue 0.1)."""

    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_number: int = 0
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    solarize_p: float = 0.0
    hed_sigma: float = 0.05
    color_jitter: float = 1.0
    photometric: bool = True

    @classmethod
    def from_settings(cls, s) -> ViewConfig:
        """From `PretrainSettings`."""
        return cls(
            global_size=s.img_size,
            global_scale=s.global_scale,
            local_number=s.local_crops_number,
            local_size=s.local_crop_size,
            local_scale=s.local_crop_scale,
            solarize_p=s.solarize_p,
            hed_sigma=s.hed_sigma,
            color_jitter=s.color_jitter,
        )

    def specs(self) -> tuple[ViewSpec, ViewSpec, ViewSpec]:
        j = self.color_jitter
        colour = {
            "brightness": 0.4 * j,
            "contrast": 0.4 * j,
            "saturation": 0.2 * j,
            "hue": 0.1 * j,
            "hed_sigma": self.hed_sigma,
        }
        g1 = ViewSpec(self.global_size, self.global_scale, blur_p=1.0, **colour)
        g2 = ViewSpec(self.global_size, self.global_scale, blur_p=0.1, solarize_p=self.solarize_p, **colour)
        loc = ViewSpec(self.local_size, self.local_scale, blur_p=0.5, **colour)
        return g1, g2, loc


def read_n_classes(priors_path: str | os.PathLike) -> int | None:
    """`n_classes` (C = K + 2) from a priors store's attributes, or None if it does not say."""
    n = store.map_attrs(priors_path, "priors").get("n_classes")
    return int(n) if n is not None else None


def resolve_n_classes(priors: Sequence[str | os.PathLike], given: int | None) -> int:
    """C from the stores (they must agree), else from `given` (--n-classes); a disagreement is an error."""
    found = {str(p): read_n_classes(p) for p in priors}
    values = {v for v in found.values() if v is not None}
    if len(values) > 1:
        raise StoreError(
            f"priors stores disagree on n_classes: {found}; rerun the priors stage so that "
            "one cohort-level phenotype model paints them all"
        )
    if values:
        n = values.pop()
        if given is not None and given != n:
            raise DirlError(f"--n-classes {given} but the priors stores say n_classes = {n}")
        return n
    if given is None:
        raise StoreError(
            "the priors stores do not record n_classes; pass --n-classes (= number of cell "
            "classes + 2: background and non-nuclear tissue)"
        )
    return int(given)


class CohortDataset(torch.utils.data.Dataset):
    """All tiles of a cohort, or at most `tiles_per_slide` per slide: the fixed subset of `store.tile_subset`
    (seeded by the slide id), the tiles segmentation and the priors cover under that cap.

    `__getitem__((epoch, index))` returns
      global   float32 (2, 3, S, S)   normalised global views
      local    float32 (L, 3, s, s)   local crops (L may be 0)
      occupancy float32 (2, N, C)     prior class fraction of every token of each global view
      overlap  float32 (2, N)         fraction of each token inside the region both global views share
      geometry int64 (2, 7)           crop box (top, left, h, w) in tile px, hflip, vflip, rot90
      index    int64                  the dataset index
    """

    def __init__(
        self,
        tiles: Sequence[str | os.PathLike],
        priors: Sequence[str | os.PathLike] | None,
        n_classes: int | None,
        patch: int,
        views: ViewConfig,
        seed: int = 0,
        tiles_per_slide: int | None = None,
    ):
        if priors is not None and len(priors) != len(tiles):
            raise DirlError(
                f"{len(tiles)} tile stores but {len(priors)} priors stores: give one priors "
                "store per tile store, in the same order"
            )
        if not tiles:
            raise DirlError("no tile stores given")
        if views.global_size % patch:
            raise DirlError(f"global crop size {views.global_size} is not a multiple of the patch size {patch}")
        self.tiles = [Path(t) for t in tiles]
        self.priors = [Path(p) for p in priors] if priors is not None else None
        self.n_classes, self.patch, self.views, self.seed = n_classes, patch, views, seed
        self.specs = views.specs()
        self.slide_ids: list[str] = []
        self.counts: list[int] = []
        self.write_ids: list[list[str | None]] = []  # of each tile store and its priors store
        rows = []
        for i, t in enumerate(self.tiles):  # metadata only; handles are opened per worker
            ts = store.open_tiles(t)
            n = len(ts)
            keep = store.tile_subset(n, tiles_per_slide or 0, ts.slide_id)
            if self.priors is not None:
                store.open_map(self.priors[i], "priors", n)  # row alignment check
                painted = store.map_attrs(self.priors[i], "priors").get("rows")
                if painted is not None and not np.array_equal(painted, keep):
                    raise StoreError(
                        f"{self.priors[i]} holds priors for {len(painted)} of {n} tiles, not the {len(keep)} "
                        f"pretrain.tiles_per_slide = {tiles_per_slide or 0} selects: rerun segment and priors"
                    )
            self.slide_ids.append(ts.slide_id)
            self.counts.append(n)
            self.write_ids.append(
                [ts.attrs.get(store.WRITE_ID)]
                + ([store.write_id(self.priors[i], "priors")] if self.priors is not None else [])
            )
            rows.append(np.stack([np.full(len(keep), i), keep], 1))
        self.rows = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)
        self._pid: int | None = None
        self._open: dict[int, tuple[object, object]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def signature(self) -> list[list]:
        """What a checkpoint must agree with: slide ids, tile counts and the write ids of the tile and
        priors stores, in order (a store written again, after a setting of its stage changed, has a new id:
        a checkpoint of the old one is not resumed)."""
        return [[s, n, *w] for s, n, w in zip(self.slide_ids, self.counts, self.write_ids)]

    def _handles(self, slide: int) -> tuple[object, object]:
        if self._pid != os.getpid():  # first use in this (worker) process: no inherited handles
            self._pid, self._open = os.getpid(), {}
        h = self._open.get(slide)
        if h is None:
            ts = store.open_tiles(self.tiles[slide])
            pm = store.open_map(self.priors[slide], "priors", len(ts)) if self.priors is not None else None
            h = self._open[slide] = (ts, pm)
        return h

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        slide, row = (int(v) for v in self.rows[index])
        tiles, priors = self._handles(slide)
        img = tiles.tile(row)
        prior = np.asarray(priors[row]) if priors is not None else None
        if prior is not None and self.n_classes is not None and prior.size and prior.max() >= self.n_classes:
            raise StoreError(
                f"{self.priors[slide]} row {row} has class {int(prior.max())} but n_classes = {self.n_classes}"
            )
        return img, prior

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img, prior = self.read(index)
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # (3, T, T) uint8
        pmap = torch.from_numpy(np.ascontiguousarray(prior)) if prior is not None else None
        g1, g2, loc = self.specs
        ph = self.views.photometric
        v1, p1, geo1 = make_view(image, pmap, view_rng(self.seed, epoch, index, 0), g1, ph)
        v2, p2, geo2 = make_view(image, pmap, view_rng(self.seed, epoch, index, 1), g2, ph)
        item = {
            "global": torch.stack([v1, v2]),
            "geometry": torch.stack([geo1.as_tensor(), geo2.as_tensor()]),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        locs = [
            make_view(image, None, view_rng(self.seed, epoch, index, 2 + j), loc, ph)[0]
            for j in range(self.views.local_number)
        ]
        item["local"] = torch.stack(locs) if locs else torch.zeros(0, 3, self.views.local_size, self.views.local_size)
        if pmap is not None and self.n_classes is not None:
            item["occupancy"] = token_occupancy(torch.stack([p1, p2]), self.n_classes, self.patch)
            item["overlap"] = torch.stack(
                [overlap_occupancy(geo1, geo2, g1.size, self.patch), overlap_occupancy(geo2, geo1, g2.size, self.patch)]
            )
        return item


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (epoch, index) for one rank. The epoch's order is a permutation seeded by
    (seed, epoch); it is cut into global batches of `global_batch` (the incomplete last one is dropped)
    and rank r takes items r, r + world, ... of each, so the union over ranks of a step's batches is
    the single-process batch. `set_epoch(epoch, start_batch)` resumes mid-epoch."""

    def __init__(self, n: int, global_batch: int, world: int = 1, rank: int = 0, seed: int = 0):
        if global_batch % world:
            raise DirlError(f"batch size {global_batch} is not divisible by the {world} processes")
        if n < global_batch:
            raise DirlError(
                f"the cohort has {n} tiles, fewer than one batch of {global_batch}: lower "
                "pretrain.batch_size or add slides"
            )
        self.n, self.global_batch, self.world, self.rank, self.seed = n, global_batch, world, rank, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(self.epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start, self.batches_per_epoch()):
            chunk = perm[b * self.global_batch : (b + 1) * self.global_batch]
            yield [(self.epoch, i) for i in chunk[self.rank :: self.world]]
