"""The learning-rate schedule: linear warmup, then cosine decay to min_lr over exactly `steps`."""
from __future__ import annotations

import math

from ..config import RunConfig


def lr_factor(step: int, cfg: RunConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) as a factor of `lr` (for LambdaLR)."""
    o, total = cfg.optim, max(1, cfg.schedule.steps)
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    floor = o.min_lr / o.lr if o.lr else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
