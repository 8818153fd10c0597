"""Classification step function for the shared loop (fine-tuning and linear probing).

After MAE's ``engine_finetune.train_one_epoch`` body (mixup/cutmix through timm's ``Mixup``, then the criterion),
cut down to one micro-batch: the loop in ``engine/train.py`` owns autocast, backward, accumulation and the step.
A model may return the logits of several heads at once ([H, B, C], a linear-probe lr grid as in DINOv2): the
loss is the sum of the heads' losses, so each head receives exactly the gradient of its own loss.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn


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
        ``{'loss': scalar}``; with H > 1 heads also ``loss_head<h>`` (detached) per head.
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
    return out
