"""Learned nucleus centres, hematoxylin outlines: the CPU backend for real H&E (`segmentation.backend: unet`).

The classical watershed (dirl.segment.watershed) finds nuclei as dark hematoxylin blobs, so it misses the
large pale (vesicular) nuclei of epithelium and runs crowded ones together. Here a small U-Net (~210 k
weights, four scales) looks at the tile at 0.5 µm/px and paints a map of nucleus *centres* (a Gaussian of
1 µm around each); its local maxima above `centre_threshold`, at least `centre_spacing_um` apart, are the
nuclei. Each nucleus's outline is the hematoxylin foreground of the watershed backend (same settings),
shared between centres by proximity (a watershed of the distance to the nearest centre) and limited to
`reach_um` from its centre; a centre the foreground misses (a pale nucleus) keeps a core disc of
`core_um`. Foreground with no centre (debris, fibres, fragments) is dropped.

The shipped weights (`models/unet_crc.npz`) were trained on the 70 training images of CRCHistoPhenotypes
(Sirinukunwattana et al. 2016, research use; 15,533 expert centres) by `python -m dirl.segment.unet_train`,
which also validates by image and records the figures in the file (`describe`). Train your own on typed
or untyped points of your tissue with the same command and name the file in `segmentation.weights`.

Measured by image on those 70 images against the watershed, same run (bench/NUCLEI.md): expert centres
inside a nucleus 0.944 vs 0.812 (epithelial 0.923 vs 0.731), nuclei holding two centres 1.3 % vs 5.0 %;
on 13 MoNuSeg images of other organs, detection F1 at IoU 0.5 0.587 vs 0.532; 2.3-3.2x the time.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dirl.errors import ConfigError
from dirl.runtime import fold_batchnorm
from dirl.segment.base import Backend
from dirl.segment.watershed import ForegroundParams, foreground
from dirl.settings import bounded

NET_MPP = 0.5  # the network sees tiles at this pixel size (20x), whatever the slide's
SHIPPED = Path(__file__).with_name("models") / "unet_crc.npz"
WIDTH = 16  # channels of the first scale (then 32, 64, 64): ~210 k weights
CHUNK = 2  # tiles per forward pass: small batches stay in the CPU caches (16 ran at 0.6x the speed)


@dataclasses.dataclass(frozen=True)
class UNetParams(ForegroundParams):
    weights: str = ""  # U-Net weights (.npz by python -m dirl.segment.unet_train); empty: the shipped CRC model
    centre_threshold: float = bounded(0.5, gt=0, lt=1)  # a centre map's local maximum above this is a nucleus
    centre_spacing_um: float = bounded(2.5, gt=0)  # two centres at least this far apart
    reach_um: float = bounded(7.0, gt=0)  # a nucleus's outline stays within this of its centre
    core_um: float = bounded(2.0, ge=0)  # disc kept around a centre the hematoxylin foreground misses


def network(width: int = WIDTH):
    """The U-Net: two 3x3 conv-BN-ReLU per scale, four scales (1, 1/2, 1/4, 1/8), nearest upsampling, skips."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
            nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
        )  # fmt: skip

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = width
            self.e1, self.e2, self.e3, self.e4 = block(3, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w)
            self.d3, self.d2, self.d1 = block(8 * w, 2 * w), block(4 * w, w), block(2 * w, w)
            self.head = nn.Conv2d(w, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # logits of the centre map
            e1 = self.e1(x)
            e2 = self.e2(F.max_pool2d(e1, 2))
            e3 = self.e3(F.max_pool2d(e2, 2))
            e4 = self.e4(F.max_pool2d(e3, 2))

            def up(a: torch.Tensor) -> torch.Tensor:
                return F.interpolate(a, scale_factor=2, mode="nearest")

            d3 = self.d3(torch.cat([up(e4), e3], 1))
            d2 = self.d2(torch.cat([up(d3), e2], 1))
            return self.head(self.d1(torch.cat([up(d2), e1], 1)))

    return UNet()


def as_input(rgb: np.ndarray):
    """(B, H, W, 3) uint8 or float RGB -> the network's (B, 3, H, W) float input."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb, np.float32)).permute(0, 3, 1, 2).div_(255).sub_(0.5)


def save(net: Any, path: str | Path, meta: dict[str, Any]) -> None:
    """Weights as float32 arrays named by the state dict, plus `meta` (JSON) with the network's width and
    pixel size added: an .npz readable without pickle."""
    arrays = {k: v.detach().float().numpy() for k, v in net.state_dict().items() if v.dtype.is_floating_point}
    meta = {"width": net.e1[0].out_channels, "mpp": NET_MPP, **meta}
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays, __meta__=np.array(json.dumps(meta)))


def weights_file(setting: str) -> Path:
    """The weights file `segmentation.weights` names (empty: the shipped one), checked to be a dirl weights
    file without loading torch (the workflow checks it at start-up; the job checks the shapes)."""
    path = Path(setting) if setting else SHIPPED
    if not path.is_file():
        raise ConfigError(f"segmentation.weights {str(path)!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            json.loads(str(z["__meta__"]))["width"]
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ConfigError(f"segmentation.weights {str(path)!r}: not U-Net weights written by dirl ({e})") from e
    return path


def load(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(eval-mode network, meta) of a weights file written by `save`; a bad file is one ConfigError line."""
    import torch

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
        net = network(int(meta["width"]))
        state = net.state_dict()
        missing = [k for k, v in state.items() if v.dtype.is_floating_point and k not in arrays]
        if missing or set(arrays) - set(state):
            raise ValueError(f"weights do not fit the network (missing {missing[:3]})")
        for k, v in arrays.items():
            if tuple(v.shape) != tuple(state[k].shape):
                raise ValueError(f"{k} has shape {v.shape}, the network {tuple(state[k].shape)}")
            state[k] = torch.from_numpy(v.copy())
        net.load_state_dict(state)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ConfigError(f"segmentation.weights {str(path)!r}: not U-Net weights written by dirl ({e})") from e
    return net.eval(), meta


def centre_maps(net: Any, tiles: np.ndarray) -> np.ndarray:
    """Centre probability maps (B, H, W) float32 of RGB uint8 tiles at NET_MPP."""
    import torch

    b, h, w = tiles.shape[:3]
    ph, pw = -h % 8, -w % 8  # three poolings
    out = np.empty((b, h, w), np.float32)
    with torch.inference_mode():
        for s in range(0, b, CHUNK):
            x = tiles[s : s + CHUNK]
            if ph or pw:
                x = np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
            out[s : s + CHUNK] = torch.sigmoid(net(as_input(x)))[:, 0, :h, :w].numpy()
    return out


def centres(prob: np.ndarray, threshold: float, spacing_px: int) -> np.ndarray:
    """(n, 2) int (row, col) of the centre map's local maxima above `threshold`, `spacing_px` apart."""
    from skimage.feature import peak_local_max

    return peak_local_max(prob, min_distance=max(1, spacing_px), threshold_abs=threshold, exclude_border=False)


def instances(rgb: np.ndarray, prob: np.ndarray, mpp: float, p: UNetParams) -> np.ndarray:
    """Instance labels (T, T) int32 of one tile from its centre map (same grid as the tile)."""
    from scipy import ndimage
    from skimage.segmentation import watershed

    peaks = centres(prob, p.centre_threshold, round(p.centre_spacing_um / mpp))
    if not len(peaks):
        return np.zeros(prob.shape, np.int32)
    markers = np.zeros(prob.shape, np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    near = ndimage.distance_transform_edt(markers == 0).astype(np.float32)  # to the nearest centre, px
    fg, _ = foreground(rgb, mpp, p)
    mask = (fg & (near <= p.reach_um / mpp)) | (near <= p.core_um / mpp)
    # flooding the distance to the nearest centre splits touching nuclei half-way between their centres
    return watershed(near, markers, mask=mask).astype(np.int32, copy=False)


class UNetBackend(Backend):
    name = "unet"
    Params = UNetParams

    def __init__(self, params: UNetParams):
        super().__init__(params)
        import torch

        self._path = weights_file(params.weights)
        net, self.meta = load(self._path)
        self.net = fold_batchnorm(net)
        torch.set_num_threads(max(1, params.threads))
        self._pool = ThreadPoolExecutor(max(1, params.threads))

    @property
    def model(self) -> str:
        return f"unet-centres:{self._path.name}"

    def predict(self, tiles: np.ndarray, mpp: float) -> np.ndarray:
        import cv2

        n, t = tiles.shape[:2]
        side = max(8, round(t * mpp / NET_MPP))
        same = abs(side - t) <= 1
        shrink = cv2.INTER_AREA if side < t else cv2.INTER_LINEAR  # AREA enlarges like NEAREST
        seen = tiles if same else np.stack([cv2.resize(x, (side, side), interpolation=shrink) for x in tiles])
        prob = centre_maps(self.net, seen)
        if not same:  # back to the tile's grid: centres are found where the outlines are drawn
            prob = np.stack([cv2.resize(m, (t, t), interpolation=cv2.INTER_LINEAR) for m in prob])
        out = np.zeros((n, t, t), np.int32)

        def one(i: int) -> None:
            out[i] = instances(tiles[i], prob[i], mpp, self.params)

        list(self._pool.map(one, range(n)))
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weights": {k: v for k, v in self.meta.items() if k != "history"}}

    def close(self) -> None:
        self._pool.shutdown()
