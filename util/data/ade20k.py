"""Semantic segmentation data in the ADE20K layout, with mmsegmentation's ADE20K pipelines.

Layout (mmseg ``ADE20KDataset``, Zhou et al., "Scene Parsing through ADE20K Dataset", CVPR 2017)::

    <root>/images/{training,validation}/<name>.jpg
    <root>/annotations/{training,validation}/<name>.png      8-bit class ids, 0 = "other" / unlabelled

``reduce_zero_label`` (ADE20K's convention): 0 -> 255 (ignored), k -> k - 1; 255 stays 255.

Training pipeline (mmseg ``configs/_base_/datasets/ade20k.py``, as used by BEiT / MAE for UperNet 512x512):
resize to scale (4 * crop, crop) x ratio in [0.5, 2.0] keeping the aspect ratio (the image fits inside the scaled
box), random crop of ``crop`` x ``crop`` retried up to 10 times until no single class covers more than
``cat_max_ratio`` (0.75) of the labelled pixels, horizontal flip (0.5), photometric distortion (brightness +-32,
contrast and saturation x[0.5, 1.5], hue +-18 of cv2's 180 degrees, each with probability 0.5; contrast before or
after saturation/hue at random), ImageNet normalisation, pad to ``crop`` (image 0, label 255).
Evaluation: resize to the same (4 * crop, crop) box without the ratio; labels stay at full resolution (metrics
are computed there, as mmseg does); the sliding window is ``engine/segment.py``'s.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from util.data.folder import _DECODE_ERRORS, CorruptImageError, load_rgb

logger = logging.getLogger("vitfreeze")

__all__ = ["IGNORE_INDEX", "ADE20KDataset", "SegTrainTransform", "SegEvalTransform", "rescale_size",
           "random_crop_box", "photometric_distortion", "collate_eval"]

IGNORE_INDEX = 255
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255.0
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255.0
_SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}
_LABEL_MODES = ("L", "P", "I", "I;16")


def rescale_size(w: int, h: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep_ratio: the largest (w', h') with the aspect ratio of (w, h) inside the box
    (long side <= max(scale), short side <= min(scale)); sizes rounded half up as mmcv does (``int(x + 0.5)``)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(w, h), short_edge / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def random_crop_box(label: np.ndarray, crop: int, rng: np.random.Generator, cat_max_ratio: float = 0.75,
                    ignore_index: int = IGNORE_INDEX, tries: int = 10) -> tuple[int, int, int, int]:
    """mmseg ``RandomCrop``: (y0, y1, x0, x1) of a crop, re-drawn up to ``tries`` times while one class covers
    ``cat_max_ratio`` or more of the crop's labelled pixels (and there are at least 2 classes in it)."""
    h, w = label.shape

    def draw() -> tuple[int, int, int, int]:
        y0 = int(rng.integers(0, max(h - crop, 0) + 1))
        x0 = int(rng.integers(0, max(w - crop, 0) + 1))
        return y0, min(y0 + crop, h), x0, min(x0 + crop, w)

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            y0, y1, x0, x1 = box
            values = label[y0:y1, x0:x1]
            counts = np.bincount(values[values != ignore_index].ravel(), minlength=1)
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def photometric_distortion(img: Tensor, rng: np.random.Generator) -> Tensor:
    """mmseg ``PhotoMetricDistortion`` on a float RGB tensor [3, H, W] in [0, 255] (returns the same range)."""
    def coin() -> bool:
        return bool(rng.integers(2))

    if coin():
        img = img + float(rng.uniform(-32, 32))
    mode = int(rng.integers(2))
    if mode == 1 and coin():
        img = img * float(rng.uniform(0.5, 1.5))
    img = img.clamp(0, 255)
    if coin():
        img = TF.adjust_saturation(img / 255.0, float(rng.uniform(0.5, 1.5))) * 255.0
    if coin():
        img = TF.adjust_hue(img / 255.0, float(rng.uniform(-18, 18)) / 180.0) * 255.0
    if mode == 0 and coin():
        img = (img * float(rng.uniform(0.5, 1.5))).clamp(0, 255)
    return img


def _to_tensor(img: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()


class SegTrainTransform:
    """mmseg's ADE20K training pipeline (module docstring). ``__call__(img, label, rng)`` -> (image [3, crop, crop]
    normalised, label int64 [crop, crop])."""

    def __init__(self, crop: int = 512, ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True) -> None:
        self.crop, self.ratio_range, self.cat_max_ratio = crop, ratio_range, cat_max_ratio
        self.flip_prob, self.photometric = flip_prob, photometric

    def __call__(self, img: Image.Image, label: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        ratio = float(rng.uniform(*self.ratio_range))
        w, h = rescale_size(img.width, img.height, (4 * self.crop * ratio, self.crop * ratio))
        img = img.resize((w, h), Image.BILINEAR)
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
        y0, y1, x0, x1 = random_crop_box(label, self.crop, rng, self.cat_max_ratio)
        image = _to_tensor(img)[:, y0:y1, x0:x1]
        target = torch.from_numpy(label[y0:y1, x0:x1].astype(np.int64))
        if rng.random() < self.flip_prob:
            image, target = image.flip(-1), target.flip(-1)
        if self.photometric:
            image = photometric_distortion(image, rng)
        image = (image - _MEAN) / _STD
        ph, pw = self.crop - image.shape[1], self.crop - image.shape[2]
        if ph > 0 or pw > 0:
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            target = F.pad(target, (0, pw, 0, ph), value=IGNORE_INDEX)
        return image.contiguous(), target.contiguous()


class SegEvalTransform:
    """Resize into the (4 * crop, crop) box keeping the ratio, normalise; the label is left at full size."""

    def __init__(self, crop: int = 512) -> None:
        self.crop = crop

    def __call__(self, img: Image.Image, label: np.ndarray, rng: Any = None) -> tuple[Tensor, Tensor]:
        w, h = rescale_size(img.width, img.height, (4 * self.crop, self.crop))
        image = (_to_tensor(img.resize((w, h), Image.BILINEAR)) - _MEAN) / _STD
        return image.contiguous(), torch.from_numpy(label.astype(np.int64))


class ADE20KDataset(Dataset):
    """Images and label maps of one split of an ADE20K-layout folder.

    Args:
        root: dataset root (holding ``images/`` and ``annotations/``).
        split: ``'train'`` / ``'training'`` or ``'val'`` / ``'validation'``.
        transform: ``transform(img, label, rng) -> (image, target)`` (:class:`SegTrainTransform` or
            :class:`SegEvalTransform`); None returns the PIL image and the int64 label tensor.
        num_classes: K; a label (after ``reduce_zero_label``) outside [0, K) that is not 255 raises ValueError
            naming the file.
        reduce_zero_label: ADE20K's 0 -> 255, k -> k - 1.
        strict_data: an unreadable image or label map is a ``CorruptImageError`` instead of a skip with a warning.
        seed: augmentation draws come from ``numpy.random.default_rng([seed, epoch, index])``, so a run is
            reproducible whatever the number of workers. The epoch is ``set_epoch``'s, or comes with the index
            (``dataset[(epoch, index)]``, what ``build_train_loader(..., epoch_indices=True)`` hands persistent
            workers, whose copy of the dataset never sees ``set_epoch``).

    Every pair's headers are read when the dataset is built (cheap): a pair whose image or label map cannot be
    opened is left out with a counted warning (as the classification folders skip unreadable images), or is a
    ``CorruptImageError`` with ``strict_data``. A file that opens but cannot be decoded is met when the item is
    read: training then uses the next pair (with a warning), evaluation (which must see every image) stops with a
    ``CorruptImageError``.

    Raises:
        FileNotFoundError: a folder is missing or empty.
        ValueError: images and annotations do not pair up one to one (names listed); an image or label map of
            more pixels than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), checked before
            decoding; a label map that is not single-channel or not the size of its image.
    """

    def __init__(self, root: str | Path, split: str, transform: Any = None, *, num_classes: int,
                 reduce_zero_label: bool = True, seed: int = 0, strict_data: bool = False) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        root = Path(root)
        image_dir, label_dir = root / "images" / _SPLITS[split], root / "annotations" / _SPLITS[split]
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is missing: expected the ADE20K layout <root>/images/{{training,"
                                        "validation}/*.jpg and <root>/annotations/{training,validation}/*.png")
        images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
        labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() == ".png"}
        if not images:
            raise FileNotFoundError(f"no images in {image_dir}")
        if images.keys() != labels.keys():
            no_label, no_image = sorted(images.keys() - labels.keys()), sorted(labels.keys() - images.keys())
            raise ValueError(f"{root} ({split}): images and annotations do not match: "
                             f"{len(no_label)} images without a label map {no_label[:5]}, "
                             f"{len(no_image)} label maps without an image {no_image[:5]}")
        self.transform, self.num_classes, self.reduce_zero_label = transform, num_classes, reduce_zero_label
        self.seed, self.epoch, self.strict, self.train = seed, 0, strict_data, _SPLITS[split] == "training"
        self.num_skipped, self.bad_paths = 0, set()
        pairs = [(str(images[k]), str(labels[k])) for k in sorted(images)]
        self.samples = [pair for pair in pairs if self._check_headers(*pair)]
        if len(self.samples) < len(pairs):
            logger.warning("%s (%s): %d of %d image / label pairs cannot be read and are left out (%s)", root, split,
                           len(pairs) - len(self.samples), len(pairs), ", ".join(sorted(self.bad_paths)[:3]))
        if not self.samples:
            raise ValueError(f"{root} ({split}): no readable image / label pair")
        logger.info("dataset %s (%s): %d images, %d classes", root, split, len(self.samples), num_classes,
                    extra={"preflight": "data"})

    def _check_headers(self, image: str, label: str) -> bool:
        """Whether both files of a pair open; refuses (ValueError) what no decode should be tried on."""
        sizes = []
        for path in (image, label):
            try:
                with Image.open(path) as im:
                    size, mode = im.size, im.mode
            except Image.DecompressionBombError as err:
                raise ValueError(f"{path}: {err} (PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): refused "
                                 "before decoding") from None
            except _DECODE_ERRORS as err:
                self._unreadable(path, err)
                return False
            limit = Image.MAX_IMAGE_PIXELS
            if limit and size[0] * size[1] > limit:
                raise ValueError(f"{path} is {size[0]}x{size[1]} = {size[0] * size[1]} pixels, more than the {limit} "
                                 "of PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS): refused before "
                                 "decoding")
            sizes.append(size)
        if mode not in _LABEL_MODES:
            raise ValueError(f"{label}: label map must be a single-channel PNG of class ids, got mode {mode}")
        if sizes[0] != sizes[1]:
            raise ValueError(f"{image} is {sizes[0][0]}x{sizes[0][1]} but its label map {label} is "
                             f"{sizes[1][0]}x{sizes[1][1]}")
        return True

    def _unreadable(self, path: str, err: BaseException) -> None:
        if self.strict:
            raise CorruptImageError(f"cannot read {path}: {err!r}; replace or remove the file (and its image or "
                                    "label map), or run without --strict_data to skip unreadable pairs with a "
                                    "warning") from None
        self.bad_paths.add(path)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def load_label(self, index: int) -> np.ndarray:
        """The label map of sample ``index`` as uint8 [H, W] after ``reduce_zero_label`` and the class-id check."""
        path = self.samples[index][1]
        with Image.open(path) as im:
            mode, raw = im.mode, np.array(im)
        return self._class_ids(path, mode, raw)

    def _class_ids(self, path: str, mode: str, raw: np.ndarray) -> np.ndarray:
        if mode not in _LABEL_MODES:
            raise ValueError(f"{path}: label map must be a single-channel PNG of class ids, got mode {mode}")
        label = raw.astype(np.int64)
        wide = np.unique(label[(label < 0) | (label > 255)])
        if wide.size:  # a 16-bit map: 256 would become 255 (ignore) under reduce_zero_label
            raise ValueError(f"{path}: class ids {wide[:10].tolist()} are outside [0, {self.num_classes}) "
                             f"(nb_classes {self.num_classes}; 255 = ignore): label maps hold 8-bit class ids")
        if self.reduce_zero_label:
            label = np.where(label == 0, 256, label) - 1  # 0 -> 255, k -> k - 1, 255 -> 254 -> 255 below
            label[label == 254] = IGNORE_INDEX
        bad = np.unique(label[(label != IGNORE_INDEX) & ((label < 0) | (label >= self.num_classes))])
        if bad.size:
            note = ", after reduce_zero_label" if self.reduce_zero_label else ""
            raise ValueError(f"{path}: class ids {bad[:10].tolist()} are outside [0, {self.num_classes}) "
                             f"(nb_classes {self.num_classes}{note}; 255 = ignore)")
        return label.astype(np.uint8)

    def _load(self, index: int) -> tuple[int, Image.Image, np.ndarray]:
        """The first decodable pair from ``index`` on (training; evaluation reads exactly ``index``)."""
        tries = min(16, len(self.samples)) if self.train else 1
        for attempt in range(tries):
            i = (index + attempt) % len(self.samples)
            if any(p in self.bad_paths for p in self.samples[i]):
                continue
            image_path, label_path = self.samples[i]
            path = image_path
            try:
                img = load_rgb(image_path)
                path = label_path
                with Image.open(label_path) as im:
                    mode, raw = im.mode, np.array(im)
            except _DECODE_ERRORS as err:
                self._unreadable(path, err)
                if not self.train:
                    raise CorruptImageError(f"cannot read {path}: {err!r}; evaluation reads every pair: replace "
                                            "the file or remove the pair") from None
                logger.warning("skipping unreadable %s (%r); using the next pair instead", path, err)
                continue
            self.num_skipped += attempt
            return i, img, self._class_ids(label_path, mode, raw)
        raise CorruptImageError(f"no readable image / label pair in {tries} consecutive samples from index {index}: "
                                f"{sorted(self.bad_paths)[:5]}")

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, Any, int]:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        index, img, label = self._load(index)
        if (img.height, img.width) != label.shape:
            raise ValueError(f"{self.samples[index][0]} is {img.width}x{img.height} but its label map is "
                             f"{label.shape[1]}x{label.shape[0]}")
        if self.transform is None:
            return img, torch.from_numpy(label.astype(np.int64)), index
        rng = np.random.default_rng([self.seed, epoch, index])
        image, target = self.transform(img, label, rng)
        return image, target, index


def collate_eval(batch: list) -> tuple[list[Tensor], list[Tensor], list[int]]:
    """Evaluation batches keep images of different sizes apart: lists instead of stacked tensors."""
    images, labels, indices = zip(*batch)
    return list(images), list(labels), list(indices)
