"""Classification step function for the shared loop (fine-tuning and linear probing).

After MAE's ``engine_finetune.train_one_epoch`` body (mixup/cutmix through timm's ``Mixup``, then the criterion),
cut down to one micro-batch: the loop in ``engine/train.py`` owns autocast, backward, accumulation and the step.
``build_criterion`` is MAE's choice of mixup and loss (``main_finetune.py``).
A model may return the logits of several heads at once ([H, B, C], a linear-probe lr grid as in DINOv2): the
loss is the sum of the heads' losses, so each head receives exactly the gradient of its own loss.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


def classify_step(model: nn.Module, batch: Any, step: int, *, criterion: Callable[[torch.Tensor, torch.Tensor],
                  torch.Tensor], device: torch.device, mixup_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch of supervised classification.

    Args:
        model: maps inputs [B, ...] to logits [B, C], or [H, B, C] for H heads trained side by side.
        batch: ``(inputs [B, ...], targets [B], ...)``; extra items (e.g. sample indices) are ignored.
        step: optimizer updates so far (unused; part of the step-function contract).
        criterion: ``criterion(logits [B, C], targets) -> scalar`` (targets are soft [B, C] after mixup).
        device: where the model lives.
        mixup_fn: timm ``Mixup`` applied to (inputs, targets) first, or None.

    Returns:
        ``{'loss': scalar}``; with H > 1 heads the loss is their sum (each head gets its own gradient) and
        ``loss_head<h>`` per head and ``loss_head_mean`` (detached) are logged too: the sum grows with the lr grid
        and is no curve to read.
    """
    inputs = batch[0].to(device, non_blocking=True)
    targets = batch[1].to(device, non_blocking=True)
    if mixup_fn is not None:
        inputs, targets = mixup_fn(inputs, targets)
    logits = model(inputs)
    if logits.ndim == 2:
        return {"loss": criterion(logits, targets)}
    losses = torch.stack([criterion(head_logits, targets) for head_logits in logits])
    out = {"loss": losses.sum()}
    if len(losses) > 1:
        out.update({f"loss_head{h}": loss.detach() for h, loss in enumerate(losses)})
        out["loss_head_mean"] = losses.detach().mean()
    return out


def build_criterion(*, num_classes: int, smoothing: float, mixup: float = 0.0, cutmix: float = 0.0,
                    cutmix_minmax: list[float] | None = None, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5,
                    mixup_mode: str = "batch") -> tuple[Mixup | None, nn.Module]:
    """MAE's choice (``main_finetune.py``): timm mixup/cutmix with smoothing folded into soft targets -> soft-target CE;
    else label-smoothing CE when ``smoothing`` > 0; else plain CE. Arguments are MAE's flags of the same names.

    Returns:
        ``(mixup_fn or None, criterion)``.
    """
    if mixup > 0 or cutmix > 0 or cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax, prob=mixup_prob,
                         switch_prob=mixup_switch_prob, mode=mixup_mode, label_smoothing=smoothing,
                         num_classes=num_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    return None, LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()
