"""Masked-image-modeling pretraining (MAE and LocalMIM): the step function for the shared loop and the builders
of ``main_pretrain.py``.

The model computes its own targets and loss (pixel or HOG); ``mim_step`` only adapts a batch to the model's forward
and picks the scalars worth logging. ``build_data`` and ``build_model`` read MAE's / LocalMIM's flags (MAE
``main_pretrain.py``, LocalMIM ``run_pretrain.py``); ``save_reconstruction`` draws MAE's visualisation of a fixed
mask.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import models
from util.data.decode import build_fast_input, DeviceInput, use_fast_input
from util.data.folder import build_pretrain_dataset
from util.data.loaders import build_train_loader
from util.data.transforms import pretrain_transform
from util.distributed import DistInfo, unwrap
from models.masking import keyed_noise

logger = logging.getLogger("vitfreeze")


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


def build_data(args: argparse.Namespace, info: DistInfo) -> tuple[Dataset, DataLoader | DeviceInput]:
    """The pretraining set (``--data_path``: MAE's ``train/`` or LocalMIM's flat folder, or ``demo``) under MAE's
    pretraining augmentation, read through ``--decode``'s fast input when not ``pil``, and its training loader."""
    dataset = use_fast_input(build_pretrain_dataset(args.data_path, pretrain_transform(args.input_size),
                                                    strict_data=args.strict_data, debug=args.debug,
                                                    demo_size=args.input_size),
                             build_fast_input(args.decode, args.input_size))
    loader = build_train_loader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                pin_memory=args.pin_mem, rank=info.rank, world_size=info.world_size, seed=args.seed,
                                device=info.device, strict_data=args.strict_data)
    return dataset, loader


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    kwargs = {}
    if args.all_stages:  # ViTFreeze's 12 decoders, one after every block of a depth-12 model (ViTFreeze's all-stage LocalMIM)
        if not args.model.startswith("MIM_"):
            raise ValueError(f"--all_stages needs a LocalMIM model (MIM_*), got {args.model}")
        kwargs = {"stage_blocks": list(range(12)), "scales": [8, 4, 4, 2, 2, 2, 2, 2, 2, 1, 1, 0.5]}
    return models.create_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                               hog_nbins=args.hog_nbins, hog_compat=args.hog_compat, target=args.target,
                               freeze_patch_embed=not args.dont_freeze_pe, freeze_cls_token=not args.vitfreeze_compat,
                               **kwargs)


def partial_describe(model: torch.nn.Module):
    """Names a unit for the freeze log line."""
    first_block = int(model.freeze_patch_embed)
    return lambda unit: (f"blocks.{unit - first_block} (unit {unit})" if unit >= first_block
                         else "patch embedding + cls token (unit 0)")


def save_reconstruction(model: torch.nn.Module, imgs: torch.Tensor, args: argparse.Namespace, path: Path) -> None:
    from util.vis import save_reconstruction_png  # lazy: pictures are optional
    out = reconstruct(model, imgs, mask_ratio=args.mask_ratio)
    save_reconstruction_png(path, imgs, out, model.patch_size, norm_pix_loss=args.norm_pix_loss,
                            target=model.target_kind)
    logger.info("wrote %s", path)
