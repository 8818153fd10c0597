"""COCO instances in the standard layout, and ViTDet's large-scale jitter.

Layout (as ``mmdet``'s ``CocoDataset`` and torchvision's ``CocoDetection`` read it)::

    <root>/annotations/instances_{train,val}2017.json
    <root>/{train,val}2017/<file_name>

Items are ``(image [3, H, W] float in [0, 1], target)`` with ``target``: ``boxes`` [N, 4] xyxy float,
``labels`` [N] int64 in 1..K (category ids sorted, made contiguous; 0 is torchvision's background), ``masks``
[N, H, W] uint8, ``image_id``, ``orig_size`` (H, W of the file) and ``scale`` (pixels of the item per pixel of
the file). Conventions of torchvision's detection references and detectron2:

- crowd annotations and degenerate boxes (width or height < 1 pixel) are not training targets (they stay in the
  ground truth that COCO evaluation reads, where crowd regions are "ignore");
- training skips images without any remaining annotation (detectron2 ``filter_empty_annotations``, mmdet
  ``filter_empty_gt``); evaluation keeps every image, and an image without objects is a valid item with empty
  targets;
- an annotation file that does not match the images (a listed file missing from the folder, an annotation of an
  unknown image or category, an image whose pixel size differs from its entry) is a ``ValueError`` naming it.

**Large-scale jitter** (Ghiasi et al., CVPR 2021; ViTDet's 1024 recipe, detectron2 ``ResizeScale`` +
``FixedSizeCrop`` + ``RandomFlip``): resize so that the image fits ``size x size`` times a factor drawn from
[0.1, 2.0], crop a random ``size x size`` window when larger, flip half of the images, and pad to ``size x size``
(grey 128, as detectron2's pad value). Randomness comes from torch's global generator, which
``util.data.loaders.KeyedSamples`` seeds per sample.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

logger = logging.getLogger("vitfreeze")

__all__ = ["CocoInstances", "decode_segmentation", "large_scale_jitter", "collate_detection"]

Target = dict[str, Any]


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as a bool [H, W] mask."""
    from faster_coco_eval.core import mask as mask_util  # lazy: the dense extra
    if isinstance(segm, list):  # polygons: one RLE per part, merged
        rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_util.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_util.decode(rle).astype(bool)


class CocoInstances(Dataset):
    """COCO instances of one split (``train`` or ``val``).

    Args:
        root: dataset root (see the module docstring).
        split: ``train`` or ``val``.
        transform: ``transform(image, target) -> (image, target)`` (e.g. :func:`large_scale_jitter`), or None.
        train: skip images without training targets (see the module docstring).

    Attributes:
        gt: the annotation file's content (what COCO evaluation compares against).
        category_ids: COCO id of label k at index k - 1; ``classes``: their names.
        image_ids: the ids of the items, in order.

    Raises:
        FileNotFoundError: no annotation file or image folder.
        ValueError: the annotation file does not match the images (see the module docstring).
    """

    def __init__(self, root: str | Path, split: str, *, transform: Callable[[Tensor, Target],
                 tuple[Tensor, Target]] | None = None, train: bool = False) -> None:
        root = Path(root)
        self.ann_file = root / "annotations" / f"instances_{split}2017.json"
        self.folder = root / f"{split}2017"
        for path in (self.ann_file, self.folder):
            if not path.exists():
                raise FileNotFoundError(f"COCO layout: {path} is missing (expected <root>/annotations/"
                                        f"instances_{split}2017.json and <root>/{split}2017/)")
        self.gt = json.loads(self.ann_file.read_text())
        self.transform = transform
        self._check_and_index(train)

    def _check_and_index(self, train: bool) -> None:
        images = {img["id"]: img for img in self.gt.get("images", [])}
        cats = sorted(c["id"] for c in self.gt.get("categories", []))
        if not images or not cats:
            raise ValueError(f"{self.ann_file}: no images or no categories")
        names = {c["id"]: c["name"] for c in self.gt["categories"]}
        self.category_ids, self.classes = cats, [names[c] for c in cats]
        on_disk = {p.name for p in self.folder.iterdir()}
        missing = sorted(img["file_name"] for img in images.values() if Path(img["file_name"]).name not in on_disk)
        if missing:
            raise ValueError(f"{self.ann_file} does not match {self.folder}: {len(missing)} of {len(images)} listed "
                             f"images are not there (e.g. {', '.join(missing[:3])})")
        label_of = {c: k + 1 for k, c in enumerate(cats)}
        self.anns: dict[int, list[dict]] = {i: [] for i in images}
        for ann in self.gt.get("annotations", []):
            if ann["image_id"] not in images:
                raise ValueError(f"{self.ann_file}: annotation {ann.get('id')} refers to image {ann['image_id']}, "
                                 f"which is not in 'images'")
            if ann["category_id"] not in label_of:
                raise ValueError(f"{self.ann_file}: annotation {ann.get('id')} has category {ann['category_id']}, "
                                 f"which is not in 'categories' {cats}")
            self.anns[ann["image_id"]].append(ann)
        self.label_of, self.images = label_of, images
        ids = sorted(images)
        if train:
            kept = [i for i in ids if any(_usable(a) for a in self.anns[i])]
            if len(kept) < len(ids):
                logger.info("%s: %d of %d images have no training annotation and are skipped (training only)",
                            self.ann_file.name, len(ids) - len(kept), len(ids))
            ids = kept
        if not ids:
            raise ValueError(f"{self.ann_file}: no image with a usable annotation")
        self.image_ids = ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image_id = self.image_ids[index]
        info = self.images[image_id]
        with Image.open(self.folder / Path(info["file_name"]).name) as pil:
            pil = pil.convert("RGB")
        w, h = pil.size
        if (h, w) != (info["height"], info["width"]):
            raise ValueError(f"{self.folder / info['file_name']} is {w}x{h} pixels but {self.ann_file.name} says "
                             f"{info['width']}x{info['height']}: annotations and images do not match")
        image = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div_(255)
        anns = [a for a in self.anns[image_id] if _usable(a)]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = np.stack([decode_segmentation(a["segmentation"], h, w) for a in anns]) if anns else \
            np.zeros((0, h, w), bool)
        target = {"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns],
                                                         dtype=torch.int64),
                  "masks": torch.from_numpy(masks.astype(np.uint8)), "image_id": image_id, "orig_size": (h, w),
                  "scale": 1.0}
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def _usable(ann: dict) -> bool:
    """A training target: not crowd, box at least 1 pixel wide and high, and a segmentation present."""
    return not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1 and bool(ann.get("segmentation"))


def large_scale_jitter(image: Tensor, target: Target, *, size: int, scale_range: Sequence[float] = (0.1, 2.0),
                       flip_prob: float = 0.5, pad_value: float = 128 / 255) -> tuple[Tensor, Target]:
    """ViTDet's large-scale jitter (see the module docstring) of one item; returns a [3, size, size] canvas.

    Instances whose box is cropped away (less than 1 pixel wide or high) or whose mask becomes empty are dropped.
    ``target['scale']`` becomes the resize factor (so ``boxes / scale`` are in the file's pixels, up to the crop).
    """
    _, h, w = image.shape
    factor = float(torch.empty(()).uniform_(*scale_range))
    scale = min(size * factor / h, size * factor / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    boxes = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    y0 = int(torch.randint(0, max(nh - size, 0) + 1, ()))
    x0 = int(torch.randint(0, max(nw - size, 0) + 1, ()))
    image = image[:, y0:y0 + size, x0:x0 + size]
    ch, cw = image.shape[1:]
    # masks: nearest resize of the crop window only (a 2x upscale of 50 full-size COCO masks would be GBs)
    ys, xs = _nearest_rows(y0, ch, h, nh), _nearest_rows(x0, cw, w, nw)
    masks = target["masks"][:, ys][:, :, xs]
    boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    boxes = torch.stack([boxes[:, 0].clamp(0, cw), boxes[:, 1].clamp(0, ch), boxes[:, 2].clamp(0, cw),
                         boxes[:, 3].clamp(0, ch)], dim=1)
    if float(torch.rand(())) < flip_prob:
        image, masks = image.flip(-1), masks.flip(-1)
        boxes = torch.stack([cw - boxes[:, 2], boxes[:, 1], cw - boxes[:, 0], boxes[:, 3]], dim=1)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    if len(masks):
        keep &= (masks.flatten(1) > 0).any(1)
    canvas = image.new_full((3, size, size), pad_value)
    canvas[:, :ch, :cw] = image
    padded = masks.new_zeros((len(masks), size, size))
    padded[:, :ch, :cw] = masks
    return canvas, {**target, "boxes": boxes[keep], "labels": target["labels"][keep], "masks": padded[keep],
                    "scale": scale}


def _nearest_rows(start: int, count: int, size: int, new_size: int) -> Tensor:
    """Source rows of output rows ``start .. start + count`` of a nearest resize ``size -> new_size``
    (``F.interpolate(mode='nearest')``'s rule: floor(i * size / new_size))."""
    return (torch.arange(start, start + count, dtype=torch.float64) * (size / new_size)).floor().long().clamp_(
        max=size - 1)


def collate_detection(batch: Sequence[tuple]) -> tuple[list, ...]:
    """Detection batches are lists (images differ in size, targets in length): ``[(img, tgt[, key]), ...]`` ->
    ``([img, ...], [tgt, ...][, [key, ...]])``."""
    return tuple(list(items) for items in zip(*batch))
