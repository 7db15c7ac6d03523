"""The learning-rate schedule: linear warmup, then cosine decay to min_lr over exactly `steps`."""

from __future__ import annotations

import math

from ..config import RunConfig


def warmup_steps(cfg: RunConfig) -> int:
    """`warmup_steps` in steps: whole steps as given, or a fraction of `steps` rounded up (after
    dropping float noise: 0.07 x 100 is 7.000000000000001 in binary, and means 7)."""
    w = cfg.optim.warmup_steps
    return math.ceil(round(w * cfg.schedule.steps, 9)) if isinstance(w, float) else int(w)


def lr_factor(step: int, cfg: RunConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) as a factor of `lr` (for LambdaLR)."""
    o, total, warm = cfg.optim, max(1, cfg.schedule.steps), warmup_steps(cfg)
    if warm and step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    floor = o.min_lr / o.lr if o.lr else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
