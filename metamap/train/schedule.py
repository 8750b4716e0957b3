"""Learning-rate schedules as pure functions of the step (so resuming needs only the step)."""
from __future__ import annotations

import math

from metamap.config import ScheduleOptions


def lr_factor(step: int, total_steps: int, cfg: dict, base_lr: float = 1.0) -> float:
    """Multiplier of the base learning rate ``base_lr`` at ``step`` (0-based), for a ``[schedule]`` section.

    constant: 1.  step: ``gamma ** (step // step_size)``.  cosine: from 1 down to
    ``min_lr / base_lr`` over ``total_steps``.  linear: from 1 down to ``min_lr / base_lr`` in equal
    steps over ``total_steps`` (Reptile's outer step size: ``1 - step / total_steps`` with
    ``min_lr = 0``).  ``warmup`` steps of linear ramp-up come first for all.
    """
    o = ScheduleOptions.from_section(cfg)
    if o.warmup > 0 and step < o.warmup:
        return (step + 1) / o.warmup
    if o.name == "constant":
        return 1.0
    if o.name == "step":
        return o.gamma ** (step // o.step_size)
    floor = o.min_lr / base_lr
    t = min(1.0, (step - o.warmup) / max(1, total_steps - o.warmup))
    if o.name == "linear":
        return 1 - (1 - floor) * t
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
