"""The attention diagnostics' settings (config section `attention`), apart from dirl.analysis.attention so
that the workflow checks them at start-up without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from dirl.settings import Settings, bounded


@dataclass(frozen=True)
class AttentionSettings(Settings):
    n_tiles: int = field(default=256, metadata={"help": "tiles sampled over the cohort", "ge": 1})
    n_overlays: int = bounded(8, ge=0)
    size: int | None = field(
        default=None, metadata={"help": "input size (none: the first backbone's img_size)", "ge": 16}
    )
    source: str = field(
        default="auto",
        metadata={
            "choices": ("auto", "cls", "received"),
            "help": "[CLS] row or mean received attention (auto: cls when trained through [CLS])",
        },
    )
    batch_size: int = bounded(32, ge=1)
    n_classes: int | None = field(
        default=None, metadata={"help": "prior classes, if the priors stores do not say", "ge": 3}
    )
    device: str = "auto"
    seed: int = 0
