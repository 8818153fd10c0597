"""DETR's multi-scale training augmentation for detection ("MS"), as mmdet configs write it.

DETR (Carion et al., ECCV 2020) and Sparse R-CNN train with a random horizontal flip and then one of two policies,
chosen with equal probability (mmdet ``AutoAugment``; ViT-Adapter
``detection/configs/mask_rcnn/dinov2/mask_rcnn_dinov2_adapter_base_fpn_3x_coco.py``, iBOT / dBOT
``evaluation/object_detection/configs/cascade_rcnn/vit_base_giou_4conv1f_coco_3x.py``):

1. resize, keeping the aspect ratio, so that the shorter side is one of 480, 512, ..., 800 (the longer at most
   1333; mmdet ``Resize(img_scale=[(480, 1333), ..., (800, 1333)], multiscale_mode='value', keep_ratio=True)``);
2. resize so that the shorter side is one of 400, 500, 600, crop a random window whose height and width are drawn
   from [384, 600] (``RandomCrop(crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True)``),
   then resize the window as in 1 (``override=True``).

ViT-Adapter's configs then crop a random window of at most 1024 x 1024 (``RandomCrop(crop_size=(1024, 1024))``;
``crop=1024`` here; dBOT's config does not: ``crop=0``). Image resizes are bilinear (mmcv ``imresize``), mask
resizes nearest (mmcv ``BitmapMasks.rescale``): the masks are gathered once at the end through the composed
row / column index maps, so full-size masks are never resized. Boxes are scaled, shifted and clipped with the
image; instances whose box becomes empty are dropped (mmdet ``RandomCrop``'s ``valid_inds``), the image is kept
even with no instance left (``allow_negative_crop``). Randomness comes from torch's global generator.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SHORT_SIDES", "CROP_SHORT_SIDES", "CROP_RANGE", "MAX_LONG_SIDE", "TRAIN_AUGMENTATIONS",
           "keep_ratio_size", "detr_multiscale_crop", "train_transform"]

SHORT_SIDES = tuple(range(480, 801, 32))
CROP_SHORT_SIDES = (400, 500, 600)
CROP_RANGE = (384, 600)
MAX_LONG_SIDE = 1333
TRAIN_AUGMENTATIONS = ("detr_ms", "lsj")

Target = dict[str, Any]


def keep_ratio_size(h: int, w: int, short: int, long: int = MAX_LONG_SIDE) -> tuple[int, int]:
    """(height, width) of an ``h x w`` image resized, aspect kept, to fit ``short`` x ``long`` (mmcv
    ``rescale_size``: factor min(long / longer side, short / shorter side), sides rounded half up)."""
    factor = min(long / max(h, w), short / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _choice(values: Sequence[int]) -> int:
    return values[int(torch.randint(len(values), ()))]


class _Geometry:
    """The image and boxes under a chain of resizes and crops, plus the source row / column of each pixel."""

    def __init__(self, image: Tensor, boxes: Tensor) -> None:
        self.image, self.boxes = image, boxes.clone()
        self.rows, self.cols = torch.arange(image.shape[1]), torch.arange(image.shape[2])
        self.scale = 1.0  # item pixels per source pixel

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[2]

    def flip(self) -> None:
        w = self.size[1]
        self.image, self.cols = self.image.flip(-1), self.cols.flip(0)
        self.boxes = torch.stack([w - self.boxes[:, 2], self.boxes[:, 1], w - self.boxes[:, 0], self.boxes[:, 3]], 1)

    def resize(self, short: int) -> None:
        (h, w), (nh, nw) = self.size, keep_ratio_size(*self.size, short)
        self.image = F.interpolate(self.image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        self.rows = self.rows[_nearest(h, nh)]
        self.cols = self.cols[_nearest(w, nw)]
        self.boxes = self.boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        self.scale *= nh / h

    def random_crop(self, low: int, high: int) -> None:
        """mmdet ``RandomCrop(crop_type='absolute_range', crop_size=(low, high))``."""
        h, w = self.size
        ch = int(torch.randint(min(h, low), min(h, high) + 1, ()))
        cw = int(torch.randint(min(w, low), min(w, high) + 1, ()))
        y0, x0 = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
        self.image = self.image[:, y0:y0 + ch, x0:x0 + cw]
        self.rows, self.cols = self.rows[y0:y0 + ch], self.cols[x0:x0 + cw]
        b = self.boxes - torch.tensor([x0, y0, x0, y0], dtype=self.boxes.dtype)
        self.boxes = torch.stack([b[:, 0].clamp(0, cw), b[:, 1].clamp(0, ch), b[:, 2].clamp(0, cw),
                                  b[:, 3].clamp(0, ch)], dim=1)


def _nearest(size: int, new_size: int) -> Tensor:
    """Source index of each output index of a nearest resize ``size -> new_size`` (floor(i * size / new_size))."""
    return (torch.arange(new_size, dtype=torch.float64) * (size / new_size)).floor().long().clamp_(max=size - 1)


def detr_multiscale_crop(image: Tensor, target: Target, *, crop: int = 0, flip_prob: float = 0.5,
                         short_sides: Sequence[int] = SHORT_SIDES) -> tuple[Tensor, Target]:
    """DETR's multi-scale augmentation (module docstring) of one ``util.data.coco.CocoInstances`` item.

    Args:
        crop: the final random crop's largest side (ViT-Adapter 1024); 0: none (dBOT).
        short_sides: policy 1's (and policy 2's last) shorter sides.

    Returns:
        the image at its new size and the target with ``boxes``, ``labels``, ``masks`` kept for the instances
        whose box is not empty; ``scale`` is the resizes' factor (item pixels per file pixel).
    """
    geo = _Geometry(image, target["boxes"])
    if float(torch.rand(())) < flip_prob:
        geo.flip()
    if float(torch.rand(())) < 0.5:
        geo.resize(_choice(short_sides))
    else:
        geo.resize(_choice(CROP_SHORT_SIDES))
        geo.random_crop(*CROP_RANGE)
        geo.resize(_choice(short_sides))
    if crop:
        geo.random_crop(crop, crop)
    boxes = geo.boxes
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    masks = target["masks"][keep][:, geo.rows][:, :, geo.cols]
    return geo.image.contiguous(), {**target, "boxes": boxes[keep], "labels": target["labels"][keep],
                                    "masks": masks, "scale": geo.scale}


def train_transform(kind: str, *, size: int, scale_range: Sequence[float] = (0.1, 2.0), crop: int = 0
                    ) -> Callable[[Tensor, Target], tuple[Tensor, Target]]:
    """The detection training augmentation ``kind``: ``detr_ms`` (:func:`detr_multiscale_crop` with ``crop``) or
    ``lsj`` (ViTDet's large-scale jitter onto ``size x size`` over ``scale_range``, ``util.data.coco``)."""
    from functools import partial

    from util.data.coco import large_scale_jitter
    if kind == "detr_ms":
        return partial(detr_multiscale_crop, crop=crop)
    if kind == "lsj":
        return partial(large_scale_jitter, size=size, scale_range=scale_range)
    raise ValueError(f"unknown detection augmentation {kind!r}; choose one of {TRAIN_AUGMENTATIONS}")
