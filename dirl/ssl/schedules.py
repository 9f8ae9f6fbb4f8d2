"""Per-step schedules of DINO (Caron et al. 2021): cosine with linear warm-up, and the teacher-temperature
warm-up. Pure functions of the step, so a resumed run needs no schedule state."""

from __future__ import annotations

import math


def cosine(
    step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from `warmup_start` to `base` over `warmup_steps`, then a half cosine from `base`
    towards `final` over the remaining steps, exactly as DINO's `cosine_scheduler` (which divides by the
    number of cosine steps, so the last value is just above `final`). Steps past the end give `final`."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    rest = total_steps - warmup_steps
    if step >= total_steps or rest <= 0:
        return final
    t = (step - warmup_steps) / rest
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """DINO's teacher temperature: linear from `warmup_temp` to `temp` over `warmup_epochs`, then flat."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * epoch / warmup_epochs
