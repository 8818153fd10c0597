"""Image transforms: MAE pretraining augmentation, the resize + center-crop evaluation pipeline, display helper.

- ``pretrain_transform``: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip + ToTensor + ImageNet
  normalize, exactly MAE's ``main_pretrain.py`` (He et al., "Masked Autoencoders Are Scalable Vision
  Learners", 2022); LocalMIM and ViTFreeze use the same pipeline.
- ``eval_transform``: Resize(input_size / crop_pct, bicubic) + CenterCrop, crop_pct 224/256 up to 224 px else 1.0
  (MAE's ``util/datasets.py build_transform`` for eval; DINO's k-NN transform); used by k-NN and linear probing.
- ``denormalize``: undo the ImageNet normalization for pictures.

Fine-tuning's RandAugment pipeline is timm's ``create_transform`` and is not repeated here.
"""
from __future__ import annotations

from typing import Callable

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD

__all__ = ["MEAN", "STD", "pretrain_transform", "eval_transform", "denormalize"]


def pretrain_transform(input_size: int) -> Callable:
    """MAE pretraining augmentation (SPEC 2.4); nothing else is applied.

    Args:
        input_size: side of the square output crop in pixels.

    Returns:
        A callable mapping a PIL RGB image to a normalized float tensor [3, input_size, input_size].
    """
    return T.Compose([
        T.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def eval_transform(input_size: int, crop_pct: float | None = None) -> Callable:
    """Deterministic evaluation transform: bicubic resize of the short side, center crop, normalize.

    Args:
        input_size: side of the square output crop in pixels.
        crop_pct: crop fraction; the short side is resized to ``int(input_size / crop_pct)``. Default 224/256 for
            ``input_size <= 224`` (so 224 -> 256) and 1.0 above (MAE's rule).

    Returns:
        A callable mapping a PIL RGB image to a normalized float tensor [3, input_size, input_size].
    """
    if crop_pct is None:
        crop_pct = 224 / 256 if input_size <= 224 else 1.0
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return T.Compose([
        T.Resize(int(input_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(input_size),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalization for display.

    Args:
        x: normalized images [B, 3, H, W] (or [3, H, W]).

    Returns:
        Float tensor of the same shape with values clamped to [0, 1].
    """
    mean = torch.tensor(MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() * std + mean).clamp_(0.0, 1.0)
