"""Cellpose 4 (Cellpose-SAM) nuclei, batched on the GPU with CPU post-processing overlapped.

`CellposeModel.eval` runs the network and then, image after image, the flow dynamics that turn flows
into masks — and the dynamics, not the network, are most of the time on a GPU. Here the two are
pipelined: the network runs on a chunk of tiles (`net_tiles`) while a thread pool (`threads`) computes
the masks of the chunk before, tile by tile, with the same Cellpose functions `eval` calls
(`transforms.normalize_img`, `core.run_net`, `transforms.resize_image`,
`dynamics.resize_and_compute_masks`), so the masks are the ones `eval` gives for the same tile
(tests/test_segment_cellpose.py checks it).

Resolution: Cellpose-SAM works at ~30 px cell diameter; `eval(diameter=d)` rescales by 30 / d.
`diameter_um` is the nucleus diameter in µm, converted with the tile µm/px (d = diameter_um / mpp);
0 disables rescaling.

Weights: `model` is a Cellpose model name (cpsam, cpsam_v2, ...; looked up in Cellpose's model folder,
`CELLPOSE_LOCAL_MODELS_PATH` or ~/.cellpose/models) or a path to a weights file. Missing weights are
downloaded by Cellpose when allowed (`download`); otherwise, or when the download fails, start-up stops
with a message that says where to put the file. An unknown name is an error: never a silent switch to
another model or backend (Cellpose itself falls back to its default model).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dirl.errors import ConfigError, DirlError
from dirl.segment.base import Backend, CommonParams, filter_relabel
from dirl.settings import bounded

log = logging.getLogger(__name__)

CELLPOSE_DIAMETER_PX = 30.0  # the cell diameter Cellpose-SAM's eval rescales to
BSIZE = 256  # Cellpose-SAM's network input size (fixed)


@dataclasses.dataclass(frozen=True)
class CellposeParams(CommonParams):
    model: str = "cpsam"
    gpu: str = "auto"  # auto | true | false
    batch_size: int = bounded(32, ge=1)  # 256x256 network patches per forward pass
    diameter_um: float = 8.0  # nucleus diameter, µm; 0 = no rescaling
    flow_threshold: float = bounded(0.4, ge=0)
    cellprob_threshold: float = 0.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    net_tiles: int = bounded(64, ge=1)  # tiles per network call: the unit the pipeline overlaps
    min_size_px: int = bounded(15, ge=0)  # Cellpose's own small-mask filter (eval's default), before µm² filters
    masks_device: str = "auto"  # where the flow dynamics run: auto (the network's device) | cpu
    download: bool = True


def _flag(v: Any) -> str:
    s = str(v).lower()
    if s in ("auto",):
        return "auto"
    if s in ("1", "true", "yes", "on"):
        return "true"
    if s in ("0", "false", "no", "off"):
        return "false"
    raise ConfigError(f"segmentation.gpu must be auto, true or false, got {v!r}")


def resolve_weights(model: str, download: bool = True) -> Path:
    """Path of the weights file for a Cellpose model name or path; downloads only if `download`."""
    p = Path(os.path.expanduser(model))
    if p.is_file():
        return p
    if p.suffix in (".pt", ".pth", ".bin") or os.sep in model or "/" in model:
        raise ConfigError(
            f"Cellpose weights file {p} does not exist: fix segmentation.model "
            "(a file path or a Cellpose model name such as 'cpsam')"
        )
    from cellpose import models

    names = list(models.MODEL_NAMES) + list(models.get_user_models())
    if model not in names:
        raise ConfigError(
            f"unknown Cellpose model {model!r}: segmentation.model must be one of {names} or a path to a weights file"
        )
    target = Path(models.MODEL_DIR) / model
    if target.is_file():
        return target
    url = models._MODEL_URL + model
    hint = (
        f"put the weights file at {target} (download {url} on a machine with internet access; "
        "CELLPOSE_LOCAL_MODELS_PATH sets that folder) or set segmentation.model to the path of the file"
    )
    if not download:
        raise DirlError(f"Cellpose weights {model!r} are not on disk and downloading is off: {hint}")
    try:
        return Path(models.cache_model_path(model))
    except Exception as e:  # network down, proxy, disk full ...
        raise DirlError(f"Cellpose weights {model!r} could not be downloaded ({type(e).__name__}: {e}): {hint}") from e


def diameter_px(diameter_um: float, mpp: float) -> float | None:
    """Nucleus diameter in tile pixels, or None for no rescaling."""
    return diameter_um / mpp if diameter_um and diameter_um > 0 else None


def rescale_factor(diameter_um: float, mpp: float) -> float:
    """The factor Cellpose's eval applies to the image for this diameter (30 / diameter_px)."""
    d = diameter_px(diameter_um, mpp)
    return CELLPOSE_DIAMETER_PX / d if d else 1.0


class CellposeBackend(Backend):
    name = "cellpose"
    Params = CellposeParams

    def __init__(self, params: CellposeParams):
        super().__init__(params)
        import torch

        weights = resolve_weights(params.model, params.download)  # fail before anything heavy
        gpu = _flag(params.gpu)
        has_gpu = torch.cuda.is_available() or (
            getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        )
        if gpu == "true" and not has_gpu:
            raise DirlError(
                "segmentation.gpu is true but torch sees no GPU: set it to auto or false, or "
                "install a CUDA build of torch"
            )
        use_gpu = has_gpu and gpu != "false"
        if params.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"segmentation.precision must be auto, bf16 or fp32, got {params.precision!r}")
        bf16 = params.precision == "bf16" or (params.precision == "auto" and use_gpu)
        from cellpose import models

        try:
            self.cp = models.CellposeModel(gpu=use_gpu, pretrained_model=str(weights), use_bfloat16=bf16)
        except (ValueError, RuntimeError, KeyError) as e:
            raise DirlError(f"{weights} is not a Cellpose 4 weights file ({e}); fix segmentation.model") from e
        self.weights, self.bf16 = weights, bf16
        self.device = self.cp.device
        if params.masks_device not in ("auto", "cpu"):
            raise ConfigError(f"segmentation.masks_device must be auto or cpu, got {params.masks_device!r}")
        self.masks_on = torch.device("cpu") if params.masks_device == "cpu" else self.device
        self._pool = ThreadPoolExecutor(max(1, params.threads))
        self._init_net_batch()
        log.info("cellpose: %s on %s (%s)", weights, self.device, "bf16" if bf16 else "fp32")

    @property
    def model(self) -> str:
        return str(self.weights)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["device"] = str(self.device)
        d["dtype"] = "bfloat16" if self.bf16 else "float32"
        return d

    def _init_net_batch(self) -> None:
        """The network's patches-per-forward, halved on GPU out-of-memory (dirl.oom) for the rest of the
        run; `slide` is set by the caller that knows it (dirl.segment.run)."""
        from dirl.oom import HalvingBatch

        self.net_batch = HalvingBatch(
            max(1, self.params.batch_size),
            what="the Cellpose network",
            setting="segmentation.batch_size (dirl segment --batch-size)",
        )

    # -- the two stages
    def network(self, tiles: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
        """Flows dP (2, B, T, T) and cell probability (B, T, T) at tile size, as eval computes them.

        Out of GPU memory, the same tiles go through the network again with half as many patches per
        forward pass (each patch's output does not depend on the others in its batch)."""
        from cellpose import core, transforms

        x = transforms.normalize_img(np.asarray(tiles, dtype=np.float32), normalize=True, norm3D=False)
        rsz = rescale_factor(self.params.diameter_um, mpp)
        yf, _ = self.net_batch.run(
            lambda bs: core.run_net(
                self.cp.net,
                x,
                bsize=BSIZE,
                augment=False,
                batch_size=bs,
                tile_overlap=0.1,
                rsz=rsz if rsz != 1.0 else None,
            )
        )
        if rsz != 1.0:
            yf = transforms.resize_image(yf, tiles.shape[1], tiles.shape[2])
        return yf[..., -3:-1].transpose((3, 0, 1, 2)), yf[..., -1]

    def masks(self, dP: np.ndarray, cellprob: np.ndarray, mpp: float) -> np.ndarray:
        """Raw Cellpose masks of one tile from its flows (eval's 2-D path, resample=True)."""
        from cellpose import dynamics

        niter = int(200 / rescale_factor(self.params.diameter_um, mpp))
        return dynamics.resize_and_compute_masks(
            dP,
            cellprob,
            niter=niter,
            cellprob_threshold=self.params.cellprob_threshold,
            flow_threshold=self.params.flow_threshold,
            resize=None,
            min_size=self.params.min_size_px,
            max_size_fraction=0.4,
            device=self.masks_on,
        )

    def predict(self, tiles: np.ndarray, mpp: float) -> np.ndarray:
        dP, cellprob = self.network(tiles, mpp)
        return np.stack([self.masks(dP[:, i], cellprob[i], mpp) for i in range(len(tiles))])

    def _post(self, dP: np.ndarray, cellprob: np.ndarray, mpp: float) -> np.ndarray:
        p = self.params
        return filter_relabel(self.masks(dP, cellprob, mpp), mpp, p.min_area_um2, p.max_area_um2)

    def stream(self, blocks: Iterable[np.ndarray], mpp: float) -> Iterator[np.ndarray]:
        """Network on chunk j+1 while the pool turns chunk j's flows into masks; blocks come back in
        order, each once all its tiles are done."""
        inflight: deque[tuple[np.ndarray, list[Future[np.ndarray]]]] = deque()
        step = max(1, self.params.net_tiles)
        for block in blocks:
            futs: list[Future[np.ndarray]] = []
            for s in range(0, len(block), step):
                dP, prob = self.network(block[s : s + step], mpp)
                futs += [self._pool.submit(self._post, dP[:, i], prob[i], mpp) for i in range(prob.shape[0])]
                # hand back finished blocks as soon as the chunk after them is on its way
                while len(inflight) and all(f.done() for f in inflight[0][1]):
                    yield self._collect(*inflight.popleft())
            inflight.append((block, futs))
            while len(inflight) > 1:
                yield self._collect(*inflight.popleft())
        while inflight:
            yield self._collect(*inflight.popleft())

    @staticmethod
    def _collect(block: np.ndarray, futs: list[Future[np.ndarray]]) -> np.ndarray:
        out = np.zeros(block.shape[:3], dtype=np.uint32)
        for i, f in enumerate(futs):
            out[i] = f.result()
        return out

    def close(self) -> None:
        self._pool.shutdown()
