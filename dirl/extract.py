"""`dirl extract`: tile features of one or more slides into `features/{method}/{slide}.h5`.

Pipeline: DataLoader workers read whole shard-aligned blocks of the Zarr tile store (one `images[a:b]`
call per batch — per-tile reads of a sharded store are many times slower), hand uint8 tensors to the
main process through pinned memory, and the device converts, resizes and normalises them (uint8 over
the bus is 4x less transfer than float). The model runs under `inference_mode`, channels-last and bf16
autocast on CUDA. Results come back to the host asynchronously one batch behind, so the device is fed
the next batch before the previous one is written: in steady state it never waits on I/O or HDF5.

The feature file is written row block by row block into a temporary sibling (`store.atomic_path`) and
renamed when complete, so memory stays flat and a killed run leaves no file at the final path. Layout:
`features` float32 (N, D) with attr `encoder`; `coords` int64 (N, 2) in the tile store's row order with
the attrs CLAM (`patch_size`, `patch_level`) and TRIDENT (`patch_size_level0`, `level0_magnification`,
`target_magnification`, `level0_width/height`, `overlap`, `name`) read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dirl import store
from dirl.errors import ConfigError
from dirl.runtime import PRECISIONS, enable_tf32, resolve_device, torch_threads
from dirl.settings import Settings, bounded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractSettings(Settings):
    batch_size: int = bounded(0, ge=0)  # tiles per batch (0: shard-aligned default)
    workers: int = bounded(-1, ge=-1)  # DataLoader workers (-1: auto)
    device: str = "auto"  # auto, cpu, cuda, cuda:1 ...
    precision: str = field(default="auto", metadata={"choices": PRECISIONS, "help": "auto: bf16 on CUDA, fp32 on CPU"})
    tf32: bool = True  # TF32 tensor cores for fp32 work on NVIDIA GPUs


# --------------------------------------------------------------------------------------------------
# data loading
class BlockDataset:
    """Item i = tiles [i*batch, (i+1)*batch) as a uint8 tensor (B, T, T, 3), read in one call.

    The store is opened lazily in each worker process (Zarr handles are not shared across processes)."""

    def __init__(self, path: str | os.PathLike, n: int, batch: int):
        self.path, self.n, self.batch = str(path), n, batch
        self._tiles: store.TileStore | None = None

    def __len__(self) -> int:
        return (self.n + self.batch - 1) // self.batch

    def __getitem__(self, i: int):
        import torch

        if self._tiles is None:
            self._tiles = store.open_tiles(self.path)
        a = i * self.batch
        b = min(self.n, a + self.batch)
        return a, torch.from_numpy(np.ascontiguousarray(self._tiles.read(a, b)))


def _loader(path, n: int, batch: int, workers: int, pin: bool, prefetch: int = 4):
    import torch

    ds = BlockDataset(path, n, batch)
    kw: dict[str, Any] = {}
    if workers > 0:
        kw = {"prefetch_factor": prefetch, "persistent_workers": False}
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin, **kw)


def _default_batch_size(tiles: store.TileStore, device) -> int:
    """A whole number of shards per batch when the shards are small, else a divisor of the shard."""
    shard = (tiles.images.shards or (store.SHARD_TILES,))[0]
    target = 256 if device.type == "cuda" else 64
    if shard >= target:
        return max(d for d in range(1, target + 1) if shard % d == 0)
    return shard * max(1, target // shard)


# --------------------------------------------------------------------------------------------------
# the device side
class Preprocess:
    """uint8 NHWC on the device -> normalised float NCHW at the model's input size."""

    def __init__(self, enc, device, channels_last: bool):
        import torch

        self.size = enc.img_size
        self.mean = torch.tensor(enc.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(enc.std, device=device).view(1, 3, 1, 1) * 255.0)
        self.channels_last = channels_last

    def __call__(self, x_u8):
        import torch
        import torch.nn.functional as F

        # NHWC uint8 viewed as NCHW is channels-last already; one conversion into the layout the
        # model wants, then normalise in place (2.5x faster on CPU than chained out-of-place ops)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x_u8.permute(0, 3, 1, 2).to(torch.float32, memory_format=layout)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            ).contiguous(memory_format=layout)
        return x.sub_(self.mean).mul_(self.inv_std)


def prepare_model(enc, device, precision: str = "auto"):
    """Move the encoder to `device`; returns (autocast dtype or None, channels_last)."""
    import torch

    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ConfigError(f"--precision {precision!r}: choose auto, fp32, bf16 or fp16")
    channels_last = device.type == "cuda"
    enc.model.to(device)
    if channels_last:
        enc.model.to(memory_format=torch.channels_last)
    enc.model.eval()
    return dtypes[precision], channels_last


def iter_features(
    tiles: store.TileStore, enc, device, *, batch: int, workers: int, amp_dtype=None, channels_last: bool = False
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start row, float32 features) blocks in row order, one batch behind the device.

    Out of GPU memory, the model runs on halves of the batch (then quarters, ...; `dirl.oom`) for the
    rest of the slide; the loader's blocks, the row order and the features stay the same."""
    import torch

    from dirl.oom import HalvingBatch

    n = len(tiles)
    cuda = device.type == "cuda"
    pre = Preprocess(enc, device, channels_last)
    loader = _loader(tiles.path, n, batch, workers, pin=cuda)
    pending: tuple[int, torch.Tensor, Any] | None = None
    sub = HalvingBatch(
        batch, setting="extract.batch_size (dirl extract --batch-size)", slide=tiles.slide_id, what="feature extraction"
    )

    def forward(xs):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return enc.embed_batch(pre(xs)).float()

    with torch.inference_mode():
        for start, x in loader:
            x = x.to(device, non_blocking=True)
            parts = sub.map(forward, x)
            f = parts[0] if len(parts) == 1 else torch.cat(parts)
            del parts
            if cuda:
                host = torch.empty(f.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(f, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                if pending is not None:
                    yield _drain(pending)
                pending = (start, host, ev)
            else:
                yield start, f.numpy()
        if pending is not None:
            yield _drain(pending)


def _drain(p):
    start, host, ev = p
    ev.synchronize()
    return start, host.numpy()


def extract_slide(
    tiles_path: str | os.PathLike,
    out_path: str | os.PathLike,
    enc,
    device,
    *,
    batch: int | None = None,
    workers: int = 0,
    amp_dtype=None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Features of every tile of one tile store into `out_path` (atomic). Returns timing stats."""
    tiles = store.open_tiles(tiles_path)
    n = len(tiles)
    batch = batch or _default_batch_size(tiles, device)
    t0 = time.perf_counter()
    with store.feature_writer(out_path, tiles, enc.dim, enc.encoder_id) as writer:
        for start, block in iter_features(
            tiles,
            enc,
            device,
            batch=batch,
            workers=workers if n else 0,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
        ):
            writer.write(start, block)
    dt = time.perf_counter() - t0
    return {"slide": tiles.slide_id, "tiles": n, "seconds": dt, "tiles_per_s": n / dt if dt > 0 else 0.0}


# --------------------------------------------------------------------------------------------------
# CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tiles", nargs="+", help="tile stores (tiles/{slide}.zarr)")
    p.add_argument(
        "--encoder",
        required=True,
        help="pretrain directory (or its backbone.pt, with backbone.json beside it), "
        "timm:NAME (with --weights), or local-dir:/path/to/timm_model_folder",
    )
    p.add_argument("--weights", help="local weights file for a timm:NAME encoder")
    p.add_argument(
        "--embed",
        choices=["cls", "mean", "pooled"],
        help="embedding (default: backbone.json's for a pretrain backbone, 'pooled' for timm)",
    )
    p.add_argument("--img-size", type=int, help="timm encoders: model input side (default: its config)")
    p.add_argument(
        "--model-kwargs",
        default="{}",
        help="timm encoders: JSON kwargs for create_model, "
        'e.g. \'{"init_values": 1e-5, "dynamic_img_size": true}\' for UNI',
    )
    p.add_argument(
        "--out",
        required=True,
        help="output .h5 (one tile store) or directory "
        "(written as {dir}/{slide}.h5, slide = tile store name without .zarr)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: leave default)")
    ExtractSettings.add_arguments(p.add_argument_group("settings (ExtractSettings)"))


def default_workers(device) -> int:
    """Reader processes: on GPU enough to keep it fed (most of the CPUs); on CPU the model needs the
    cores, so at most two."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus - 1)) if device.type == "cuda" else min(2, max(0, cpus // 4))


def _out_paths(tiles: list[str], out: str) -> list[Path]:
    if out.endswith(".h5"):
        if len(tiles) != 1:
            raise ConfigError("--out FILE.h5 takes exactly one tile store; give a directory for several")
        return [Path(out)]
    names = [Path(t.rstrip("/")).name for t in tiles]
    names = [n[:-5] if n.endswith(".zarr") else n for n in names]
    if len(set(names)) != len(names):
        raise ConfigError("two tile stores share a slide name; give one --out FILE.h5 per store")
    return [Path(out) / f"{n}.h5" for n in names]


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return _out_paths(args.tiles, args.out), [*args.tiles, args.weights]


def main(args: argparse.Namespace) -> None:
    with torch_threads(args.threads):
        _main(args)


def _main(args: argparse.Namespace) -> None:
    from dirl.encoders import load_encoder

    s = ExtractSettings.from_args(args)
    try:
        kwargs = json.loads(args.model_kwargs)
    except ValueError as e:
        raise ConfigError(f"--model-kwargs is not JSON: {e}") from e
    outs = _out_paths(args.tiles, args.out)
    device = resolve_device(s.device)
    enc = load_encoder(
        args.encoder, weights=args.weights, embed_kind=args.embed, img_size=args.img_size, model_kwargs=kwargs or None
    )
    enable_tf32(device, s.tf32)
    amp, cl = prepare_model(enc, device, s.precision)
    workers = s.workers if s.workers >= 0 else default_workers(device)
    log.info("encoder %s (D=%d) on %s, %d workers", enc.encoder_id, enc.dim, device, workers)
    for tpath, opath in zip(args.tiles, outs):
        st = extract_slide(
            tpath, opath, enc, device, batch=s.batch_size or None, workers=workers, amp_dtype=amp, channels_last=cl
        )
        log.info(
            "%s: %d tiles in %.1f s (%.0f tiles/s) -> %s",
            st["slide"],
            st["tiles"],
            st["seconds"],
            st["tiles_per_s"],
            opath,
        )
