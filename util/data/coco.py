"""COCO instances in the standard layout, and ViTDet's large-scale jitter.

Layout (as ``mmdet``'s ``CocoDataset`` and torchvision's ``CocoDetection`` read it)::

    <root>/annotations/instances_{train,val}2017.json
    <root>/{train,val}2017/<file_name>

Items are ``(image [3, H, W] float in [0, 1], target)`` with ``target``: ``boxes`` [N, 4] xyxy float,
``labels`` [N] int64 in 1..K (category ids sorted, made contiguous; 0 is torchvision's background), ``masks``
[N, H, W] uint8, ``image_id``, ``orig_size`` (H, W of the file) and ``scale`` (pixels of the item per pixel of
the file). Conventions of torchvision's detection references and detectron2:

- crowd annotations, degenerate boxes (width or height < 1 pixel, outside the image) and zero areas are not
  training targets (mmdet ``CocoDataset._parse_ann_info``; they stay in the ground truth that COCO evaluation
  reads, where crowd regions are "ignore"), and a warning counts them;
- polygons of fewer than 3 points are removed, and an annotation left without any is dropped from training and
  evaluation (detectron2 ``data/datasets/coco.py`` ``load_coco_json``), counted in the same warning;
- training skips images without any remaining annotation (detectron2 ``filter_empty_annotations``, mmdet
  ``filter_empty_gt``); evaluation keeps every image, and an image without objects is a valid item with empty
  targets;
- an annotation file that does not match the images (a listed file missing from the folder, an annotation of an
  unknown image or category, an image whose pixel size differs from its entry) or is malformed (not an object
  of lists, repeated ids, a ``bbox`` that is not 4 finite numbers, non-finite or far-away polygon coordinates, an
  RLE that is not the image's size: :func:`check_annotation`) is a ``ValueError`` naming the file, the image
  and the annotation, when the dataset is built;
- an image that cannot be decoded is skipped with a warning in training (the next image is used, as the
  classification folders do) and is a ``CorruptImageError`` with ``strict_data``; evaluation reads every image
  header when the dataset is built and leaves unreadable ones out with a counted warning.

**Large-scale jitter** (Ghiasi et al., CVPR 2021; ViTDet's 1024 recipe, detectron2 ``ResizeScale`` +
``FixedSizeCrop`` + ``RandomFlip``): resize so that the image fits ``size x size`` times a factor drawn from
[0.1, 2.0], crop a random ``size x size`` window when larger, flip half of the images, and pad to ``size x size``
(grey 128, as detectron2's pad value). Randomness comes from torch's global generator, which
``util.data.loaders.KeyedSamples`` seeds per sample.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from util.data.folder import _DECODE_ERRORS, CorruptImageError

logger = logging.getLogger("vitfreeze")

__all__ = ["CocoInstances", "check_layout", "check_annotation", "decode_segmentation", "large_scale_jitter",
           "collate_detection"]

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
        train: skip images without training targets, and replace an image that cannot be decoded by the next
            one (see the module docstring).
        strict_data: an unreadable image is a ``CorruptImageError`` instead of a skip with a warning.

    Attributes:
        gt: the annotation file's content (what COCO evaluation compares against), less the annotations without a
            valid segmentation.
        category_ids: COCO id of label k at index k - 1; ``classes``: their names.
        image_ids: the ids of the items, in order.
        num_skipped: unreadable images replaced by another one so far (per process).

    Raises:
        FileNotFoundError: no annotation file or image folder.
        ValueError: the annotation file is malformed or does not match the images (see the module docstring).
    """

    def __init__(self, root: str | Path, split: str, *, transform: Callable[[Tensor, Target],
                 tuple[Tensor, Target]] | None = None, train: bool = False, strict_data: bool = False) -> None:
        root = Path(root)
        self.ann_file = root / "annotations" / f"instances_{split}2017.json"
        self.folder = root / f"{split}2017"
        for path in (self.ann_file, self.folder):
            if not path.exists():
                raise FileNotFoundError(f"COCO layout: {path} is missing (expected <root>/annotations/"
                                        f"instances_{split}2017.json and <root>/{split}2017/)")
        try:
            self.gt = json.loads(self.ann_file.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.ann_file} is not a JSON file ({err})") from None
        self.transform, self.train, self.strict = transform, train, strict_data
        self.num_skipped, self.bad_paths = 0, set()
        self._check_and_index(train)

    def _check_and_index(self, train: bool) -> None:
        where = str(self.ann_file)
        images, cats = check_layout(self.gt, where)
        names = {c["id"]: str(c.get("name", c["id"])) for c in self.gt["categories"]}
        self.category_ids, self.classes = cats, [names[c] for c in cats]
        on_disk = {p.name for p in self.folder.iterdir()}
        missing = sorted(img["file_name"] for img in images.values() if Path(img["file_name"]).name not in on_disk)
        if missing:
            raise ValueError(f"{self.ann_file} does not match {self.folder}: {len(missing)} of {len(images)} listed "
                             f"images are not there (e.g. {', '.join(missing[:3])})")
        self.images, ids = images, sorted(images)
        if not train:  # every evaluated image is read before training starts: cheap (headers), and early
            ids = self._readable(ids)
        label_of = {c: k + 1 for k, c in enumerate(cats)}
        self.anns: dict[int, list[dict]] = {i: [] for i in images}
        self.targets: dict[int, list[dict]] = {i: [] for i in images}  # the training targets among them
        kept, dropped, changed = [], Counter(), False
        for ann in self.gt["annotations"]:
            if ann.get("image_id") not in images:
                raise ValueError(f"{self.ann_file}: annotation {ann.get('id')} refers to image {ann.get('image_id')}, "
                                 f"which is not in 'images'")
            if ann.get("category_id") not in label_of:
                raise ValueError(f"{self.ann_file}: annotation {ann.get('id')} has category {ann.get('category_id')}, "
                                 f"which is not in 'categories' {cats}")
            checked, reason = check_annotation(ann, images[ann["image_id"]], where)
            changed |= checked is not ann
            ann = checked
            if reason == _NO_SEGMENTATION:  # detectron2 load_coco_json drops these instances from the dataset
                dropped[reason], changed = dropped[reason] + 1, True
                continue
            if reason is not None:
                dropped[reason] += 1
            else:
                self.targets[ann["image_id"]].append(ann)
            kept.append(ann)
            self.anns[ann["image_id"]].append(ann)
        if any(n for r, n in dropped.items() if r != "crowd"):
            logger.warning("%s: %d of %d annotations are not training targets (%s), as detectron2 and mmdet filter "
                           "them", self.ann_file.name, sum(dropped.values()), len(self.gt["annotations"]),
                           ", ".join(f"{n} {r}" for r, n in sorted(dropped.items())))
        if changed:
            self.gt = {**self.gt, "annotations": kept}
        self.label_of = label_of
        if train:
            kept_ids = [i for i in ids if self.targets[i]]
            if len(kept_ids) < len(ids):
                logger.info("%s: %d of %d images have no training annotation and are skipped (training only)",
                            self.ann_file.name, len(ids) - len(kept_ids), len(ids))
            ids = kept_ids
        if not ids:
            raise ValueError(f"{self.ann_file}: no image with a usable annotation")
        self.image_ids = ids
        logger.info("dataset %s: %d images, %d categories", self.ann_file, len(ids), len(self.classes),
                    extra={"preflight": "data"})

    def _readable(self, ids: list[int]) -> list[int]:
        """``ids`` less the images whose header cannot be read (a counted warning; ``strict_data``: an error); an
        image whose pixel size differs from its entry is a ``ValueError``."""
        readable = []
        for image_id in ids:
            info, path = self.images[image_id], self._path(image_id)
            try:
                with Image.open(path) as pil:
                    size = pil.size
            except _DECODE_ERRORS as err:
                self._unreadable(path, err)
                continue
            self._check_size(info, path, size)
            readable.append(image_id)
        if len(readable) < len(ids):
            logger.warning("%s: %d of %d images cannot be read and are left out (%s)", self.ann_file.name,
                           len(ids) - len(readable), len(ids), ", ".join(sorted(self.bad_paths)[:3]))
        return readable

    def _path(self, image_id: int) -> Path:
        return self.folder / Path(self.images[image_id]["file_name"]).name

    def _unreadable(self, path: Path, err: BaseException) -> None:
        if self.strict:
            raise CorruptImageError(f"cannot read image {path}: {err!r}; replace or remove the file, or run without "
                                    "--strict_data to skip unreadable images with a warning") from None
        self.bad_paths.add(str(path))

    def _check_size(self, info: dict, path: Path, size: tuple[int, int]) -> None:
        if size != (info["width"], info["height"]):
            raise ValueError(f"{path} is {size[0]}x{size[1]} pixels but {self.ann_file.name} says "
                             f"{info['width']}x{info['height']} (image {info['id']}): annotations and images do "
                             "not match")

    def _load(self, index: int) -> tuple[int, Image.Image]:
        """The first readable image from ``index`` on (training; evaluation reads exactly ``index``)."""
        tries = min(16, len(self.image_ids)) if self.train else 1
        for attempt in range(tries):
            image_id = self.image_ids[(index + attempt) % len(self.image_ids)]
            path = self._path(image_id)
            if str(path) in self.bad_paths:
                continue
            try:
                with Image.open(path) as pil:
                    pil = pil.convert("RGB")
            except _DECODE_ERRORS as err:
                self._unreadable(path, err)
                if not self.train:
                    raise CorruptImageError(f"cannot read image {path} (image {image_id}) of {self.ann_file.name}: "
                                            f"{err!r}; evaluation reads every listed image: replace the file or "
                                            "remove the image from the annotation file") from None
                logger.warning("skipping unreadable image %s (%r); using the next image instead", path, err)
                continue
            self.num_skipped += attempt
            self._check_size(self.images[image_id], path, pil.size)
            return image_id, pil
        raise CorruptImageError(f"no readable image in {tries} consecutive items of {self.ann_file.name} from "
                                f"index {index}: {sorted(self.bad_paths)[:5]}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image_id, pil = self._load(index)
        w, h = pil.size
        image = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div_(255)
        anns = self.targets[image_id]
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


# ---- validation of the annotation file (at build time: one line naming the file, the image and the annotation) ---

_NO_SEGMENTATION = "without a polygon of 3 or more points"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_layout(gt: Any, where: str) -> tuple[dict[int, dict], list[int]]:
    """The top level of an instances file: ``images``, ``annotations`` and ``categories`` lists of objects with
    unique ids (detectron2 and mmdet assert unique annotation ids), image sizes positive integers within PIL's
    decompression-bomb limit. Returns ({image id: entry}, sorted category ids)."""
    if not isinstance(gt, dict):
        raise ValueError(f"{where}: a COCO instances file is a JSON object with 'images', 'annotations' and "
                         f"'categories', not a {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        value = gt.get(key, [])
        if not isinstance(value, list):
            raise ValueError(f"{where}: '{key}' must be a list of objects, got a {type(value).__name__}")
        odd = next((x for x in value if not isinstance(x, dict)), None)
        if odd is not None:
            raise ValueError(f"{where}: '{key}' must be a list of objects, got an item {odd!r:.60}")
    gt.setdefault("annotations", [])
    limit = Image.MAX_IMAGE_PIXELS
    images: dict[int, dict] = {}
    for img in gt.get("images", []):
        what = f"{where}: image {img.get('id')!r}"
        if not isinstance(img.get("id"), int) or not isinstance(img.get("file_name"), str):
            raise ValueError(f"{what} needs an integer 'id' and a string 'file_name'")
        if img["id"] in images:
            raise ValueError(f"{what} is listed twice in 'images'")
        w, h = img.get("width"), img.get("height")
        if not all(_is_number(v) and v == int(v) and v > 0 for v in (w, h)):  # 640.0 is 640
            raise ValueError(f"{what} ({img['file_name']}): width and height must be positive integers, got "
                             f"{w!r} x {h!r}")
        if limit and w * h > limit:
            raise ValueError(f"{what} ({img['file_name']}) is {w}x{h} = {w * h} pixels, more than the {limit} of "
                             "PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS)")
        images[img["id"]] = img
    cats = [c.get("id") for c in gt.get("categories", [])]
    if not all(isinstance(c, int) for c in cats) or len(set(cats)) < len(cats):
        raise ValueError(f"{where}: category ids must be distinct integers, got {cats}")
    if not images or not cats:
        raise ValueError(f"{where}: no images or no categories")
    odd = next((a for a in gt["annotations"] if not isinstance(a.get("id"), int)
                or not isinstance(a.get("image_id"), int) or not isinstance(a.get("category_id"), int)), None)
    if odd is not None:
        raise ValueError(f"{where}: annotation {odd.get('id')!r:.40} needs integer 'id', 'image_id' and "
                         f"'category_id', got {odd.get('id')!r:.20}, {odd.get('image_id')!r:.20}, "
                         f"{odd.get('category_id')!r:.20}")
    seen = Counter(a["id"] for a in gt["annotations"])
    twice = [i for i, n in seen.items() if n > 1]
    if twice:
        raise ValueError(f"{where}: annotation ids are not unique ({len(twice)} repeated, e.g. {twice[:3]})")
    return images, sorted(cats)


def check_annotation(ann: dict, image: dict, where: str) -> tuple[dict, str | None]:
    """One annotation against its image: ``(annotation, reason)``, where ``reason`` says why it is not a training
    target (None: it is one) and the annotation is returned with its polygons of fewer than 3 points removed
    (detectron2 ``load_coco_json``; an annotation left without any is reported as ``_NO_SEGMENTATION``).

    Rules of mmdet ``CocoDataset._parse_ann_info`` / detectron2: crowd regions, boxes under 1 pixel wide or high,
    boxes outside the image and zero areas are not training targets. Malformed values are a ``ValueError`` naming
    the file, the image and the annotation: a ``bbox`` that is not 4 finite numbers, an ``area`` that is not a
    finite number, polygon coordinates that are not finite numbers or lie beyond the image by more than its size
    (rasterizing a polygon costs memory in proportion to its extent: a coordinate of 1e7 takes GBs), an RLE that
    is not the image's size or whose counts do not decode to its pixels.
    """
    h, w = image["height"], image["width"]
    what = f"{where}: annotation {ann.get('id')!r} of image {image['id']} ({image['file_name']})"
    box = ann.get("bbox")
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise ValueError(f"{what}: 'bbox' must be [x, y, width, height] of finite numbers, got {box!r:.80}")
    if not _is_number(ann.get("area")):
        raise ValueError(f"{what}: 'area' must be a finite number (COCO evaluation reads it), got "
                         f"{ann.get('area')!r:.40}")
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        parts = []
        for part in segm:
            if not isinstance(part, list) or not all(_is_number(v) for v in part):
                raise ValueError(f"{what}: a polygon must be a list of finite numbers [x1, y1, x2, y2, ...], got "
                                 f"{part!r:.80}")
            xs, ys = part[0::2], part[1::2]
            if part and (min(xs) < -w or max(xs) > 2 * w or min(ys) < -h or max(ys) > 2 * h):
                raise ValueError(f"{what}: polygon coordinates x in [{min(xs):g}, {max(xs):g}], y in "
                                 f"[{min(ys):g}, {max(ys):g}] lie far outside the {w}x{h} image")
            if len(part) >= 6 and len(part) % 2 == 0:
                parts.append(part)
        if segm and not parts:
            return ann, _NO_SEGMENTATION
        if len(parts) < len(segm):
            ann = {**ann, "segmentation": parts}
    elif isinstance(segm, dict):
        _check_rle(segm, h, w, what)
    elif segm is None:  # COCO evaluation reads every ground truth's segmentation: none is an empty one
        ann = {**ann, "segmentation": []}
    else:
        raise ValueError(f"{what}: 'segmentation' must be a list of polygons or an RLE object, got "
                         f"{type(segm).__name__}")
    x, y, bw, bh = box
    if ann.get("iscrowd", 0):
        return ann, "crowd"
    if bw < 1 or bh < 1:
        return ann, "box under 1 pixel"
    if min(x + bw, w) - max(x, 0) <= 0 or min(y + bh, h) - max(y, 0) <= 0:
        return ann, "box outside the image"
    if ann["area"] <= 0:
        return ann, "zero area"
    if not segm:
        return ann, "without segmentation"
    return ann, None


def _check_rle(rle: dict, h: int, w: int, what: str) -> None:
    """An RLE (``counts`` a list of run lengths, or COCO's compressed string) of exactly the ``h x w`` image."""
    size, counts = rle.get("size"), rle.get("counts")
    if size != [h, w]:
        raise ValueError(f"{what}: RLE size {size!r:.40} is not the image's [height, width] = [{h}, {w}]")
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError(f"{what}: RLE counts must be non-negative integers")
        total = sum(counts)
    elif isinstance(counts, (str, bytes)):
        total = _rle_string_total(counts.encode("ascii", "replace") if isinstance(counts, str) else counts)
    else:
        raise ValueError(f"{what}: RLE counts must be a list of run lengths or a compressed string, got "
                         f"{type(counts).__name__}")
    if total != h * w:
        raise ValueError(f"{what}: RLE counts cover {total} pixels, not the {h}x{w} = {h * w} of the image")


def _rle_string_total(counts: bytes) -> int:
    """Pixels covered by a compressed COCO RLE string, decoded as pycocotools ``maskApi.c`` ``rleFrString`` does
    (6-bit groups offset by 48, 0x20 continues a number, 0x10 of its last group is the sign, counts after the
    second are deltas to the count two before); -1 for a malformed string."""
    runs: list[int] = []
    x = k = 0
    for byte in counts:
        c = byte - 48
        if not 0 <= c <= 63:
            return -1
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if not c & 0x20:
            if c & 0x10:
                x |= -1 << (5 * k)
            if len(runs) > 2:
                x += runs[-2]
            runs.append(x)
            x = k = 0
    if k or not runs or min(runs) < 0:
        return -1
    return sum(runs)


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
