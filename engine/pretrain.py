"""Masked-image-modeling step functions for the shared loop (MAE and LocalMIM).

The model computes its own targets and loss (pixel or HOG); this file only adapts a batch to the
model's forward and picks the scalars worth logging.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from util.distributed import unwrap
from models.masking import keyed_noise


def mim_step(model: nn.Module, batch: Any, step: int, *, mask_ratio: float, device: torch.device,
             num_frozen: int = 0) -> dict[str, torch.Tensor]:
    """One micro-batch of masked image modeling.

    Args:
        model: a masked image model (possibly DDP-wrapped); ``model(imgs, mask_ratio, num_frozen)`` returns
            a dict with ``loss``, ``stage_losses`` and ``scales``.
        batch: ``(images [B, 3, H, W], labels)`` or ``(images, labels, sample keys [B])``; labels are ignored.
            With keys (``util.data.loaders.KeyedSamples``) each sample's mask is drawn from its key
            (``models.masking.keyed_noise``), else from the global RNG.
        step: optimizer updates so far (unused here; part of the step-function contract).
        mask_ratio: fraction of patches removed.
        device: where the model lives.
        num_frozen: length of the frozen prefix of units (FreezeOut); 0 trains everything.

    Returns:
        ``{'loss': scalar}`` plus ``loss_x<scale>`` per stage when the model has several stages.
    """
    imgs = batch[0].to(device, non_blocking=True)
    noise = keyed_noise(batch[2], unwrap(model).patch_embed.num_patches, device) if len(batch) > 2 else None
    out = model(imgs, mask_ratio=mask_ratio, num_frozen=num_frozen, noise=noise)
    result = {"loss": out["loss"]}
    if len(out["stage_losses"]) > 1:
        for scale, loss in zip(out["scales"], out["stage_losses"]):
            result[f"loss_x{scale:g}"] = loss.detach()
    return result


@torch.no_grad()
def reconstruct(model: nn.Module, imgs: torch.Tensor, *, mask_ratio: float, seed: int = 0) -> dict[str, Any]:
    """Forward with a fixed mask (seeded generator) for pictures; restores the model's mode afterwards."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=imgs.device).manual_seed(seed)
    try:
        return model(imgs, mask_ratio=mask_ratio, generator=generator)
    finally:
        model.train(was_training)
