"""One DINO / DiRL optimisation step, as facebookresearch/dino's `train_one_epoch` does it: schedules,
teacher and student forward, losses, backward, per-parameter gradient clipping, last layer frozen in the
first epoch(s), optimiser step, EMA of the teacher. Used by `dirl pretrain` (dirl.ssl.train) and by
bench/pretrain.py, so the benchmark times the real step."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from dirl.errors import DirlError
from dirl.runtime import enable_tf32, resolve_precision
from dirl.ssl import schedules
from dirl.ssl.losses import DenseLoss, DINOLoss, valid_classes
from dirl.ssl.model import SSLNet
from dirl.ssl.settings import PretrainSettings

# what `Trainer.step` reports, averaged over ranks (the first three are losses)
STEP_STATS = ("loss", "loss_dino", "loss_dense", "teacher_entropy", "teacher_batch_entropy")


def world() -> tuple[int, int]:
    """(number of processes, this process's rank)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """DINO's groups: no weight decay on biases and norm parameters (1-d tensors)."""
    reg, no_reg = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_reg if name.endswith(".bias") or p.ndim == 1 else reg).append(p)
    return [{"params": reg, "regularized": True}, {"params": no_reg, "weight_decay": 0.0, "regularized": False}]


@torch.no_grad()
def clip_per_parameter(params: list[torch.Tensor], clip: float) -> None:
    """DINO's `clip_gradients`: each parameter tensor's gradient scaled to norm <= `clip`."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms])


class Trainer:
    """Student, teacher, losses, optimiser and schedules; `step(batch, step, epoch)` is one step."""

    def __init__(self, s: PretrainSettings, n_classes: int | None, device: torch.device, iters_per_epoch: int = 1):
        self.s, self.device, self.n_classes = s, device, n_classes
        self.world, self.rank = world()
        self.set_iters_per_epoch(iters_per_epoch)
        self.amp_dtype = resolve_precision(s.precision, device)
        enable_tf32(device, s.tf32)  # fp32 parts (losses, optimiser) on tensor cores
        if s.dense and not n_classes:
            raise DirlError("method dirl needs the number of prior classes (priors stores or --n-classes)")
        dense_dim = s.dense_out_dim if s.dense else None
        torch.manual_seed(s.seed)  # identical initialisation on every rank

        def net(drop_path: float) -> SSLNet:
            return SSLNet(
                s.arch,
                s.img_size,
                s.embed,
                s.out_dim,
                dense_dim,
                s.head_hidden_dim,
                s.head_bottleneck_dim,
                drop_path,
                s.head_bn,
            )

        self.student, self.teacher = net(s.drop_path), net(0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.init = None
        if s.init:  # warm start: both from the given weights (heads too, where they fit)
            from dirl.ssl import init

            self.init = init.load(s.init, s.arch, self.student)
            init.apply(self.init, self.student, self.teacher)
        if self.world > 1 and s.head_bn and device.type == "cuda":  # batch statistics over all ranks
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        self.student.to(device)
        # the teacher stays in training mode, as in DINO: with head_bn its BatchNorm uses batch statistics
        self.teacher.to(device).requires_grad_(False)
        torch.manual_seed(s.seed * 7919 + 1 + self.rank)  # per-rank randomness from here (drop path)
        self.patch = self.student.patch
        if s.img_size % self.patch:
            raise DirlError(
                f"pretrain.img_size {s.img_size} is not a multiple of the patch size {self.patch} of {s.arch}"
            )
        if s.compile:
            self.student.compile_backbone()
            self.teacher.compile_backbone()
        self.net: nn.Module = self.student
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.dino_loss = DINOLoss(s.out_dim, s.student_temp, s.center_momentum).to(device)
        self.dense_loss = DenseLoss(s.dense_out_dim, s.student_temp, s.center_momentum).to(device) if s.dense else None
        kw = {"fused": True} if device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(param_groups(self.student), lr=0.0, **kw)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.last_layers = [p for n, p in self.student.named_parameters() if ".last_layer." in n]
        self._t_params = list(self.teacher.parameters())
        self._s_params = list(self.student.parameters())
        self.exclude = (0,) if s.exclude_background else ()

    def set_iters_per_epoch(self, n: int) -> None:
        self.iters_per_epoch = n
        self.total_steps = self.s.epochs * n

    @property
    def warmup_steps(self) -> int:
        """Steps before the collapse monitors mean anything: the lr warm-up and the frozen last layer."""
        n = self.iters_per_epoch
        return int(max(self.s.warmup_epochs, self.s.freeze_last_layer) * n)

    def schedule(self, step: int, epoch: int) -> dict[str, float]:
        s, n = self.s, self.iters_per_epoch
        base_lr = s.lr * s.batch_size / 256.0
        warm = int(round(s.warmup_epochs * n))
        return {
            "lr": schedules.cosine(step, self.total_steps, base_lr, s.min_lr, warm, 0.0),
            "wd": schedules.cosine(step, self.total_steps, s.weight_decay, s.weight_decay_end),
            "momentum": schedules.cosine(step, self.total_steps, s.momentum_teacher, 1.0),
            "teacher_temp": schedules.teacher_temperature(
                epoch, s.warmup_teacher_temp, s.teacher_temp, s.warmup_teacher_temp_epochs
            ),
        }

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
        """One optimisation step; returns STEP_STATS (averaged over ranks), the KL between teacher and
        student, dense pairs per image and the schedules."""
        s = self.s
        sch = self.schedule(step, epoch)
        for g in self.opt.param_groups:
            g["lr"] = sch["lr"]
            if g["regularized"]:
                g["weight_decay"] = sch["wd"]
        glob, loc, occ, valid = self._inputs(batch)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
            with torch.no_grad():
                t = self.teacher(glob, None, occ, valid)
            out = self.net(glob, loc, occ, valid)
        # losses in fp32 (softmax over 65536 outputs, centring)
        l_dino = self.dino_loss(out["out"], t["out"], sch["teacher_temp"])
        if self.dense_loss is not None:
            l_dense, n_valid = self.dense_loss(out["dense"], t["dense"], valid, sch["teacher_temp"])
            loss = l_dino + s.lambda_dense * l_dense
        else:
            l_dense = n_valid = torch.zeros((), device=self.device)
            loss = l_dino
        stats = torch.cat(
            [torch.stack([loss.detach(), l_dino.detach(), l_dense.detach()]).float(), self.dino_loss.monitors.float()]
        )
        if self.world > 1:
            dist.all_reduce(stats)
            stats /= self.world
        values = dict(zip(STEP_STATS, stats.tolist()))  # one sync per step: the finiteness check is collective
        if not all(math.isfinite(v) for v in values.values()):
            raise DirlError(
                f"non-finite loss at step {step} (epoch {epoch}): loss {values['loss']}, dino "
                f"{values['loss_dino']}, dense {values['loss_dense']}, lr {sch['lr']:.3g}; lower "
                "pretrain.lr or use precision fp32/bf16, then rerun (it resumes from the last "
                "checkpoint)"
            )
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if epoch < s.freeze_last_layer:  # DINO: the last layers learn only after the first epoch(s)
            for p in self.last_layers:
                p.grad = None
        if s.clip_grad > 0:
            self.scaler.unscale_(self.opt)
            clip_per_parameter(self._s_params, s.clip_grad)
        self.scaler.step(self.opt)
        self.scaler.update()
        with torch.no_grad():  # teacher <- m * teacher + (1 - m) * student
            torch._foreach_lerp_(self._t_params, self._s_params, 1.0 - sch["momentum"])
        b = glob.shape[1] * self.world
        # cross-entropy = teacher entropy + KL(teacher || student): the part the student can still learn
        values["kl"] = values["loss_dino"] - values["teacher_entropy"] * math.log(s.out_dim)
        values["dense_pairs_per_image"] = float(n_valid) / b if s.dense else 0.0
        return {**values, **sch}

    def collapsed(self, stats: dict[str, float]) -> str | None:
        """Which collapse the monitors show (after the warm-up), or None."""
        if stats["teacher_entropy"] > 0.98 and stats["kl"] < 0.02 * math.log(self.s.out_dim):
            return (
                "uniform: the teacher's targets are nearly uniform and the student matches them (centring "
                "wins); try head_bn: true, a lower teacher_temp or a weaker color_jitter"
            )
        if stats["teacher_batch_entropy"] < 0.2:
            return (
                "one dimension: every image gets the same target (sharpening wins); try a higher "
                "teacher_temp warm-up or a lower learning rate"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "dino_loss": self.dino_loss.state_dict(),
            "dense_loss": self.dense_loss.state_dict() if self.dense_loss is not None else None,
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.student.load_state_dict(st["student"])
        self.teacher.load_state_dict(st["teacher"])
        self.opt.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        self.dino_loss.load_state_dict(st["dino_loss"])
        if self.dense_loss is not None:
            self.dense_loss.load_state_dict(st["dense_loss"])
