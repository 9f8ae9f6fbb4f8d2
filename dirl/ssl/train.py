"""`dirl pretrain`: DINO self-distillation with DiRL's prior-guided dense loss (or without: the baseline).

    dirl pretrain OUTDIR --tiles results/c/tiles/*.zarr --priors results/c/priors/*.zarr \
        [--method dirl|dino] [--arch vit_small_patch16_224] [--epochs 100] [--batch-size 64] ...

Writes OUTDIR/checkpoint.pt (every epoch and every `checkpoint_every_steps`; a rerun resumes from it
exactly), log.jsonl (losses, collapse monitors, throughput), loss_curves.png, and at the end backbone.pt
(the teacher's timm state dict) with backbone.json (how to rebuild and normalise for it). Multi-GPU /
multi-process: launch with `torchrun --nproc_per_node N -m dirl.cli pretrain ...`; `batch_size` is the
global batch. The step itself is dirl.ssl.trainer; the settings dirl.ssl.settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dirl import __version__
from dirl.errors import DirlError
from dirl.runtime import resolve_device, torch_threads
from dirl.ssl.augment import IMAGENET_MEAN, IMAGENET_STD
from dirl.ssl.plots import plot_losses
from dirl.ssl.settings import PretrainSettings, settings_diff
from dirl.ssl.trainer import Trainer, world

log = logging.getLogger("dirl.pretrain")
CHECKPOINT_FORMAT = "dirl-pretrain/1"
# averaged over the steps between two log lines
MEANS = ("loss", "loss_dino", "loss_dense", "teacher_entropy", "teacher_batch_entropy", "kl", "dense_pairs_per_image")


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Run:
    """One `dirl pretrain` invocation: data, trainer, resume, loop, outputs."""

    def __init__(
        self,
        outdir: str | os.PathLike,
        tiles: list[str],
        priors: list[str] | None,
        s: PretrainSettings,
        n_classes: int | None = None,
        restart_on_mismatch: bool = False,
    ):
        from dirl.ssl.data import CohortDataset, EpochBatchSampler, ViewConfig, resolve_n_classes

        self.out = Path(outdir)
        self.s = s.validate()
        self.restart_on_mismatch = restart_on_mismatch
        self.world, self.rank = world()
        self.device = resolve_device(s.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if s.method == "dirl" and not priors:
            raise DirlError("method dirl needs --priors (one priors store per tile store)")
        # the baseline never reads the priors: its checkpoint does not depend on them
        self.n_classes = (resolve_n_classes(priors, n_classes) if priors else n_classes) if s.dense else None
        self.trainer = Trainer(s, self.n_classes, self.device)
        patch = self.trainer.patch
        views = ViewConfig.from_settings(s)
        self.dataset = CohortDataset(
            tiles,
            priors if s.dense else None,
            self.n_classes,
            patch,
            views,
            seed=s.seed,
            tiles_per_slide=s.tiles_per_slide or None,
        )
        self.sampler = EpochBatchSampler(len(self.dataset), s.batch_size, self.world, self.rank, s.seed)
        nw = s.num_workers
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=nw,
            pin_memory=self.device.type == "cuda",
            persistent_workers=nw > 0,
            prefetch_factor=4 if nw > 0 else None,
            worker_init_fn=_worker_init if nw > 0 else None,
            generator=torch.Generator(),
        )  # own generator: iterating never consumes the global RNG
        self.trainer.set_iters_per_epoch(self.sampler.batches_per_epoch())
        self.epoch, self.batch, self.step = 0, 0, 0
        self.ckpt = self.out / "checkpoint.pt"
        self.log_path = self.out / "log.jsonl"

    # checkpoint -------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        from dirl.ssl.init import describe

        return {
            "settings": self.s.to_dict(),
            "n_classes": self.n_classes,
            "data": self.dataset.signature(),
            "init": describe(self.trainer.init),
        }

    def save(self) -> None:
        from dirl.store import atomic_path

        rngs = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if self.rank == 0:
            state = {
                "format": CHECKPOINT_FORMAT,
                "dirl_version": __version__,
                **self.meta(),
                "epoch": self.epoch,
                "batch": self.batch,
                "step": self.step,
                "world_size": self.world,
                "rng": rngs,
                **self.trainer.state_dict(),
            }
            with atomic_path(self.ckpt) as tmp:
                torch.save(state, tmp)
        if self.world > 1:
            dist.barrier()

    def resume(self) -> bool:
        if not self.ckpt.exists():
            return False
        st = torch.load(self.ckpt, map_location="cpu", weights_only=False)
        if st.get("format") != CHECKPOINT_FORMAT:
            raise DirlError(
                f"{self.ckpt} is not a dirl pretrain checkpoint ({st.get('format')}); move it away to start afresh"
            )
        problem = None
        diff = settings_diff(st["settings"], self.s.to_dict())
        if diff:
            detail = ", ".join(
                f"{k}: checkpoint {st['settings'].get(k)!r} vs now {self.s.to_dict().get(k)!r}" for k in diff
            )
            problem = f"{self.ckpt} was written with different settings ({detail})"
        elif st.get("init") != self.meta()["init"]:
            problem = f"{self.ckpt} was warm-started from other weights ({st.get('init')}, now {self.meta()['init']})"
        elif st["data"] != self.dataset.signature() or st.get("n_classes") != self.n_classes:
            problem = (
                f"{self.ckpt} was trained on other data (slides, tile counts, n_classes, or tile or priors "
                "stores written again since)"
            )
        if problem and not self.restart_on_mismatch:
            raise DirlError(
                f"{problem}; use the same settings and data to resume, pass "
                "--restart-on-mismatch, or delete the output directory to start afresh"
            )
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
            log.warning(
                "checkpoint written by %d processes, resuming with %d: stochastic depth draws "
                "differ from an uninterrupted run",
                len(rngs),
                self.world,
            )
            set_rng_state(rngs[0])
        if self.rank == 0 and self.log_path.exists():  # drop log lines past the checkpoint
            keep = [ln for ln in self.log_path.read_text().splitlines() if _logged_step(ln) <= self.step]
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
        if self.rank == 0:
            log.info(
                "%s pretraining: %d tiles, %d steps/epoch x %d epochs, batch %d on %d process(es), %s, %s",
                s.method,
                len(self.dataset),
                self.sampler.batches_per_epoch(),
                s.epochs,
                s.batch_size,
                self.world,
                self.device,
                str(self.trainer.amp_dtype).replace("torch.", ""),
            )
        t_plot = time.perf_counter()
        with open(self.log_path, "a") if self.rank == 0 else open(os.devnull, "w") as logf:
            while self.epoch < s.epochs:
                if not self.train_one_epoch(logf, stop_after_steps):
                    self.save()
                    return False
                self.epoch, self.batch = self.epoch + 1, 0
                self.save()
                if self.rank == 0 and time.perf_counter() - t_plot > 60:  # at most once a minute
                    plot_losses(self.log_path, self.out / "loss_curves.png", s.out_dim)
                    t_plot = time.perf_counter()
                if stop_after_steps is not None and self.step >= stop_after_steps and self.epoch < s.epochs:
                    return False
        if self.rank == 0:
            self.write_backbone()
            plot_losses(self.log_path, self.out / "loss_curves.png", s.out_dim)
        return True

    def train_one_epoch(self, logf, stop_after_steps: int | None) -> bool:
        """The rest of the current epoch; False when stopped early by `stop_after_steps`."""
        s, n = self.s, self.sampler.batches_per_epoch()
        self.sampler.set_epoch(self.epoch, self.batch)
        meter = Meter()
        warned = False
        for batch in meter.waiting(self.loader):
            m = self.trainer.step(batch, self.step, self.epoch)
            self.step, self.batch = self.step + 1, self.batch + 1
            meter.add(m)
            if self.step % s.log_every == 0 or self.batch >= n:
                row = {
                    "step": self.step,
                    "epoch": self.epoch + self.batch / n,
                    **meter.flush(s.batch_size),
                    **{k: m[k] for k in ("lr", "wd", "teacher_temp", "momentum")},
                    "time": time.time(),
                }
                logf.write(json.dumps(row) + "\n")
                logf.flush()
                why = self.trainer.collapsed(row) if self.step > self.trainer.warmup_steps else None
                if why and not warned and self.rank == 0:
                    log.warning("epoch %d, step %d: training has collapsed (%s)", self.epoch, self.step, why)
                    warned = True
            if self.batch >= n:
                return True
            if stop_after_steps is not None and self.step >= stop_after_steps:
                return False
            if s.checkpoint_every_steps and self.step % s.checkpoint_every_steps == 0:
                self.save()
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
        meta = {
            "arch": self.s.arch,
            "img_size": self.s.img_size,
            "patch_size": self.trainer.patch,
            "embed": self.s.embed,
            "embed_dim": self.trainer.student.embed_dim,
            "num_prefix_tokens": self.trainer.student.num_prefix,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "method": self.s.method,
            "epochs": self.epoch,
            "step": self.step,
            "tile_mpp": mpps.pop() if len(mpps) == 1 else sorted(mpps),
            "tile_px": tile_px.pop() if len(tile_px) == 1 else sorted(tile_px),
            "n_classes": self.n_classes,
            "init": self.meta()["init"],
            "settings": self.s.to_dict(),
            "dirl_version": __version__,
            "load": "timm.create_model(arch, num_classes=0, img_size=img_size, dynamic_img_size=True)"
            ".load_state_dict(torch.load('backbone.pt'))",
        }
        with atomic_path(self.out / "backbone.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=1) + "\n")


def _logged_step(line: str) -> float:
    """The step of a log.jsonl line; infinite (dropped) for an empty or torn line, such as the last line
    of a job killed while writing it."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class Meter:
    """Means of the step statistics between two log lines, throughput, the share of the time spent
    waiting for data (what tells a loader-bound GPU run) and, on a GPU, the peak memory."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.k, self.t_data, self.t0 = 0, 0.0, time.perf_counter()

    def waiting(self, loader):
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.t_data += time.perf_counter() - t
            yield batch

    def add(self, m: dict[str, float]) -> None:
        for key in MEANS:
            self.sums[key] = self.sums.get(key, 0.0) + m[key]
        self.k += 1

    def flush(self, batch_size: int) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        out = {
            **{key: v / self.k for key, v in self.sums.items()},
            "images_per_s": self.k * batch_size / dt,
            "data_wait_frac": self.t_data / dt,
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # what a smaller GPU must hold
            out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        self.sums, self.k, self.t_data, self.t0 = {}, 0, 0.0, now
        return out


# --------------------------------------------------------------------------------------------------
# CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("outdir", help="output directory (results/<cohort>/pretrain/<method>)")
    p.add_argument("--tiles", nargs="+", required=True, help="tile stores tiles/{slide}.zarr")
    p.add_argument("--priors", nargs="+", help="prior stores priors/{slide}.zarr, same order as --tiles")
    p.add_argument(
        "--n-classes", type=int, help="prior classes C = cell classes + 2, if the priors stores do not record n_classes"
    )
    p.add_argument(
        "--restart-on-mismatch",
        action="store_true",
        help="if OUTDIR/checkpoint.pt was "
        "written with other settings or data, start afresh (default: stop with an error); "
        "for workflows that rerun the stage when its settings change",
    )
    p.add_argument(
        "--stop-after-steps",
        type=int,
        help="checkpoint and stop after this many steps in total (a rerun resumes); for time-limited jobs",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads of this job, shared by its processes (0: torch's default)"
    )
    PretrainSettings.add_arguments(p.add_argument_group("settings (dirl.ssl.settings.PretrainSettings)"))


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [Path(args.outdir) / n for n in ("backbone.pt", "backbone.json", "loss_curves.png")], [
        *args.tiles,
        *(args.priors or []),
    ]


def main(args: argparse.Namespace) -> None:
    s = PretrainSettings.from_args(args)
    n_procs = int(os.environ.get("WORLD_SIZE", "1"))
    if n_procs > 1 and not dist.is_initialized():
        use_cuda = s.device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        with torch_threads(max(1, args.threads // local) if args.threads else 0):
            Run(args.outdir, args.tiles, args.priors, s, args.n_classes, args.restart_on_mismatch).run(
                args.stop_after_steps
            )
    finally:
        if n_procs > 1 and dist.is_initialized():
            dist.destroy_process_group()
