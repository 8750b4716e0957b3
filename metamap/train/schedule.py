"""Learning-rate schedules as pure functions of the step (so resuming needs only the step)."""
from __future__ import annotations

import math

from metamap.errors import ConfigError

SCHEDULES = ("constant", "step", "cosine", "linear")


def lr_factor(step: int, total_steps: int, cfg: dict) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    constant: 1.  step: ``gamma ** (step // step_size)``.  cosine: from 1 down to
    ``min_lr / lr`` over ``total_steps``.  linear: from 1 down to ``min_lr / lr`` in equal steps
    over ``total_steps`` (Reptile's outer step size: ``1 - step / total_steps`` with ``min_lr = 0``).
    ``warmup`` steps of linear ramp-up come first for all.
    """
    name = cfg.get("name", "constant")
    warmup = int(cfg.get("warmup", 0))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    if name == "step":
        size = int(cfg.get("step_size", 1000))
        if size < 1:
            raise ConfigError(f"schedule.step_size must be >= 1, not {size}")
        return float(cfg.get("gamma", 0.5)) ** (step // size)
    if name == "cosine":
        floor = float(cfg.get("min_lr", 0.0)) / float(cfg.get("base_lr", 1.0))
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if name == "linear":
        floor = float(cfg.get("min_lr", 0.0)) / float(cfg.get("base_lr", 1.0))
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1 - (1 - floor) * t
    raise ConfigError(f"unknown schedule.name {name!r}; choose one of {', '.join(SCHEDULES)}")
