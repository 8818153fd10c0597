"""Image folders for pretraining and evaluation, with a robust RGB loader.

- ``build_pretrain_dataset``: MAE reads ``ImageFolder(<data_path>/train)``; LocalMIM/ViTFreeze point
  ``--data_path`` at the train folder itself. We accept both, plus a flat folder of images (label 0) and the
  word ``demo``
  (MAE ``main_pretrain.py``, ``util/datasets.py``). Class discovery is
  torchvision's ``find_classes``/``make_dataset``, so labels
  equal ``torchvision.datasets.ImageFolder``'s. ``build_folder_dataset`` reads one given folder (e.g. ``val``).
- ``ImageFileDataset``: every image is converted to RGB (greyscale, CMYK, palette and RGBA files occur in
  ImageNet); a corrupt or truncated file is reported once with its path and replaced by the next readable
  sample instead of killing a multi-day run (MAE/torchvision's ``pil_loader`` raises mid-epoch).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from util.data.demo import DEMO_SEEDS, DemoDataset

logger = logging.getLogger("vitfreeze")

__all__ = ["build_pretrain_dataset", "build_folder_dataset", "load_rgb", "ImageFileDataset", "CorruptImageError",
           "IMG_EXTENSIONS"]

# Everything PIL raises for unreadable data: truncated (OSError), unidentified (UnidentifiedImageError is an
# OSError), broken headers (SyntaxError / ValueError / EOFError in some plugins), decompression bombs.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class CorruptImageError(OSError):
    """An image file could not be decoded (raised with ``strict_data`` or when no readable sample is found)."""


def load_rgb(path: str) -> Image.Image:
    """Open and fully decode an image file as PIL RGB.

    ``convert`` forces a full decode, so a truncated file raises here (as long as PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False) instead of silently returning grey pixels.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # avoids PIL's "palette with transparency" warning
        if img.mode.startswith("I"):
            return _wide_grey_to_rgb(img)
        return img.convert("RGB")


def _wide_grey_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) greyscale scaled to 8 bits: PIL's ``convert`` clips such values at 255, which
    saturates a 16-bit image (a 0-65535 ramp would load almost all white). 65535 maps to 255 (x / 257)."""
    wide = np.asarray(img).astype(np.float64)
    grey = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


class ImageFileDataset(Dataset):
    """(path, label) samples read with ``load_rgb``; unreadable files are skipped deterministically.

    Args:
        samples: list of (file path, class index).
        classes: class names; ``classes[label]`` names a sample's class.
        transform: applied to the PIL RGB image.
        strict: raise ``CorruptImageError`` on the first unreadable file instead of skipping it.
        max_tries: how many consecutive samples to try before giving up.

    Attributes:
        samples, targets, classes: as in ``torchvision.datasets.ImageFolder``.
        num_skipped: unreadable reads replaced by another sample so far (per process: each DataLoader
            worker counts its own).
        bad_paths: files found unreadable so far in this process; they are skipped without re-reading.
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable | None = None,
                 *, strict: bool = False, max_tries: int = 16) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.transform = transform
        self.load = load_rgb  # path -> image; util.data.decode swaps in its byte reader for --decode cpu/device
        self.strict = strict
        self.max_tries = max_tries
        self.num_skipped = 0
        self.bad_paths: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        tries = min(self.max_tries, len(self.samples))
        failed = []
        for attempt in range(tries):
            i = (index + attempt) % len(self.samples)
            path, label = self.samples[i]
            if path in self.bad_paths:
                failed.append(path)
                continue
            try:
                img = self.load(path)
            except _DECODE_ERRORS as err:
                if self.strict:
                    raise CorruptImageError(f"cannot read image {path}: {err!r}; replace or remove the file, or run "
                                            "without --strict_data to skip unreadable images with a warning") from err
                self.bad_paths.add(path)
                logger.warning("skipping unreadable image %s (%r); trying sample %d instead", path, err,
                               (i + 1) % len(self.samples))
                failed.append(path)
                continue
            self.num_skipped += attempt
            return (self.transform(img) if self.transform is not None else img), label
        raise CorruptImageError(f"no readable image in {tries} consecutive samples from index {index}: {failed}")


def _scan_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder samples of ``root`` if its class sub-folders hold images, else its own image files (label 0)."""
    has_subdirs = any(entry.is_dir() for entry in os.scandir(root))
    samples: list[tuple[str, int]] = []
    classes: list[str] = []
    if has_subdirs:
        classes, class_to_idx = find_classes(root)
        for name in classes:  # per class: make_dataset raises on an empty class (allow_empty is torchvision>=0.18)
            try:
                samples += make_dataset(root, {name: class_to_idx[name]}, extensions=IMG_EXTENSIONS)
            except FileNotFoundError:
                logger.warning("class folder %s holds no images", os.path.join(root, name))
    flat = sorted(e.path for e in os.scandir(root)
                  if e.is_file() and has_file_allowed_extension(e.name, IMG_EXTENSIONS))
    if samples:
        if flat:
            logger.warning("ignoring %d image files directly in %s (class sub-folders found)", len(flat), root)
        return samples, classes
    return [(path, 0) for path in flat], [os.path.basename(os.path.normpath(root))]


def _debug_subset(samples: list[tuple[str, int]], per_class: int = 8, total: int = 64) -> list[tuple[str, int]]:
    """First ``per_class`` samples of each class, taken round-robin over classes up to ``total``, in input order."""
    rank: dict[int, int] = {}
    keyed = []
    for i, (_, label) in enumerate(samples):
        r = rank[label] = rank.get(label, -1) + 1
        if r < per_class:
            keyed.append((r, label, i))
    keep = sorted(i for _, _, i in sorted(keyed)[:total])
    return [samples[i] for i in keep]


def build_folder_dataset(root: str, transform: Callable | None, *, strict_data: bool = False,
                         debug: bool = False) -> ImageFileDataset:
    """An ``ImageFileDataset`` over exactly ``root`` (no ``train`` lookup; e.g. ``<data_path>/val`` for k-NN).

    Args:
        root: folder read as ImageFolder (sorted class sub-folders holding images) or, without such
            sub-folders, as a flat folder of images with label 0 and one class named after the folder.
            Extensions are torchvision's ``IMG_EXTENSIONS``, case-insensitive.
        transform: applied to each PIL RGB image.
        strict_data: raise on the first unreadable file instead of logging it and using the next sample.
        debug: keep a small deterministic subset (first 8 images per class, round-robin, 64 in all).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no image files were found.
    """
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data path {root!r} does not exist or is not a folder")
    samples, classes = _scan_folder(root)
    if not samples:
        raise ValueError(f"no image files found in {root!r} (in class sub-folders or directly); accepted "
                         f"extensions (case-insensitive): {', '.join(IMG_EXTENSIONS)}")
    if debug:
        samples = _debug_subset(samples)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated files will load as partly grey")
    logger.info("dataset %s: %d images, %d classes%s", root, len(samples), len(classes), " (debug subset)" * debug,
                extra={"preflight": "data"})
    return ImageFileDataset(samples, classes, transform, strict=strict_data)


def build_pretrain_dataset(data_path: str, transform: Callable | None, *, strict_data: bool = False,
                           debug: bool = False, demo_size: int = 64) -> Dataset:
    """The pretraining dataset of (image, label) pairs.

    Args:
        data_path: ``'demo'`` for ``DemoDataset``; else a folder: ``<data_path>/train`` if it exists (MAE's
            layout), else ``data_path`` itself (LocalMIM's), read by ``build_folder_dataset``.
        transform: applied to each PIL RGB image.
        strict_data: raise on the first unreadable file instead of logging it and using the next sample.
        debug: keep a small deterministic subset (at most 8 images per class, 64 in all).
        demo_size: image side of the demo dataset in pixels. The demo images are always those of the demo
            ``train`` split (``DEMO_SEEDS``), whatever the run's ``--seed``: never the images evaluation uses.

    Raises:
        FileNotFoundError: ``data_path`` does not exist.
        ValueError: no image files were found.
    """
    if data_path == "demo":
        dataset = DemoDataset(per_class=8 if debug else 64, size=demo_size, seed=DEMO_SEEDS["train"],
                              transform=transform)
        logger.info("dataset demo: %d images of %d px (generated in memory)", len(dataset), demo_size,
                    extra={"preflight": "data"})
        return dataset
    root = os.path.expanduser(data_path)
    if os.path.isdir(os.path.join(root, "train")):
        root = os.path.join(root, "train")
    return build_folder_dataset(root, transform, strict_data=strict_data, debug=debug)


