"""`dirl pretrain`: DINO self-distillation with DiRL's prior-guided dense loss (or without: the baseline).

    dirl pretrain OUTDIR --tiles results/c/tiles/*.zarr --priors results/c/priors/*.zarr \
        [--method dirl|dino] [--arch vit_small_patch16_224] [--epochs 100] [--batch-size 64] ...

Writes OUTDIR/checkpoint.pt (every epoch and every `checkpoint_every_steps`; a rerun resumes from it
exactly), log.jsonl, loss_curves.png, and at the end backbone.pt (the teacher's timm state dict) with
backbone.json (how to rebuild and normalise for it). Multi-GPU / multi-process: launch with
`torchrun --nproc_per_node N -m dirl.cli pretrain ...`; `batch_size` is the global batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from dirl import __version__
from dirl.errors import ConfigError, DirlError
from dirl.ssl import schedules
from dirl.ssl.augment import IMAGENET_MEAN, IMAGENET_STD
from dirl.ssl.losses import DenseLoss, DINOLoss, valid_classes
from dirl.ssl.model import SSLNet

log = logging.getLogger("dirl.pretrain")
CHECKPOINT_FORMAT = "dirl-pretrain/1"


@dataclass
class PretrainSettings:
    """Every hyper-parameter of a pretraining run (config group `pretrain`). Defaults follow DINO's
    ViT-S/16 recipe (Caron et al. 2021) and section 4 of DESIGN.md."""

    method: str = "dirl"  # dirl | dino (the baseline: dense term off and not computed)
    arch: str = "vit_small_patch16_224"  # any timm ViT name
    img_size: int = 224  # global crop size (a multiple of the patch size)
    embed: str = "cls"  # image embedding for the DINO head: cls | mean (of patch tokens)
    drop_path: float = 0.1  # student stochastic depth
    out_dim: int = 65536  # DINO head output dimension
    dense_out_dim: int = 4096  # dense head output dimension
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    lambda_dense: float = 1.0  # weight of the dense loss (method dirl)
    epochs: int = 100
    batch_size: int = 64  # global batch (all processes together)
    lr: float = 0.0005  # base learning rate for a batch of 256 (scaled linearly by batch_size / 256)
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996  # EMA momentum, cosine to 1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    clip_grad: float = 3.0  # max global gradient norm; 0 = no clipping
    freeze_last_layer: int = 1  # epochs with the heads' last layers frozen
    local_crops_number: int = 0  # multi-crop: local crops per image (DINO loss only)
    local_crop_size: int = 96
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    solarize_p: float = 0.0  # solarisation of the second global view (DINO uses 0.2)
    hed_sigma: float = 0.05  # HED stain jitter strength (0 = off)
    min_tokens: float = 1.0  # a class needs this much area (in tokens) in both views to be matched
    match: str = "all"  # all | overlap (pool only inside the region the two crops share)
    exclude_background: bool = True  # no dense term for class 0 (glass)
    tiles_per_slide: int = 0  # at most this many tiles per slide (a fixed random subset); 0 = all
    num_workers: int = 4
    precision: str = "auto"  # auto (bf16 on GPU if supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the backbones
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every_steps: int = 0  # also checkpoint every N steps (0 = once per epoch)
    log_every: int = 10  # steps per log.jsonl line
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("global_crop_scale", "local_crop_scale"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))

    @property
    def dense(self) -> bool:
        return self.method == "dirl" and self.lambda_dense > 0

    @property
    def effective_lambda(self) -> float:
        return self.lambda_dense if self.method == "dirl" else 0.0

    def validate(self) -> "PretrainSettings":
        choices = {"method": ("dirl", "dino"), "embed": ("cls", "mean"), "match": ("all", "overlap"),
                   "precision": ("auto", "fp32", "bf16", "fp16"), "device": ("auto", "cpu", "cuda")}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise ConfigError(f"pretrain.{k} = {getattr(self, k)!r}: use one of {', '.join(allowed)}")
        positive = ("img_size", "out_dim", "dense_out_dim", "epochs", "batch_size", "log_every")
        for k in positive:
            if getattr(self, k) <= 0:
                raise ConfigError(f"pretrain.{k} must be > 0, got {getattr(self, k)}")
        for k in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(self, k)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"pretrain.{k} = {getattr(self, k)}: need 0 < min <= max <= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainSettings":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown pretrain setting(s) {unknown}; known: {sorted(names)}")
        return cls(**d).validate()


# settings that may change between a run and its resumption (they do not change the result)
RUNTIME_KEYS = frozenset({"num_workers", "log_every", "checkpoint_every_steps", "compile", "device"})


def settings_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = (set(a) | set(b)) - RUNTIME_KEYS
    return sorted(k for k in keys if a.get(k) != b.get(k))


# --------------------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def resolve_device(s: PretrainSettings) -> torch.device:
    if s.device == "cuda" or (s.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DirlError("pretrain.device = cuda but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_precision(s: PretrainSettings, device: torch.device) -> torch.dtype:
    p = s.precision
    if p == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


class Trainer:
    """Student, teacher, losses, optimiser and schedules; `step(batch, step, epoch)` is one training
    step. Used by `dirl pretrain` and by bench/pretrain.py (so the benchmark times the real step)."""

    def __init__(self, s: PretrainSettings, n_classes: int | None, device: torch.device,
                 iters_per_epoch: int = 1):
        self.s, self.device, self.n_classes = s, device, n_classes
        self.world, self.rank = _world()
        self.set_iters_per_epoch(iters_per_epoch)
        self.amp_dtype = resolve_precision(s, device)
        if device.type == "cuda":  # fp32 parts (losses, optimiser) on tensor cores
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if s.dense and not n_classes:
            raise DirlError("method dirl needs the number of prior classes (priors stores or --n-classes)")
        dense_dim = s.dense_out_dim if s.dense else None
        torch.manual_seed(s.seed)  # identical initialisation on every rank
        self.student = SSLNet(s.arch, s.img_size, s.embed, s.out_dim, dense_dim, s.head_hidden_dim,
                              s.head_bottleneck_dim, s.drop_path).to(device)
        self.teacher = SSLNet(s.arch, s.img_size, s.embed, s.out_dim, dense_dim, s.head_hidden_dim,
                              s.head_bottleneck_dim, 0.0).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False).eval()
        torch.manual_seed(s.seed * 7919 + 1 + self.rank)  # per-rank randomness from here (drop path)
        self.patch = self.student.patch
        if s.img_size % self.patch:
            raise ConfigError(f"pretrain.img_size {s.img_size} is not a multiple of the patch size "
                              f"{self.patch} of {s.arch}")
        if s.compile:
            self.student.compile_backbone()
            self.teacher.compile_backbone()
        self.net: nn.Module = self.student
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None)
        self.dino_loss = DINOLoss(s.out_dim, s.student_temp, s.center_momentum).to(device)
        self.dense_loss = (DenseLoss(s.dense_out_dim, s.student_temp, s.center_momentum).to(device)
                           if s.dense else None)
        reg, no_reg = [], []
        for name, p in self.student.named_parameters():
            (no_reg if name.endswith(".bias") or p.ndim == 1 else reg).append(p)
        groups = [{"params": reg, "regularized": True}, {"params": no_reg, "weight_decay": 0.0,
                                                         "regularized": False}]
        kw = {"fused": True} if device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(groups, lr=0.0, **kw)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.last_layers = [p for n, p in self.student.named_parameters() if ".last_layer." in n]
        self._t_params = list(self.teacher.parameters())
        self._s_params = list(self.student.parameters())
        self.exclude = (0,) if s.exclude_background else ()

    def set_iters_per_epoch(self, n: int) -> None:
        self.iters_per_epoch = n
        self.total_steps = self.s.epochs * n

    # schedules --------------------------------------------------------------------------------------
    def schedule(self, step: int, epoch: int) -> dict[str, float]:
        s, n = self.s, self.iters_per_epoch
        base_lr = s.lr * s.batch_size / 256.0
        warm = int(round(s.warmup_epochs * n))
        return {
            "lr": schedules.cosine(step, self.total_steps, base_lr, s.min_lr, warm, 0.0),
            "wd": schedules.cosine(step, self.total_steps, s.weight_decay, s.weight_decay_end),
            "momentum": schedules.cosine(step, self.total_steps, s.momentum_teacher, 1.0),
            "teacher_temp": schedules.teacher_temperature(epoch, s.warmup_teacher_temp, s.teacher_temp,
                                                          s.warmup_teacher_temp_epochs),
        }

    # one step ---------------------------------------------------------------------------------------
    def _inputs(self, batch: dict[str, torch.Tensor]):
        dev, nb = self.device, self.device.type == "cuda"
        glob = batch["global"].to(dev, non_blocking=nb).transpose(0, 1)  # (2, B, 3, S, S)
        loc = batch.get("local")
        loc = loc.to(dev, non_blocking=nb).transpose(0, 1) if loc is not None and loc.numel() else None
        occ = valid = None
        if self.s.dense:
            if "occupancy" not in batch:
                raise DirlError("method dirl needs prior maps: pass --priors (one store per tile store)")
            occ = batch["occupancy"].to(dev, non_blocking=nb).transpose(0, 1)  # (2, B, N, C)
            if self.s.match == "overlap":
                occ = occ * batch["overlap"].to(dev, non_blocking=nb).transpose(0, 1)[..., None]
            if self.exclude:  # excluded classes never enter the dense head
                keep = [c for c in range(occ.shape[-1]) if c not in self.exclude]
                occ = occ[..., keep]
            valid = valid_classes(occ.sum(2), self.s.min_tokens, ())
        return glob, loc, occ, valid

    def step(self, batch: dict[str, torch.Tensor], step: int, epoch: int) -> dict[str, float]:
        """One optimisation step; returns the step's losses (averaged over ranks) and schedules."""
        s = self.s
        sch = self.schedule(step, epoch)
        for g in self.opt.param_groups:
            g["lr"] = sch["lr"]
            if g["regularized"]:
                g["weight_decay"] = sch["wd"]
        glob, loc, occ, valid = self._inputs(batch)
        amp = self.amp_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=amp):
            with torch.no_grad():
                t = self.teacher(glob, None, occ)
            out = self.net(glob, loc, occ)
        # losses in fp32 (softmax over 65536 outputs, centring)
        l_dino = self.dino_loss(out["out"], t["out"], sch["teacher_temp"])
        if self.dense_loss is not None:
            l_dense, n_valid = self.dense_loss(out["dense"], t["dense"], valid, sch["teacher_temp"])
            loss = l_dino + s.lambda_dense * l_dense
        else:
            l_dense = n_valid = torch.zeros((), device=self.device)
            loss = l_dino
        stats = torch.stack([loss.detach().float(), l_dino.detach().float(), l_dense.detach().float()])
        if self.world > 1:
            dist.all_reduce(stats)
            stats /= self.world
        values = stats.tolist()  # one sync per step; also makes the finiteness check collective
        if not all(math.isfinite(v) for v in values):
            raise DirlError(f"non-finite loss at step {step} (epoch {epoch}): loss {values[0]}, dino "
                            f"{values[1]}, dense {values[2]}, lr {sch['lr']:.3g}; lower pretrain.lr or "
                            "use precision fp32/bf16, then rerun (it resumes from the last checkpoint)")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if s.clip_grad > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self._s_params, s.clip_grad)
        if epoch < s.freeze_last_layer:
            for p in self.last_layers:
                p.grad = None
        self.scaler.step(self.opt)
        self.scaler.update()
        with torch.no_grad():  # teacher <- m * teacher + (1 - m) * student
            torch._foreach_lerp_(self._t_params, self._s_params, 1.0 - sch["momentum"])
        b = glob.shape[1] * self.world
        return {"loss": values[0], "loss_dino": values[1], "loss_dense": values[2],
                "dense_pairs_per_image": float(n_valid) / b if s.dense else 0.0, **sch}

    # state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "dino_loss": self.dino_loss.state_dict(),
                "dense_loss": self.dense_loss.state_dict() if self.dense_loss is not None else None}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.student.load_state_dict(st["student"])
        self.teacher.load_state_dict(st["teacher"])
        self.opt.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        self.dino_loss.load_state_dict(st["dino_loss"])
        if self.dense_loss is not None:
            self.dense_loss.load_state_dict(st["dense_loss"])


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# --------------------------------------------------------------------------------------------------
def plot_losses(log_path: Path, out_png: Path) -> None:
    """Loss curves (total, DINO, dense) and schedules from log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dirl.store import atomic_path

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] \
        if log_path.exists() else []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if rows:
        steps = [r["step"] for r in rows]
        for key, style in (("loss", "-"), ("loss_dino", "--"), ("loss_dense", ":")):
            if any(r.get(key) for r in rows):
                axes[0].plot(steps, [r[key] for r in rows], style, label=key)
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("loss")
        axes[0].legend()
        axes[1].plot(steps, [r["lr"] for r in rows], label="lr")
        ax2 = axes[1].twinx()
        ax2.plot(steps, [r["wd"] for r in rows], "C1", label="weight decay")
        ax2.plot(steps, [r["momentum"] for r in rows], "C2", label="teacher momentum")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("lr")
        axes[1].legend(loc="upper left")
        ax2.legend(loc="center right")
    axes[0].set_title(f"pretraining losses ({log_path.parent.name})")
    axes[1].set_title("schedules")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


class Run:
    """One `dirl pretrain` invocation: data, trainer, resume, loop, outputs."""

    def __init__(self, outdir: str | os.PathLike, tiles: list[str], priors: list[str] | None,
                 s: PretrainSettings, n_classes: int | None = None, restart_on_mismatch: bool = False):
        from dirl.ssl.data import CohortDataset, EpochBatchSampler, ViewConfig, resolve_n_classes

        self.out = Path(outdir)
        self.s = s.validate()
        self.restart_on_mismatch = restart_on_mismatch
        self.world, self.rank = _world()
        self.device = resolve_device(s)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if s.method == "dirl" and not priors:
            raise DirlError("method dirl needs --priors (one priors store per tile store)")
        # the baseline never reads the priors: its checkpoint does not depend on them
        self.n_classes = (resolve_n_classes(priors, n_classes) if priors else n_classes) if s.dense else None
        self.trainer = Trainer(s, self.n_classes, self.device)
        patch = self.trainer.patch
        views = ViewConfig(global_size=s.img_size, global_scale=s.global_crop_scale,
                           local_number=s.local_crops_number, local_size=s.local_crop_size,
                           local_scale=s.local_crop_scale, solarize_p=s.solarize_p, hed_sigma=s.hed_sigma)
        self.dataset = CohortDataset(tiles, priors if s.dense else None, self.n_classes, patch, views,
                                     seed=s.seed, tiles_per_slide=s.tiles_per_slide or None)
        self.sampler = EpochBatchSampler(len(self.dataset), s.batch_size, self.world, self.rank, s.seed)
        nw = s.num_workers
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=nw,
            pin_memory=self.device.type == "cuda", persistent_workers=nw > 0,
            prefetch_factor=4 if nw > 0 else None, worker_init_fn=_worker_init if nw > 0 else None,
            generator=torch.Generator())  # own generator: iterating never consumes the global RNG
        self.trainer.set_iters_per_epoch(self.sampler.batches_per_epoch())
        self.epoch, self.batch, self.step = 0, 0, 0
        self.ckpt = self.out / "checkpoint.pt"
        self.log_path = self.out / "log.jsonl"

    # checkpoint -------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"settings": self.s.to_dict(), "n_classes": self.n_classes, "data": self.dataset.signature()}

    def save(self) -> None:
        from dirl.store import atomic_path

        rngs = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if self.rank == 0:
            state = {"format": CHECKPOINT_FORMAT, "dirl_version": __version__, **self.meta(),
                     "epoch": self.epoch, "batch": self.batch, "step": self.step, "world_size": self.world,
                     "rng": rngs, **self.trainer.state_dict()}
            with atomic_path(self.ckpt) as tmp:
                torch.save(state, tmp)
        if self.world > 1:
            dist.barrier()

    def resume(self) -> bool:
        if not self.ckpt.exists():
            return False
        st = torch.load(self.ckpt, map_location="cpu", weights_only=False)
        if st.get("format") != CHECKPOINT_FORMAT:
            raise DirlError(f"{self.ckpt} is not a dirl pretrain checkpoint ({st.get('format')}); "
                            "move it away to start afresh")
        problem = None
        diff = settings_diff(st["settings"], self.s.to_dict())
        if diff:
            detail = ", ".join(f"{k}: checkpoint {st['settings'].get(k)!r} vs now {self.s.to_dict().get(k)!r}"
                               for k in diff)
            problem = f"{self.ckpt} was written with different settings ({detail})"
        elif st["data"] != self.dataset.signature() or st.get("n_classes") != self.n_classes:
            problem = f"{self.ckpt} was trained on other data (slides, tile counts or n_classes differ)"
        if problem and not self.restart_on_mismatch:
            raise DirlError(f"{problem}; use the same settings and data to resume, pass "
                            "--restart-on-mismatch, or delete the output directory to start afresh")
        if problem:
            log.warning("%s: starting afresh (--restart-on-mismatch)", problem)
            if self.world > 1:
                dist.barrier()  # every rank has read it
            if self.rank == 0:
                for p in (self.ckpt, self.log_path):
                    p.unlink(missing_ok=True)
            return False
        self.trainer.load_state_dict(st)
        self.epoch, self.batch, self.step = st["epoch"], st["batch"], st["step"]
        rngs = st["rng"]
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        else:
            log.warning("checkpoint written by %d processes, resuming with %d: stochastic depth draws "
                        "differ from an uninterrupted run", len(rngs), self.world)
            set_rng_state(rngs[0])
        if self.rank == 0 and self.log_path.exists():  # drop log lines past the checkpoint
            keep = [ln for ln in self.log_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= self.step]
            self.log_path.write_text("".join(ln + "\n" for ln in keep))
        log.info("resumed from %s at epoch %d, step %d", self.ckpt, self.epoch, self.step)
        return True

    # loop -------------------------------------------------------------------------------------------
    def run(self, stop_after_steps: int | None = None) -> bool:
        """Train to the end (or until `stop_after_steps` steps in total); returns True when finished."""
        s = self.s
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.resume()
        n = self.sampler.batches_per_epoch()
        if self.rank == 0:
            log.info("%s pretraining: %d tiles, %d steps/epoch x %d epochs, batch %d on %d process(es), "
                     "%s, %s", s.method, len(self.dataset), n, s.epochs, s.batch_size, self.world,
                     self.device, str(self.trainer.amp_dtype).replace("torch.", ""))
        logf = open(self.log_path, "a") if self.rank == 0 else None
        acc: dict[str, float] = {}
        k = 0
        t_last = time.perf_counter()
        t_data = 0.0
        t_plot = time.perf_counter()
        try:
            while self.epoch < s.epochs:
                self.sampler.set_epoch(self.epoch, self.batch)
                t0 = time.perf_counter()
                for batch in self.loader:
                    t_data += time.perf_counter() - t0
                    m = self.trainer.step(batch, self.step, self.epoch)
                    self.step += 1
                    self.batch += 1
                    for key in ("loss", "loss_dino", "loss_dense", "dense_pairs_per_image"):
                        acc[key] = acc.get(key, 0.0) + m[key]
                    k += 1
                    end_of_epoch = self.batch >= n
                    if self.step % s.log_every == 0 or end_of_epoch:
                        now = time.perf_counter()
                        row = {"step": self.step, "epoch": self.epoch + self.batch / n,
                               **{key: v / k for key, v in acc.items()},
                               "lr": m["lr"], "wd": m["wd"], "teacher_temp": m["teacher_temp"],
                               "momentum": m["momentum"],
                               "images_per_s": k * s.batch_size / max(now - t_last, 1e-9),
                               "data_wait_frac": t_data / max(now - t_last, 1e-9), "time": time.time()}
                        if logf:
                            logf.write(json.dumps(row) + "\n")
                            logf.flush()
                        acc, k, t_last, t_data = {}, 0, now, 0.0
                    if end_of_epoch:
                        break
                    stop = stop_after_steps is not None and self.step >= stop_after_steps
                    if stop or (s.checkpoint_every_steps and self.step % s.checkpoint_every_steps == 0):
                        self.save()
                    if stop:
                        return False
                    t0 = time.perf_counter()
                self.epoch, self.batch = self.epoch + 1, 0
                self.save()
                if self.rank == 0 and time.perf_counter() - t_plot > 60:  # at most once a minute
                    plot_losses(self.log_path, self.out / "loss_curves.png")
                    t_plot = time.perf_counter()
                if stop_after_steps is not None and self.step >= stop_after_steps \
                        and self.epoch < s.epochs:
                    return False
        finally:
            if logf:
                logf.close()
        if self.rank == 0:
            self.write_backbone()
            plot_losses(self.log_path, self.out / "loss_curves.png")
        return True

    def write_backbone(self) -> None:
        from dirl.store import atomic_path

        teacher = self.trainer.teacher.backbone
        with atomic_path(self.out / "backbone.pt") as tmp:
            torch.save({k: v.detach().cpu() for k, v in teacher.state_dict().items()}, tmp)
        ds = self.dataset
        mpps = set()
        tile_px = set()
        from dirl import store

        for t in ds.tiles:
            a = store.open_tiles(t).attrs
            mpps.add(float(a["mpp"]))
            tile_px.add(int(a["tile_px"]))
        meta = {"arch": self.s.arch, "img_size": self.s.img_size, "patch_size": self.trainer.patch,
                "embed": self.s.embed, "embed_dim": self.trainer.student.embed_dim,
                "num_prefix_tokens": self.trainer.student.num_prefix, "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD), "method": self.s.method, "epochs": self.epoch, "step": self.step,
                "tile_mpp": mpps.pop() if len(mpps) == 1 else sorted(mpps),
                "tile_px": tile_px.pop() if len(tile_px) == 1 else sorted(tile_px),
                "n_classes": self.n_classes, "settings": self.s.to_dict(), "dirl_version": __version__,
                "load": "timm.create_model(arch, num_classes=0, img_size=img_size, dynamic_img_size=True)"
                        ".load_state_dict(torch.load('backbone.pt'))"}
        with atomic_path(self.out / "backbone.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=1) + "\n")


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# CLI
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("outdir", help="output directory (results/<cohort>/pretrain/<method>)")
    p.add_argument("--tiles", nargs="+", required=True, help="tile stores tiles/{slide}.zarr")
    p.add_argument("--priors", nargs="+", help="prior stores priors/{slide}.zarr, same order as --tiles")
    p.add_argument("--n-classes", type=int, help="prior classes C = cell classes + 2, if the priors "
                   "stores do not record n_classes")
    p.add_argument("--settings", help="JSON object or JSON file of settings (flags override it)")
    p.add_argument("--restart-on-mismatch", action="store_true", help="if OUTDIR/checkpoint.pt was "
                   "written with other settings or data, start afresh (default: stop with an error); "
                   "for workflows that rerun the stage when its settings change")
    p.add_argument("--stop-after-steps", type=int, help="checkpoint and stop after this many steps in "
                   "total (a rerun resumes); for time-limited jobs")
    g = p.add_argument_group("settings (defaults: PretrainSettings)")
    for f in fields(PretrainSettings):
        default = f.default
        if isinstance(default, bool):
            g.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=f"(default {default})")
        elif isinstance(default, tuple):
            g.add_argument(_flag(f.name), dest=f.name, type=float, nargs=2, default=None,
                           metavar=("MIN", "MAX"), help=f"(default {default[0]} {default[1]})")
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), type(default))
            g.add_argument(_flag(f.name), dest=f.name, type=typ, default=None, help=f"(default {default})")


def settings_from_args(args: argparse.Namespace) -> PretrainSettings:
    d: dict[str, Any] = {}
    if args.settings:
        text = args.settings
        try:
            d = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--settings {text!r}: not a JSON object or readable JSON file ({e})") from e
    for f in fields(PretrainSettings):
        v = getattr(args, f.name, None)
        if v is not None:
            d[f.name] = v
    return PretrainSettings.from_dict(d)


def main(args: argparse.Namespace) -> None:
    s = settings_from_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        use_cuda = s.device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        Run(args.outdir, args.tiles, args.priors, s, args.n_classes,
            args.restart_on_mismatch).run(args.stop_after_steps)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
