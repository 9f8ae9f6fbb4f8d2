"""Device, precision and CPU threads: resolved the same way by every torch stage (pretrain, attention,
extract, MIL). Imports torch lazily, so importing this module costs nothing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from dirl.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str = "auto") -> Any:
    """auto: the local rank's GPU when CUDA is visible (LOCAL_RANK under torchrun), else the CPU;
    `cuda`, `cuda:1` or `cpu` as given. Asking for CUDA without one is an error."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} but no CUDA device is visible")
        if name == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"device {name!r}: use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def resolve_precision(precision: str, device: Any) -> Any:
    """The autocast dtype: auto = bf16 on a GPU that supports it (else fp16), fp32 on the CPU."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def enable_tf32(device: Any, on: bool = True) -> None:
    """fp32 matmuls and convolutions on tensor cores (TF32) on NVIDIA GPUs (the `tf32` setting): ~8x the
    fp32 rate on an H100 for a 10-bit mantissa in the products; what DINO and timm training do."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def allocated_cpus() -> int | None:
    """The CPUs SLURM allocated to this job (`SLURM_CPUS_PER_TASK`), or None outside a SLURM job."""
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    return None


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch CPU threads (0: unchanged), restoring the previous count afterwards."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fold_batchnorm(net: Any) -> Any:
    """An eval-mode copy of `net` with each BatchNorm that follows a conv inside an nn.Sequential (at any
    depth) folded into that conv: the same outputs, one pass over the activations less per layer on CPU."""
    import copy

    import torch.nn as nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(m: nn.Module) -> nn.Module:
        for name, child in list(m.named_children()):
            setattr(m, name, fold(child))
        if not isinstance(m, nn.Sequential):
            return m
        mods, out = list(m), []
        while mods:
            x = mods.pop(0)
            fuse = isinstance(x, nn.Conv2d) and mods and isinstance(mods[0], nn.BatchNorm2d)
            out.append(fuse_conv_bn_eval(x, mods.pop(0)) if fuse else x)
        return nn.Sequential(*out)

    return fold(copy.deepcopy(net).eval())
