"""Every hyper-parameter of a pretraining run (config section `pretrain`, flags of `dirl pretrain`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dirl.errors import ConfigError
from dirl.settings import Settings, bounded


def _c(*choices: str, help: str = "") -> Any:
    return field(default=choices[0], metadata={"choices": choices, "help": help})


@dataclass(frozen=True)
class PretrainSettings(Settings):
    """Defaults follow DINO's ViT-S/16 recipe (Caron et al. 2021, facebookresearch/dino), the options
    it offers included (BatchNorm in the head, multi-crop, solarisation)."""

    method: str = _c("dirl", "dino", help="dino: the baseline, the dense term off and not computed")
    arch: str = "vit_small_patch16_224"  # any timm ViT name
    init: str | None = None  # warm start: a run, a timm folder or weights file, or a DINO checkpoint (dirl.ssl.init)
    img_size: int = bounded(224, ge=16)  # global crop size (a multiple of the patch size)
    embed: str = _c("cls", "mean", help="image embedding for the DINO head: [CLS] or mean of patch tokens")
    drop_path: float = bounded(0.1, ge=0, lt=1)  # student stochastic depth
    out_dim: int = bounded(65536, ge=1)  # DINO head output dimension K
    dense_out_dim: int = bounded(4096, ge=1)  # dense head output dimension
    head_hidden_dim: int = bounded(2048, ge=1)
    head_bottleneck_dim: int = bounded(256, ge=1)
    head_bn: bool = field(
        default=False,
        metadata={
            "help": "BatchNorm in the heads' MLP (DINO's "
            "use_bn_in_head): keeps small cohorts of similar tiles from collapsing"
        },
    )
    lambda_dense: float = bounded(1.0, ge=0)  # weight of the dense loss (method dirl)
    epochs: int = bounded(100, ge=1)
    batch_size: int = bounded(64, ge=1)  # global batch (all processes together)
    lr: float = bounded(0.0005, gt=0)  # base learning rate for a batch of 256 (scaled linearly by batch_size / 256)
    min_lr: float = bounded(1e-6, ge=0)
    warmup_epochs: float = bounded(10.0, ge=0)
    weight_decay: float = bounded(0.04, ge=0)
    weight_decay_end: float = bounded(0.4, ge=0)
    momentum_teacher: float = bounded(0.996, ge=0, le=1)  # EMA momentum, cosine to 1
    teacher_temp: float = bounded(0.04, gt=0)
    warmup_teacher_temp: float = bounded(0.04, gt=0)
    warmup_teacher_temp_epochs: int = bounded(0, ge=0)
    student_temp: float = bounded(0.1, gt=0)
    center_momentum: float = bounded(0.9, ge=0, le=1)
    clip_grad: float = field(
        default=3.0,
        metadata={"help": "largest gradient norm of each parameter tensor, as DINO clips (0: off)", "ge": 0},
    )
    freeze_last_layer: int = bounded(1, ge=0)  # epochs with the heads' last layers frozen
    local_crops_number: int = bounded(0, ge=0)  # multi-crop: local crops per image (DINO loss only)
    local_crop_size: int = bounded(96, ge=16)
    global_crop_scale: tuple[float, float] | None = field(
        default=None,
        metadata={
            "help": "random-resized-crop scale of the global views (none: DINO's, 0.14-1 without local "
            "crops, 0.4-1 with them)"
        },
    )
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    solarize_p: float = bounded(0.0, ge=0, le=1)  # solarisation of the second global view (DINO uses 0.2)
    color_jitter: float = field(
        default=1.0,
        metadata={
            "ge": 0,
            "help": "strength of the colour jitter, 1 = DINO's "
            "(brightness/contrast 0.4, saturation 0.2, hue 0.1); H&E needs less",
        },
    )
    hed_sigma: float = bounded(0.05, ge=0)  # HED stain jitter strength (0 = off)
    min_tokens: float = bounded(1.0, ge=0)  # a class needs this much area (in tokens) in both views to be matched
    match: str = _c("all", "overlap", help="overlap: pool only inside the region the two crops share")
    exclude_background: bool = True  # no dense term for class 0 (glass)
    tiles_per_slide: int = bounded(0, ge=0)  # at most this many tiles per slide (a fixed random subset); 0 = all
    num_workers: int = bounded(4, ge=0)
    precision: str = _c(
        "auto", "fp32", "bf16", "fp16", help="auto: bf16 on GPUs that have it, else fp16; fp32 on the CPU"
    )
    tf32: bool = True  # TF32 tensor cores for the fp32 parts on NVIDIA GPUs
    compile: bool = False  # torch.compile the backbones
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every_steps: int = bounded(0, ge=0)  # also checkpoint every N steps (0 = once per epoch)
    log_every: int = bounded(10, ge=1)  # steps per log.jsonl line
    seed: int = 0

    def validate(self) -> PretrainSettings:
        super().validate()
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(
                f"pretrain.warmup_epochs = {self.warmup_epochs:g} is not below pretrain.epochs = {self.epochs}: the "
                "learning rate would never reach its peak nor its cosine decay; lower warmup_epochs with epochs"
            )
        for k in ("global_crop_scale", "local_crop_scale"):
            v = getattr(self, k)
            if v is not None and not 0 < v[0] <= v[1] <= 1:
                raise ConfigError(f"pretrain.{k} = {list(v)}: need 0 < min <= max <= 1")
        return self

    @property
    def dense(self) -> bool:
        return self.method == "dirl" and self.lambda_dense > 0

    @property
    def global_scale(self) -> tuple[float, float]:
        """DINO's recommendation: wider global crops when there are no local crops."""
        if self.global_crop_scale is not None:
            return self.global_crop_scale
        return (0.14, 1.0) if self.local_crops_number == 0 else (0.4, 1.0)


# settings that may change between a run and its resumption (they do not change the result)
RUNTIME_KEYS = frozenset({"num_workers", "log_every", "checkpoint_every_steps", "compile", "device"})


def settings_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = (set(a) | set(b)) - RUNTIME_KEYS
    return sorted(k for k in keys if a.get(k) != b.get(k))
