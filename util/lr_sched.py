"""Learning-rate schedule: per-step linear warmup, then half-cycle cosine to ``min_lr``.

The MAE rule ([MAE] ``util/lr_sched.py``) evaluated on optimizer steps instead of fractional epochs:
warmup lr * step / warmup_steps, then min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2.
Schedules are pure functions of the step; the training loop owns the counter. ``training_budget`` gives the
quantities every training script derives first: steps per epoch, effective batch and the actual lr. ``poly_lr`` is
mmcv's poly policy with linear warmup (segmentation recipes), ``step_lr`` mmdet's step policy with linear warmup
(detection recipes).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

logger = logging.getLogger("vitfreeze")


def training_budget(*, num_samples: int, num_batches: int, batch_size: int, accum_iter: int, world_size: int,
                    blr: float, lr: float | None = None) -> tuple[int, int, float]:
    """Optimizer steps per epoch, effective batch (batch_size x accum_iter x world_size) and actual lr (MAE's
    ``lr = blr x effective batch / 256`` unless ``lr`` is given); logs the line MAE prints.

    Args:
        num_samples: training samples (for the error message).
        num_batches: batches per epoch of this process's loader.

    Raises:
        ValueError: the data are fewer than one optimizer step needs.
    """
    eff_batch = batch_size * accum_iter * world_size
    steps_per_epoch = num_batches // accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"{num_samples} training samples are fewer than one optimizer step needs ({eff_batch} = "
                         "batch_size x accum_iter x world_size)")
    actual = lr if lr is not None else blr * eff_batch / 256
    logger.info("base lr: %.3e  effective batch: %d  actual lr: %.3e%s", blr, eff_batch, actual,
                "  (--lr given)" if lr is not None else "")
    return steps_per_epoch, eff_batch, actual


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


def poly_lr(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0, power: float = 1.0,
            min_lr: float = 0.0, warmup_ratio: float = 1e-6) -> float:
    """mmcv's ``PolyLrUpdaterHook`` with linear warmup (by iteration), BEiT/MAE's ADE20K schedule.

    ``lr = (base_lr - min_lr) * (1 - step / total_steps) ** power + min_lr``; during warmup it is multiplied by
    ``1 - (1 - step / warmup_steps) * (1 - warmup_ratio)`` (so it starts at ``warmup_ratio`` x the poly value).
    """
    progress = min(step, total_steps) / max(total_steps, 1)
    lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    if step < warmup_steps:
        lr *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return lr


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr to ``lr`` times its ``lr_scale`` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def step_lr(step: int, *, base_lr: float, milestones: Sequence[int], gamma: float = 0.1, warmup_steps: int = 0,
            warmup_ratio: float = 0.001) -> float:
    """mmdet's step schedule (``lr_config = dict(policy='step', warmup='linear', step=[8, 11])``) at update ``step``.

    Args:
        step: optimizer updates done so far.
        base_lr: lr before the first milestone.
        milestones: updates after which the lr is multiplied by ``gamma`` (epochs x steps per epoch).
        gamma: decay factor at each milestone.
        warmup_steps: linear warmup from ``warmup_ratio * lr`` (mmdet's ``warmup_iters``, ratio 0.001).
        warmup_ratio: start of the warmup, as a fraction of the lr it ramps to.
    """
    lr = base_lr * gamma ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        lr *= warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
    return lr
