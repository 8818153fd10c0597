"""Learning-rate schedule: per-step linear warmup, then half-cycle cosine to ``min_lr``.

The MAE rule ([MAE] ``util/lr_sched.py``) evaluated on optimizer steps instead of fractional epochs:
warmup lr * step / warmup_steps, then min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2.
Schedules are pure functions of the step; the training loop owns the counter.
"""
from __future__ import annotations

import math

import torch


def cosine_lr(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based).

    Args:
        step: optimizer updates done so far.
        base_lr: peak learning rate, reached at the end of warmup.
        min_lr: value at (and after) ``total_steps``.
        warmup_steps: linear warmup length; starts at exactly 0 like MAE.
        total_steps: length of the whole schedule.
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr to ``lr`` times its ``lr_scale`` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
