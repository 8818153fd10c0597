"""Image transforms: MAE pretraining augmentation, the resize + center-crop evaluation pipeline, display helper.

- ``pretrain_transform``: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip + ToTensor + ImageNet
  normalize, exactly MAE's ``main_pretrain.py`` (He et al., "Masked Autoencoders Are Scalable Vision
  Learners", 2022); LocalMIM and ViTFreeze use the same pipeline.
- ``eval_transform``: Resize(input_size / crop_pct, bicubic) + CenterCrop, crop_pct 224/256 up to 224 px else 1.0
  (MAE's ``util/datasets.py build_transform`` for eval; DINO's k-NN transform); used by k-NN and linear probing.
- ``finetune_transform``: MAE's fine-tuning augmentation (``util/datasets.py build_transform``) through
  timm's ``create_transform``: RandomResizedCrop (bicubic) + flip + RandAugment + normalize + RandomErasing; its
  posterize op keeps working with Pillow 13 (see ``posterize``).
- ``linprobe_transform``: MAE's linear-probe augmentation: its TF-style ``RandomResizedCrop`` (``util/crop.py``,
  one draw clamped to the image, BYOL's TF code; torchvision's tries 10 draws and falls back to a center crop,
  which gives smaller crops: mean area 0.435 against 0.518) + flip + normalize (MAE ``main_linprobe.py``).
- ``denormalize``: undo the ImageNet normalization for pictures.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment as timm_aa
from torchvision import transforms as T

MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD

__all__ = ["MEAN", "STD", "pretrain_transform", "eval_transform", "finetune_transform", "linprobe_transform",
           "MAERandomResizedCrop", "denormalize"]


def pretrain_transform(input_size: int) -> Callable:
    """MAE pretraining augmentation (``main_pretrain.py``); nothing else is applied.

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


class MAERandomResizedCrop(T.RandomResizedCrop):
    """MAE's ``util/crop.py`` RandomResizedCrop (TF/TPU style, after BYOL's ``dataset.py``): one draw of area and
    log-uniform aspect ratio, the crop's sides clamped to the image, then a uniform position. No retries and no
    center-crop fallback, unlike torchvision's. Randomness from the global torch RNG, as torchvision's."""

    @staticmethod
    def get_params(img: Any, scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
        """Returns (top, left, height, width) of the crop."""
        width, height = T.functional.get_image_size(img)
        target_area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item()).item())
        w = min(int(round(math.sqrt(target_area * aspect))), width)
        h = min(int(round(math.sqrt(target_area / aspect))), height)
        top = int(torch.randint(0, height - h + 1, size=(1,)).item())
        left = int(torch.randint(0, width - w + 1, size=(1,)).item())
        return top, left, h, w


def linprobe_transform(input_size: int) -> Callable:
    """MAE's linear-probe training augmentation (``main_linprobe.py``): TF-style RandomResizedCrop (bicubic, scale
    0.08-1) + horizontal flip + normalize.

    Returns:
        A callable mapping a PIL RGB image to a normalized float tensor [3, input_size, input_size].
    """
    return T.Compose([MAERandomResizedCrop(input_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def finetune_transform(input_size: int, *, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                       color_jitter: float | None = None, re_prob: float = 0.25, re_mode: str = "pixel",
                       re_count: int = 1) -> Callable:
    """MAE's fine-tuning augmentation, built by timm's ``create_transform(is_training=True)`` (MAE
    ``util/datasets.py``).

    RandomResizedCrop(input_size, scale 0.08-1, ratio 3/4-4/3, bicubic) -> horizontal flip 0.5 -> RandAugment
    (or another timm auto-augment policy) -> ToTensor -> ImageNet normalize -> RandomErasing.

    Args:
        input_size: side of the square output crop in pixels.
        auto_augment: timm policy string (MAE: ``rand-m9-mstd0.5-inc1``); None or ``'none'``: no auto-augment.
        color_jitter: brightness/contrast/saturation jitter; timm applies it only without auto-augment (MAE
            passes None).
        re_prob: RandomErasing probability (MAE's ``--reprob``; 0 disables it).
        re_mode: erased-pixel fill: ``'pixel'`` (per-pixel N(0, 1)), ``'rand'`` (per channel) or ``'const'``.
        re_count: erased boxes per image (MAE's ``--recount``).

    Returns:
        A callable mapping a PIL RGB image to a normalized float tensor [3, input_size, input_size].

    Raises:
        ValueError: ``auto_augment`` is not a policy timm knows.
    """
    if auto_augment is not None and auto_augment.lower() in ("", "none"):
        auto_augment = None
    try:
        transform = create_transform(input_size=input_size, is_training=True, color_jitter=color_jitter,
                                     auto_augment=auto_augment, interpolation="bicubic", re_prob=re_prob,
                                     re_mode=re_mode, re_count=re_count, mean=MEAN, std=STD)
    except (AssertionError, KeyError, ValueError) as err:  # timm asserts on a malformed policy string
        raise ValueError(f"invalid auto-augment policy {auto_augment!r} (e.g. rand-m9-mstd0.5-inc1, "
                         f"original, v0, augmix-m5-w4-d2, or none): {type(err).__name__} {err}") from err
    for op in _augment_ops(transform):
        if op.aug_fn is timm_aa.posterize:
            op.aug_fn = posterize
    return transform


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's ``posterize`` op with the semantics its policies were written for: 0 bits kept gives a black image.

    MAE's ``rand-m9-mstd0.5-inc1`` asks for 0 bits whenever the sampled magnitude is clipped at 10 (about 1 image in
    700), as do AutoAugment's ``v0``/``original`` policies at low levels. Older Pillow (and TF's shift-based op)
    return zeros there; Pillow 13 raises ``ValueError: bits must be between or equal to 1 and 8``, which killed
    fine-tuning within its first epoch. Same result as before for 1 to 8 bits.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _augment_ops(transform: Any) -> list:
    """timm ``AugmentOp`` objects inside a ``Compose`` (RandAugment / AugMix ``ops``, AutoAugment ``policy``)."""
    ops = []
    for t in getattr(transform, "transforms", []):
        if isinstance(t, (timm_aa.RandAugment, timm_aa.AugMixAugment)):
            ops += list(t.ops)
        elif isinstance(t, timm_aa.AutoAugment):
            ops += [op for sub_policy in t.policy for op in sub_policy]
    return ops


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
