"""Every hyper-parameter of a pretraining run (config section `pretrain`, flags of `dirl pretrain`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dirl.errors import ConfigError
from dirl.settings import Settings


def _c(*choices: str, help: str = "") -> Any:
    return field(default=choices[0], metadata={"choices": choices, "help": help})


@dataclass(frozen=True)
class PretrainSettings(Settings):
    """Defaults follow DINO's ViT-S/16 recipe (Caron et al. 2021, facebookresearch/dino), the options
    it offers included (BatchNorm in the head, multi-crop, solarisation)."""

    method: str = _c("dirl", "dino", help="dino: the baseline, the dense term off and not computed")
    arch: str = "vit_small_patch16_224"  # any timm ViT name
    img_size: int = 224  # global crop size (a multiple of the patch size)
    embed: str = _c("cls", "mean", help="image embedding for the DINO head: [CLS] or mean of patch tokens")
    drop_path: float = 0.1  # student stochastic depth
    out_dim: int = 65536  # DINO head output dimension K
    dense_out_dim: int = 4096  # dense head output dimension
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_bn: bool = field(
        default=False,
        metadata={
            "help": "BatchNorm in the heads' MLP (DINO's "
            "use_bn_in_head): keeps small cohorts of similar tiles from collapsing"
        },
    )
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
    clip_grad: float = field(
        default=3.0, metadata={"help": "largest gradient norm of each parameter tensor, as DINO clips (0: off)"}
    )
    freeze_last_layer: int = 1  # epochs with the heads' last layers frozen
    local_crops_number: int = 0  # multi-crop: local crops per image (DINO loss only)
    local_crop_size: int = 96
    global_crop_scale: tuple[float, float] | None = field(
        default=None,
        metadata={
            "help": "random-resized-crop scale of the global views (none: DINO's, 0.14-1 without local "
            "crops, 0.4-1 with them)"
        },
    )
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    solarize_p: float = 0.0  # solarisation of the second global view (DINO uses 0.2)
    color_jitter: float = field(
        default=1.0,
        metadata={
            "help": "strength of the colour jitter, 1 = DINO's "
            "(brightness/contrast 0.4, saturation 0.2, hue 0.1); H&E needs less"
        },
    )
    hed_sigma: float = 0.05  # HED stain jitter strength (0 = off)
    min_tokens: float = 1.0  # a class needs this much area (in tokens) in both views to be matched
    match: str = _c("all", "overlap", help="overlap: pool only inside the region the two crops share")
    exclude_background: bool = True  # no dense term for class 0 (glass)
    tiles_per_slide: int = 0  # at most this many tiles per slide (a fixed random subset); 0 = all
    num_workers: int = 4
    precision: str = _c(
        "auto", "fp32", "bf16", "fp16", help="auto: bf16 on GPUs that have it, else fp16; fp32 on the CPU"
    )
    tf32: bool = True  # TF32 tensor cores for the fp32 parts on NVIDIA GPUs
    compile: bool = False  # torch.compile the backbones
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every_steps: int = 0  # also checkpoint every N steps (0 = once per epoch)
    log_every: int = 10  # steps per log.jsonl line
    seed: int = 0

    def validate(self) -> PretrainSettings:
        super().validate()
        for k in ("img_size", "out_dim", "dense_out_dim", "epochs", "batch_size", "log_every"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"pretrain.{k} must be > 0, got {getattr(self, k)}")
        for k in ("global_crop_scale", "local_crop_scale"):
            v = getattr(self, k)
            if v is not None and not 0 < v[0] <= v[1] <= 1:
                raise ConfigError(f"pretrain.{k} = {list(v)}: need 0 < min <= max <= 1")
        if self.color_jitter < 0:
            raise ConfigError(f"pretrain.color_jitter must be >= 0, got {self.color_jitter}")
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
