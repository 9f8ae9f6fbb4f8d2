"""Open whole-slide images with OpenSlide: resolution, pyramid level choice and region reads.

Resolution (µm/px) comes from OpenSlide's `openslide.mpp-x/y`, then the TIFF resolution tags, then the
sample sheet's `mpp` column. A slide with none of these is an error that names the slide and the
column to fill: a guessed resolution silently rescales every tile of a cohort.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dirl.errors import SlideError

log = logging.getLogger(__name__)

MPP_RANGE = (0.05, 100.0)  # µm/px; outside it the metadata is wrong (or in the wrong unit)
_UNIT_UM = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}


def _metadata_mpp(props: dict[str, str]) -> tuple[float, str] | None:
    """µm/px from OpenSlide's standard property, else from the TIFF resolution tags."""
    if "openslide.mpp-x" in props:
        mx = float(props["openslide.mpp-x"])
        my = float(props.get("openslide.mpp-y", mx))
        if not math.isclose(mx, my, rel_tol=0.02):
            log.warning("non-square pixels (%.4f x %.4f µm/px): using their mean", mx, my)
        return (mx + my) / 2, "openslide.mpp"
    unit = props.get("tiff.ResolutionUnit", "").lower()
    if "tiff.XResolution" in props and unit in _UNIT_UM:
        res = float(props["tiff.XResolution"])  # pixels per unit
        if res > 0:
            return _UNIT_UM[unit] / res, f"tiff.XResolution ({unit})"
    return None


def _compression_error(sid: str, path: Path, e: Exception) -> SlideError:
    return SlideError(
        f"slide {sid!r}: {path} uses a compression OpenSlide cannot decode ({e}); convert "
        "it, e.g. `vips tiffsave IN OUT.tiff --tile --pyramid --compression jpeg`"
    )


@dataclass
class Slide:
    """A whole-slide image with a known resolution. Thread-safe for reads (OpenSlide is)."""

    path: Path
    slide_id: str
    mpp: float
    mpp_source: str
    _osr: object

    @classmethod
    def open(cls, path: str | Path, slide_id: str | None = None, mpp: float | None = None) -> Slide:
        """Open `path`; `mpp` (from the sample sheet) is used when the slide has no resolution."""
        import openslide

        path = Path(path)
        sid = slide_id or path.stem
        if not path.exists():
            raise SlideError(f"slide {sid!r}: file not found: {path} (check the path column of the sample sheet)")
        try:
            osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise SlideError(
                f"slide {sid!r}: {path} is not a slide OpenSlide can read (unsupported or corrupt file: {e})"
            ) from e
        except openslide.OpenSlideError as e:
            if "Unsupported TIFF compression" in str(e):
                raise _compression_error(sid, path, e) from e
            raise SlideError(f"slide {sid!r}: OpenSlide cannot open {path}: {e}") from e
        found = _metadata_mpp(dict(osr.properties))
        if found is not None and mpp is not None and not MPP_RANGE[0] <= found[0] <= MPP_RANGE[1]:
            log.warning(
                "slide %r: its metadata claims %.4g µm/px (%s), outside %s..%s; using the sample sheet's %.4g",
                sid,
                found[0],
                found[1],
                MPP_RANGE[0],
                MPP_RANGE[1],
                mpp,
            )
            found = None
        if found is not None:
            value, source = found
            if mpp is not None and not math.isclose(mpp, value, rel_tol=0.05):
                log.warning(
                    "slide %r: sample sheet mpp %.4g differs from the slide's %.4g (%s); using the slide's",
                    sid,
                    mpp,
                    value,
                    source,
                )
        elif mpp is not None:
            value, source = float(mpp), "sample sheet"
        else:
            osr.close()
            raise SlideError(
                f"slide {sid!r}: {path} has no resolution (µm/px) in its metadata; "
                "give it in the `mpp` column of the sample sheet"
            )
        if not MPP_RANGE[0] <= value <= MPP_RANGE[1]:
            osr.close()
            raise SlideError(
                f"slide {sid!r}: resolution {value:g} µm/px (from {source}) is outside "
                f"{MPP_RANGE[0]}..{MPP_RANGE[1]}: fix the metadata or set `mpp` in the sample sheet"
            )
        slide = cls(path, sid, value, source, osr)
        # Decode one pixel now: a slide whose compression OpenSlide cannot decode opens fine and would
        # otherwise fail only later, in the middle of tiling.
        slide.read(0, 0, len(slide.level_downsamples) - 1, 1, 1)
        return slide

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(self._osr.dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._osr.level_downsamples)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._osr.level_dimensions)

    @property
    def vendor(self) -> str:
        return str(self._osr.properties.get("openslide.vendor", "unknown"))

    @property
    def objective_power(self) -> float | None:
        """The scan's objective magnification (`openslide.objective-power`), if the slide says."""
        try:
            return float(self._osr.properties["openslide.objective-power"])
        except (KeyError, ValueError):
            return None

    def best_level(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as `downsample` (1 % tolerance, since
        pyramid downsamples are rarely exact: 2.0003 must count as 2)."""
        levels = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01]
        return max(levels, default=0)

    def read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at `level`, top-left (x, y) in level-0 pixels. Pixels outside the
        scanned area (transparent in OpenSlide) come back white, like glass."""
        try:
            img = self._osr.read_region((int(x), int(y)), level, (int(w), int(h)))
        except Exception as e:  # OpenSlideError, or a decoder error for a damaged tile
            if "Unsupported TIFF compression" in str(e):
                raise _compression_error(self.slide_id, self.path, e) from e
            raise SlideError(
                f"slide {self.slide_id!r}: reading {w}x{h} px at level {level}, ({x}, {y}) "
                f"failed: {e}. The file is damaged; re-export or exclude it"
            ) from e
        import cv2

        rgba = np.asarray(img)
        # OpenCV's SIMD conversion: 4x faster than PIL's getextrema + convert, which cost a fifth of
        # the tiling loop. OpenSlide premultiplies: alpha 0 means "no data", shown as glass.
        rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
        alpha = rgba[..., 3]
        if alpha.min() < 255:
            rgb[alpha == 0] = 255
        return rgb

    def thumbnail(self, mpp: float, max_px: int = 2048, threads: int = 2) -> tuple[np.ndarray, float]:
        """Whole-slide RGB image at about `mpp` µm/px (coarser if its longest side would exceed
        `max_px`). Returns the image and its µm/px. Reads strip by strip, so a single-level
        100 000 px slide never sits in memory whole."""
        from PIL import Image

        w0, h0 = self.dimensions
        mpp = max(mpp, self.mpp * max(w0, h0) / max_px)
        ds = mpp / self.mpp  # level-0 pixels per thumbnail pixel
        out_w, out_h = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        level = self.best_level(ds)
        lds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # whole thumbnail rows per strip, ~2 Mpx (8 MB of RGBA) of level pixels, read on `threads`
        # threads (OpenSlide and PIL's resize release the GIL): ~1.3x faster thumbnails on 2 cores
        rows_per_strip = max(1, int(2e6 / max(lw, 1) / (ds / lds)))

        def strip(r0: int) -> np.ndarray:
            r1 = min(out_h, r0 + rows_per_strip)
            y0, y1 = round(r0 * ds), min(h0, round(r1 * ds))
            ly0, ly1 = int(y0 / lds), max(int(y0 / lds) + 1, min(lh, round(y1 / lds)))
            region = self.read(0, y0, level, lw, ly1 - ly0)
            return np.asarray(Image.fromarray(region).resize((out_w, r1 - r0), Image.Resampling.BOX))

        with ThreadPoolExecutor(max(1, threads)) as pool:
            return np.concatenate(list(pool.map(strip, range(0, out_h, rows_per_strip))), axis=0), mpp
