"""Bags for MIL: the sample sheet's labels and patients, and each slide's tile features.

A bag is one slide: its (N, D) feature matrix from `features/{method}/{slide}.h5` and its class index.
Bags keep their natural size (no padding). They are held in memory when the cohort fits in
`memory_gb`, else read from disk per step (an HDF5 read of a 20 000 x 768 bag is ~60 MB, tens of ms).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dirl import store
from dirl.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Cohort:
    """Labelled slides of a sample sheet, in sheet order."""

    slide_ids: list[str]
    patient_ids: list[str]
    labels: list[str]  # class name per slide
    classes: list[str]  # sorted class names; class index = position here

    @property
    def y(self) -> np.ndarray:
        idx = {c: i for i, c in enumerate(self.classes)}
        return np.array([idx[label] for label in self.labels], dtype=np.int64)

    def subset(self, keep: list[str]) -> Cohort:
        pos = {s: i for i, s in enumerate(self.slide_ids)}
        ii = [pos[s] for s in keep]
        return Cohort(
            [self.slide_ids[i] for i in ii],
            [self.patient_ids[i] for i in ii],
            [self.labels[i] for i in ii],
            self.classes,
        )


def read_sample_sheet(path: str | Path) -> Cohort:
    """The labelled slides of a sample sheet (`dirl.samples` parses and checks it). Unlabelled rows
    (pretraining only) are left out and counted in the log."""
    from dirl.samples import labelled, read_samples

    samples = read_samples(path)
    lab = labelled(samples)
    if len(lab) < len(samples):
        rest = [s.slide_id for s in samples if s.label is None]
        log.warning("%d slide(s) without a label are left out of MIL: %s", len(rest), ", ".join(rest[:10]))
    if not lab:
        raise ConfigError(f"sample sheet {path} has no labelled slides (column 'label')")
    classes = sorted({s.label for s in lab})
    if len(classes) < 2:
        raise ConfigError(f"sample sheet {path}: MIL needs at least two classes, found {classes}")
    return Cohort([s.slide_id for s in lab], [s.patient_id for s in lab], [s.label for s in lab], classes)


@dataclass
class Bags:
    """Feature matrices of a cohort's slides, in memory or read on demand."""

    paths: dict[str, Path]
    n_tiles: dict[str, int]
    dim: int
    encoder: str
    _cache: dict[str, np.ndarray] = field(default_factory=dict)

    def features(self, slide_id: str) -> np.ndarray:
        x = self._cache.get(slide_id)
        if x is None:
            x, _, _ = store.read_features(self.paths[slide_id])
        return x

    def coords(self, slide_id: str) -> np.ndarray:
        return store.read_features(self.paths[slide_id])[1]

    def preload(self, slide_ids: list[str], memory_gb: float) -> bool:
        slide_ids = [s for s in slide_ids if s in self.paths]
        need = sum(self.n_tiles[s] for s in slide_ids) * self.dim * 4 / 2**30
        if need > memory_gb:
            log.info("bags need %.1f GB > %.1f GB: read from disk each step", need, memory_gb)
            return False
        for s in slide_ids:
            if s not in self._cache:
                self._cache[s] = store.read_features(self.paths[s])[0]
        return True


def open_bags(features_dir: str | Path, slide_ids: list[str]) -> tuple[Bags, list[str]]:
    """Check every slide's feature file; return the bags and the slides left out (no tiles).

    A missing file is an error (run extract first); files from different encoders or dimensions in one
    directory are an error (a mixed cohort is never what was meant)."""
    features_dir = Path(features_dir)
    paths, n_tiles, empty, missing = {}, {}, [], []
    dims, encoders = {}, {}
    for s in slide_ids:
        p = features_dir / f"{s}.h5"
        if not p.exists():
            missing.append(s)
            continue
        try:
            shape = store.feature_shape(p)
            enc = shape[2] or ""
        except OSError as e:
            raise ConfigError(f"feature file {p} cannot be read ({e}); delete it and rerun extract") from e
        if shape[0] == 0:
            empty.append(s)
            continue
        paths[s], n_tiles[s] = p, int(shape[0])
        dims.setdefault(int(shape[1]), s)
        encoders.setdefault(str(enc), s)
    if missing:
        raise ConfigError(
            f"{len(missing)} slide(s) of the sample sheet have no feature file in "
            f"{features_dir}: {', '.join(missing[:10])}; run `dirl extract` for them"
        )
    if len(dims) > 1 or len(encoders) > 1:
        raise ConfigError(
            f"{features_dir} mixes feature files of different encoders/dimensions "
            f"({dict(list(encoders.items())[:3])}, dims {sorted(dims)}); re-extract them"
        )
    if empty:
        log.warning("%d slide(s) have no tiles and are left out of MIL: %s", len(empty), ", ".join(empty))
    if not paths:
        raise ConfigError(f"no slide in {features_dir} has any tiles")
    return Bags(paths, n_tiles, next(iter(dims)), next(iter(encoders))), empty
